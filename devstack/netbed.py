"""A multi-host test bed on one machine: Linux network namespaces on private test bridges.

Each :class:`Host` is a network namespace with its own loopback and one address on each
network it joins. A network is a Linux bridge in the root namespace; the root namespace has
an address on every bridge too, so the test itself (the "operator's laptop") reaches every
host. The root namespace does not forward between bridges, so two hosts talk only over a
network they share. A host's link to a network can be cut and restored
(:meth:`NetBed.cut`): the host keeps running and its sockets stay open, but no packet goes
through; TCP retransmits once the link is back, as after a real switch port flap.

The usual layout puts clients on a ``front`` network with the gateway, and the gateway, Redis
and the workers on a ``back`` network, so the gateway's link to Redis can be cut while its
clients stay connected.

Needs root and iproute2's ``ip`` (both in CI). Only addresses on the bed's own bridges and
loopback are used; :meth:`NetBed.close` removes every namespace and bridge it made (a crashed
run's leftovers are removed by the next bed).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

TAG = "mgnb"  # every namespace and bridge of a bed starts with this
_SUBNET_BASE = ipaddress.IPv4Network("10.251.0.0/16")
_made = 0  # beds made by this process


class NetBedUnavailable(RuntimeError):
    """This machine cannot build a bed (not root, or no ``ip``)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def available() -> str | None:
    """Why a bed cannot be built here, or None if it can."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{TAG}probe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    name: str
    netns: str
    addresses: dict[str, str] = field(default_factory=dict)  # network -> address

    def address(self, network: str = "back") -> str:
        return self.addresses[network]

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host. (``ip netns exec`` execs it: the pid is the program's.)"""
        return ["ip", "netns", "exec", self.netns, *argv]


class NetBed:
    def __init__(self, networks: Sequence[str] = ("front", "back")) -> None:
        reason = available()
        if reason is not None:
            raise NetBedUnavailable(reason)
        remove_leftovers()
        global _made
        _made += 1
        self._id = f"{os.getpid() % 100000}{chr(ord('a') + _made % 26)}"  # pid, then a letter
        self.hosts: dict[str, Host] = {}
        self._subnets: dict[str, ipaddress.IPv4Network] = {}
        self._next: dict[str, int] = {}
        self._links: dict[tuple[str, str], str] = {}  # (host, network) -> root-side veth
        self.observer: dict[str, str] = {}  # network -> the root namespace's address on it
        subnets = _SUBNET_BASE.subnets(new_prefix=24)
        offset = (os.getpid() + 7 * _made) % 200  # two beds at once use two ranges
        for _ in range(offset):
            next(subnets)
        try:
            for net in networks:
                self._add_network(net, next(subnets))
        except BaseException:
            self.close()
            raise

    def _bridge(self, network: str) -> str:
        return f"{TAG}{self._id}{network[:3]}"

    def _add_network(self, network: str, subnet: ipaddress.IPv4Network) -> None:
        bridge = self._bridge(network)
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        first = subnet.network_address + 1
        _ip("addr", "add", f"{first}/{subnet.prefixlen}", "dev", bridge)
        self._subnets[network] = subnet
        self._next[network] = 2
        self.observer[network] = str(first)

    def add_host(self, name: str, networks: Sequence[str] = ("back",)) -> Host:
        netns = f"{TAG}{self._id}-{name}"
        _ip("netns", "add", netns)
        host = Host(name=name, netns=netns)
        self.hosts[name] = host
        _ip("-n", netns, "link", "set", "lo", "up")
        for network in networks:
            subnet = self._subnets[network]
            address = str(subnet.network_address + self._next[network])
            self._next[network] += 1
            n = len(self._links)
            outside, inside = f"{TAG}{self._id}v{n}", f"eth-{network[:3]}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", inside, "netns", netns)
            _ip("link", "set", outside, "master", self._bridge(network), "up")
            _ip("-n", netns, "addr", "add", f"{address}/{subnet.prefixlen}", "dev", inside)
            _ip("-n", netns, "link", "set", inside, "up")
            host.addresses[network] = address
            self._links[(name, network)] = outside
        return host

    def cut(self, host: str, network: str = "back") -> None:
        """Unplug ``host`` from ``network``: nothing goes through until :meth:`restore`."""
        _ip("link", "set", self._links[(host, network)], "down")

    def restore(self, host: str, network: str = "back") -> None:
        _ip("link", "set", self._links[(host, network)], "up")

    def close(self) -> None:
        for host in self.hosts.values():
            _ip("netns", "del", host.netns, check=False)  # its veths go with it
        for network in self._subnets:
            _ip("link", "del", self._bridge(network), check=False)
        self.hosts.clear()
        self._subnets.clear()

    def __enter__(self) -> NetBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remove_leftovers() -> None:
    """Remove the namespaces and bridges of beds whose process is gone."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ")[0]
        if name.startswith(TAG) and not _owner_alive(name[len(TAG) :]):
            _ip("netns", "del", name, check=False)
    links = _ip("-o", "link", "show", "type", "bridge", check=False).stdout.split("\n")
    for line in links:
        parts = line.split(": ")
        if len(parts) > 1 and parts[1].startswith(TAG):
            if not _owner_alive(parts[1][len(TAG) :]):
                _ip("link", "del", parts[1].split("@")[0], check=False)


def _owner_alive(name: str) -> bool:
    """Whether a live process could own a bed whose names go on with ``name`` (the pid
    modulo 100000, then a letter)."""
    digits = name[: len(name) - len(name.lstrip("0123456789"))]
    if not digits:
        return False
    tail = int(digits)
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) % 100000 == tail:
            return True
    return False


class DelayProxy:
    """A TCP proxy that adds ``delay_s`` to each direction of every connection (this kernel
    has no ``netem``). Order and pipelining are kept: each chunk read is sent ``delay_s``
    after it arrived, so the proxy adds latency, not a bandwidth limit."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], delay_s: float) -> None:
        self._target = target
        self._delay_s = delay_s
        self._server = socket.create_server(listen, reuse_port=False)
        self._server.settimeout(0.2)
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="delay-proxy", daemon=True).start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.getsockname()[:2]
        return str(host), int(port)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                line: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(src, line), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, line), daemon=True).start()

    def _read(self, src: socket.socket, line: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            try:
                chunk = src.recv(65536)
            except OSError:
                chunk = b""
            line.put((time.monotonic() + self._delay_s, chunk))
            if not chunk:
                return

    @staticmethod
    def _write(dst: socket.socket, line: queue.Queue[tuple[float, bytes]]) -> None:
        while True:
            due, chunk = line.get()
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            try:
                if not chunk:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(chunk)
            except OSError:
                return

    def redirect(self, target: tuple[str, int]) -> None:
        """Cut every open connection and send new ones to ``target``: what a client sees when
        Redis fails over to another server (Sentinel names the new master on reconnect)."""
        self._target = target
        self._cut()

    def _cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # (wakes the threads reading it)
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._closed.set()
        self._server.close()
        self._cut()
