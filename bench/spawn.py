"""The stack a benchmark starts for itself, and the record of where it ran.

:class:`SpawnedStack`: redis-server, ``--workers`` workers and the gateway on free ports of
127.0.0.1 (:mod:`devstack.processes`), a registry written for the run, an API key made for it.
:func:`machine_info` and :func:`source_info` go into every report.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.entries import ROOT
from devstack import processes
from shared.registry import Registry

DEFAULT_SPAWN_KEY = "bench-local-key"

# What SpawnedStack and bench.entries.resolve_model read from the arguments, with
# bench/serve.py's defaults: for a program whose own options name only some of them.
STACK_DEFAULTS: dict[str, Any] = {
    "api_key": DEFAULT_SPAWN_KEY,
    "workers": 1,
    "worker_concurrency": 1,
    "worker_batch_tokens": None,
    "worker_env": [],
    "device": "cpu",
    "ready_timeout": 300.0,
    "max_tokens": None,
    "models_file": str(ROOT / "models.json"),
    "dtype": "float32",  # (an entry made for a folder)
    "context_length": 2048,
    "loadtest_tokens_per_s": 50.0,
    "loadtest_first_token_ms": 0.0,
}


def with_stack_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with :data:`STACK_DEFAULTS` for every stack option it does not have."""
    for name, value in STACK_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, copy.copy(value))
    return args


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """``--worker-env NAME=VALUE`` pairs."""
    out: dict[str, str] = {}
    for pair in args.worker_env:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("WORKER_"):
            raise SystemExit(f"--worker-env takes WORKER_NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


class SpawnedStack:
    """redis-server + ``--workers`` workers + the gateway on free local ports, logs in
    ``workdir``."""

    def __init__(self, registry: Registry, model: str, workdir: Path, args: argparse.Namespace):
        self.workdir = workdir
        self.model = model
        self.procs: list[processes.Proc] = []
        rport = processes.free_port()
        self.procs.append(processes.start_redis(rport, workdir / "redis", workdir / "redis.log"))
        self.port = processes.free_port()
        self.redis_url = f"redis://127.0.0.1:{rport}/0"
        self.env = {
            "REDIS_URL": self.redis_url,
            "MODELS_FILE": str(registry.source),
            "GATEWAY_API_KEYS": f"{args.api_key}:bench:user",
            "GATEWAY_DEFAULT_MODEL": model,
            "WORKER_MODEL": model,
            "WORKER_DEVICE": args.device,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # The limiter runs (its Redis calls are part of the path measured) but never
            # refuses: the benchmark is one user sending the load of many.
            "GATEWAY_RATE_LIMIT_RPM": "100000000",
            "GATEWAY_MAX_CONCURRENT_STREAMS": "1000000",
            "WORKER_CONCURRENCY": str(args.worker_concurrency),
        }
        if args.worker_batch_tokens:
            self.env["WORKER_BATCH_TOKENS"] = str(args.worker_batch_tokens)
        self.env.update(worker_env(args))
        self.gateway = processes.start_gateway(self.env, self.port, workdir / "gateway.log")
        self.procs.append(self.gateway)
        self.workers: list[processes.Proc] = []
        for n in range(args.workers):
            log = workdir / ("worker.log" if n == 0 else f"worker{n}.log")
            worker = processes.start_worker({**self.env, "WORKER_ID": f"bench-worker-{n}"}, log)
            self.procs.append(worker)
            self.workers.append(worker)
        self.redis = self.procs[0]
        processes.wait_ready(self.port, model, args.ready_timeout, self.workers[0])
        if args.workers > 1:
            wait_workers(self.redis_url, model, args.workers, args.ready_timeout)

    def named_pids(self) -> dict[str, int]:
        out = {"redis": self.redis.popen.pid, "gateway": self.gateway.popen.pid}
        out.update({f"worker{n}": w.popen.pid for n, w in enumerate(self.workers)})
        return out

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def wait_workers(redis_url: str, model: str, count: int, timeout_s: float) -> None:
    """Wait until ``count`` workers of ``model`` send heartbeats."""
    import redis

    from shared.keys import Keys

    client = redis.Redis.from_url(redis_url)
    key = Keys("mg").workers(model)
    try:
        processes.wait_for(
            lambda: int(client.zcount(key, time.time() - 10, "+inf")) >= count,
            timeout_s,
            f"{count} workers of {model}",
        )
    finally:
        client.close()


@contextlib.contextmanager
def temp_workdir(keep: bool) -> Iterator[Path]:
    """A new temporary folder for the run's registry and logs; removed afterwards unless
    ``keep`` (then its path is printed)."""
    path = Path(tempfile.mkdtemp(prefix="medgemma-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs and registry kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def machine_info() -> dict[str, Any]:
    def pkg(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": pkg("torch"),
        "transformers": pkg("transformers"),
        "httpx": pkg("httpx"),
        "celery": pkg("celery"),
        "redis_py": pkg("redis"),
        "uvicorn": pkg("uvicorn"),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    if shutil.which("lscpu"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
            info["lscpu_head"] = out.splitlines()[:10]
    return info


def source_info() -> dict[str, Any]:
    """The commit measured and how many files differ from it (read-only git commands)."""

    def git(*argv: str) -> str | None:
        try:
            run = subprocess.run(
                ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return run.stdout if run.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": head.strip() if head else None,
        "modified_tracked_files": len(status.splitlines()) if status is not None else None,
    }
