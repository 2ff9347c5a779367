"""The real stack spread over several network hosts (``devstack.netbed``), for partition and
failover tests.

Hosts: the gateway on ``front`` (its clients: the test) and ``back``; Redis (one server, or a
master, a replica and three sentinels, each on its own host) and the workers on ``back``.
Every process is the one a deployment runs; only the network between them is the test's.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from redis import Redis

from devstack import netbed
from devstack.netbed import Host, NetBed
from devstack.processes import (
    Proc,
    listening,
    redis_server_binary,
    spawn,
    start_gateway,
    start_redis,
    start_worker,
    wait_for,
    wait_ready,
)
from tests.stack import USER_KEY, BackgroundStream, stack_env, write_registry

REDIS_PORT = 6379
SENTINEL_PORT = 26379
GATEWAY_PORT = 8000
MASTER_NAME = "medgemma"

needs_netbed = pytest.mark.skipif(
    netbed.available() is not None, reason=f"no multi-host test bed: {netbed.available()}"
)


def longest_stall_s(bg: BackgroundStream) -> float:
    """The longest gap between two token events the client received."""
    times = [t for (kind, _), t in zip(bg.events, bg.at, strict=True) if kind == "token"]
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


@dataclass
class MultiHost:
    bed: NetBed
    workdir: Path
    gateway: Host
    redis_url: str  # as the stack's processes reach it
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    workers: dict[str, Proc] = field(default_factory=dict)  # host name -> its worker
    redis_servers: dict[str, Proc] = field(default_factory=dict)  # host name -> redis-server
    redis_host: str = "redis-a"  # the host of the master (the test's own view)

    @property
    def base_url(self) -> str:
        return f"http://{self.gateway.address('front')}:{GATEWAY_PORT}"

    def client(self, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {USER_KEY}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def redis_at(self, host: str) -> Redis:
        """A client (from the test, not from a stack host) to the redis-server on ``host``."""
        address = self.bed.hosts[host].address("back")
        return Redis(host=address, port=REDIS_PORT, decode_responses=True, socket_timeout=5)

    def add_worker(self, name: str, model: str = "slow-model", **env: str) -> Proc:
        host = self.bed.add_host(name)
        log = self.workdir / f"worker-{name}.log"
        proc = start_worker(
            {**self.env, "WORKER_MODEL": model, **env}, log, launcher=host.command([])
        )
        self.procs.append(proc)
        self.workers[name] = proc
        self.wait_worker(name, model)
        return proc

    def worker_id(self, name: str) -> str:
        return f"{socket.gethostname()}-{self.workers[name].popen.pid}"

    def wait_worker(self, name: str, model: str = "slow-model", timeout_s: float = 60) -> None:
        """Wait until ``name``'s own worker beats (a fresh heartbeat) and the gateway sees it."""
        proc = self.workers[name]
        gw = self.gateway.address("front")
        wait_ready(GATEWAY_PORT, model, timeout_s, proc, host=gw)
        redis = self.redis_at(self.redis_host)
        try:
            key, member = f"mg:workers:{model}", self.worker_id(name)
            wait_for(
                lambda: (redis.zscore(key, member) or 0) > time.time() - 2,
                timeout_s,
                f"worker {name} to beat",
                proc,
            )
        finally:
            redis.close()

    def logs(self) -> str:
        return "\n".join(p.log_text() for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def _start_sentinels(stack: MultiHost, master: Host, names: list[str]) -> list[str]:
    addresses = []
    for name in names:
        host = stack.bed.add_host(name)
        conf = stack.workdir / f"{name}.conf"  # sentinel rewrites its config: writable
        conf.write_text(
            f"port {SENTINEL_PORT}\nbind {host.address()}\n"
            f"sentinel monitor {MASTER_NAME} {master.address()} {REDIS_PORT} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1500\n"
            f"sentinel failover-timeout {MASTER_NAME} 10000\n"
        )
        argv = host.command([redis_server_binary(), str(conf), "--sentinel"])
        proc = spawn(name, argv, {}, stack.workdir / f"{name}.log")
        stack.procs.append(proc)
        address = host.address()
        wait_for(lambda: listening(address, SENTINEL_PORT), 10, f"{name} up", proc)  # noqa: B023
        addresses.append(f"{address}:{SENTINEL_PORT}")
    return addresses


@contextlib.contextmanager
def multihost_stack(
    workdir: Path,
    tiny_dir: Path,
    *,
    workers: tuple[str, ...] = ("w1", "w2"),
    sentinel: bool = False,
    settings: dict[str, str] | None = None,
) -> Iterator[MultiHost]:
    """The stack on its own hosts; every process stopped and the bed removed however it ends.
    With ``sentinel``: hosts ``redis-a`` (master), ``redis-b`` (its replica), ``s1``-``s3``."""
    workdir.mkdir(parents=True, exist_ok=True)
    # slow-model: 200 tokens at 20/s; queue-model: 60 tokens, served only where a test says.
    registry = write_registry(workdir / "models.json", tiny_dir, {"slow-model", "queue-model"})
    with NetBed(("front", "back")) as bed:
        procs: list[Proc] = []
        servers: dict[str, Proc] = {}
        try:
            first = bed.add_host("redis-a")
            servers["redis-a"] = start_redis(
                REDIS_PORT,
                workdir / "redis-a",
                workdir / "redis-a.log",
                appendonly=True,
                host=first.address(),
                launcher=first.command([]),
            )
            redis_url = f"redis://{first.address()}:{REDIS_PORT}/0"
            gateway = bed.add_host("gateway", ("front", "back"))
            stack = MultiHost(bed, workdir, gateway, redis_url, {}, procs, {}, servers)
            procs.extend(servers.values())
            if sentinel:
                second = bed.add_host("redis-b")
                servers["redis-b"] = start_redis(
                    REDIS_PORT,
                    workdir / "redis-b",
                    workdir / "redis-b.log",
                    appendonly=True,
                    host=second.address(),
                    launcher=second.command([]),
                    extra=["--replicaof", first.address(), str(REDIS_PORT)],
                )
                procs.append(servers["redis-b"])
                found = _start_sentinels(stack, first, ["s1", "s2", "s3"])
                stack.redis_url = f"sentinel://{','.join(found)}/0?master={MASTER_NAME}"
            stack.env = stack_env(stack.redis_url, registry, workdir, settings)
            procs.append(
                start_gateway(
                    stack.env,
                    GATEWAY_PORT,
                    workdir / "gateway.log",
                    host=gateway.address("front"),  # its clients' network
                    launcher=gateway.command([]),
                )
            )
            for name in workers:
                stack.add_worker(name)
            yield stack
        finally:
            for p in reversed(procs):
                p.stop()
            print(f"multihost: logs in {workdir}", file=sys.stderr)  # noqa: T201
