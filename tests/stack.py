"""A real stack for integration tests: redis-server, Celery worker processes, uvicorn gateway.

Processes log to files in a temporary folder; tests read them (e.g. to check that no patient
text is ever logged). Nothing is mocked: the worker loads a tiny random-weight Gemma 3 from
disk exactly as it would load MedGemma 4B.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
from httpx_sse import EventSource, ServerSentEvent, connect_sse

from devstack.processes import (
    Proc,
    free_port,
    start_gateway,
    start_redis,
    start_worker,
    wait_for,
    wait_ready,
)
from shared.redis_url import sync_redis

# The fields of the seed's models.json entries, which GET /models must keep.
SEED_FIELDS = {
    "model_name",
    "model_alias",
    "description",
    "endpoint",
    "in_billing",
    "out_billing",
    "capabilities",
    "controls",
    "admin",
}

USER_KEY = "test-key-alice"
OTHER_KEY = "test-key-bob"
ADMIN_KEY = "test-key-admin"
SERVICE_KEY = "test-key-webui"  # a front end that names its end users
TASKS_KEY = "test-key-tasks"  # a front end's key for its background tasks
API_KEYS = (
    f"{USER_KEY}:alice:user,{OTHER_KEY}:bob:user,{ADMIN_KEY}:ops:admin,"
    f"{SERVICE_KEY}:webui:service,{TASKS_KEY}:tasks:service:background"
)


#: Debian's chromium, driven by Playwright's Python package in the browser tests (Playwright's
#: own browser download is never used), and how they launch it.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def tiny_entry(name: str, path: str, **serving: Any) -> dict[str, Any]:
    return {
        "model_name": name,
        "model_alias": name.replace("-", " ").title(),
        "description": "tiny random-weight Gemma 3 for tests",
        "endpoint": "/medgemma",
        "in_billing": "2",
        "out_billing": "10",
        "capabilities": {
            "stream": True,
            "image": True,
            "inference": True,
            "search": False,
            "deep_research": False,
            "mcp": False,
        },
        "controls": {
            "temperature": True,
            "reason": False,
            "verbosity": True,
            "system_message": True,
        },
        "admin": False,
        "serving": {
            "path": path,
            "quantization": "none",
            "dtype": "float32",
            "context_length": 512,
            "max_new_tokens": 24,
            **serving,
        },
    }


def write_registry(dest: Path, tiny_dir: Path, only: set[str] | None = None) -> Path:
    models = [
        tiny_entry("tiny-gemma", str(tiny_dir)),
        tiny_entry("ghost-model", str(tiny_dir)),  # no worker ever serves it
        tiny_entry("tiny-batch", str(tiny_dir)),  # same weights, a batching worker
        {**tiny_entry("secret-model", str(tiny_dir)), "admin": True},
        # The load-test engine: 20 tokens/s, no model; long, predictable generations.
        tiny_entry(
            "slow-start-model",
            "unused",
            engine="loadtest",
            loadtest_tokens_per_s=20,
            loadtest_first_token_s=3.0,
            max_new_tokens=20,
            context_length=4096,
        ),
        tiny_entry(
            "queue-model",
            "unused",
            engine="loadtest",
            loadtest_tokens_per_s=20,
            max_new_tokens=60,
            max_queue=2,
            context_length=4096,
        ),
        tiny_entry(
            "slow-model",
            "unused",
            engine="loadtest",
            loadtest_tokens_per_s=20,
            max_new_tokens=200,
            context_length=4096,
        ),
        # Faster than one Redis round trip per token: the worker joins tokens into events.
        tiny_entry(
            "fast-model",
            "unused",
            engine="loadtest",
            loadtest_tokens_per_s=20000,
            max_new_tokens=2000,
            context_length=4096,
        ),
    ]
    models.append(json.loads((Path(__file__).parent.parent / "models.json").read_text())[1])
    if only is not None:
        models = [m for m in models if m["model_name"] in only]
    dest.write_text(json.dumps(models, indent=2))
    return dest


@dataclass
class Stack:
    workdir: Path
    redis_url: str
    port: int
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = USER_KEY, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def add_worker(self, model: str = "tiny-gemma", **env: str) -> Proc:
        n = sum(p.name == "worker" for p in self.procs)
        log = self.workdir / f"worker-{model}-{n}.log"
        proc = start_worker({**self.env, "WORKER_MODEL": model, **env}, log)
        self.procs.append(proc)
        wait_ready(self.port, model, 180, proc)
        # Other workers may already serve the model: wait for this one's own heartbeat.
        redis = sync_redis(self.redis_url)
        key = f"mg:worker:{socket.gethostname()}-{proc.popen.pid}"
        wait_for(lambda: bool(redis.exists(key)), 180, f"worker {model} to announce itself", proc)
        return proc

    def logs(self) -> str:
        return "\n".join(p.log_text() for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


def stack_env(
    redis_url: str, registry: Path, workdir: Path, settings: dict[str, str] | None = None
) -> dict[str, str]:
    """The settings every test stack's gateway and workers run with (``settings`` on top)."""
    return {
        "REDIS_URL": redis_url,
        "MODELS_FILE": str(registry),
        "GATEWAY_API_KEYS": API_KEYS,
        "GATEWAY_DEFAULT_MODEL": "tiny-gemma",
        "GATEWAY_QUEUE_TIMEOUT_S": "30",
        "GATEWAY_RESUME_GRACE_S": "1.0",
        "GATEWAY_PING_S": "0.5",  # keep-alives inside every test stream
        "GATEWAY_IDLE_TIMEOUT_S": "3",
        "GATEWAY_RATE_LIMIT_RPM": "100000",
        "GATEWAY_MAX_CONCURRENT_STREAMS": "100",
        "GATEWAY_AUDIT_LOG": str(workdir / "audit.jsonl"),
        "HEARTBEAT_INTERVAL_S": "0.5",
        "HEARTBEAT_TTL_S": "5",
        "WORKER_DEVICE": "cpu",
        # One job at a time and eager decoding unless a test asks otherwise: the tiny model
        # compiles in tens of seconds, and most tests are about the stack, not the engine.
        "WORKER_CONCURRENCY": "1",
        "WORKER_COMPILE": "off",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(settings or {}),
    }


def start_stack(
    workdir: Path,
    tiny_dir: Path,
    *,
    workers: int = 1,
    only: set[str] | None = None,
    redis_url: str | None = None,
    settings: dict[str, str] | None = None,
    appendonly: bool = False,
) -> Stack:
    """``appendonly``: Redis persists every write (as in compose), so a test can restart it."""
    workdir.mkdir(parents=True, exist_ok=True)
    registry = write_registry(workdir / "models.json", tiny_dir, only)
    procs: list[Proc] = []
    redis_url = redis_url or os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        rport = free_port()
        procs.append(
            start_redis(rport, workdir / "redis", workdir / "redis.log", appendonly=appendonly)
        )
        redis_url = f"redis://127.0.0.1:{rport}/0"
    env = stack_env(redis_url, registry, workdir, settings)
    port = free_port()
    stack = Stack(workdir=workdir, redis_url=redis_url, port=port, env=env, procs=procs)
    try:
        procs.append(start_gateway(env, port, workdir / "gateway.log"))
        for _ in range(workers):
            stack.add_worker()
    except BaseException:
        stack.stop()
        raise
    return stack


@contextlib.contextmanager
def lone_redis(workdir: Path) -> Iterator[str]:
    """A redis-server of its own on a free port, data in ``workdir``; yields its URL."""
    port = free_port()
    proc = start_redis(port, workdir)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


@contextlib.contextmanager
def slow_model_stack(
    workdir: Path,
    tiny_dir: Path,
    *,
    workers: int = 1,
    only: set[str] | None = None,
    settings: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """A stack of a test module's own, for failure cases: Redis, the gateway and ``workers``
    workers of the 20 tokens/s ``slow-model`` (load-test engine). Stopped however it ends."""
    stack = start_stack(
        workdir, tiny_dir, workers=0, only=only or {"slow-model"}, settings=settings
    )
    try:
        for _ in range(workers):
            stack.add_worker("slow-model")
        yield stack
    finally:
        stack.stop()


def events_of(source: EventSource) -> Iterator[ServerSentEvent]:
    """The events of a stream, without keep-alive comments (which, per the SSE spec, a
    browser never dispatches; httpx-sse yields them as empty events)."""
    for event in source.iter_sse():
        if event.data or event.event not in ("", "message"):
            yield event


def sse_events(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> tuple[httpx.Response, list[ServerSentEvent]]:
    """POST and collect every SSE event until the server closes the stream."""
    with connect_sse(client, "POST", path, json=body) as source:
        events = list(events_of(source))
        return source.response, events


def ask(text: str, model: str = "tiny-gemma", **fields: Any) -> dict[str, Any]:
    return {
        "model": model,
        "user_message": [{"type": "text", "text": text}],
        "temperature": 0,
        **fields,
    }


def tokens(events: list[ServerSentEvent]) -> str:
    return "".join(json.loads(e.data)["text"] for e in events if e.event == "token")


def iter_stack_logs(stack: Stack) -> Iterator[str]:
    yield from stack.logs().splitlines()


@dataclass
class BackgroundStream:
    """A /medgemma stream read on its own thread: ``events`` fill up as (event, data) pairs,
    ``ids`` with their SSE ids ("" for an event without one)."""

    events: list[tuple[str, str]] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    at: list[float] = field(default_factory=list)  # each event's arrival (time.monotonic())
    job_id: str = ""
    _seen: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None

    def wait_for_events(self, n: int, timeout_s: float) -> bool:
        """True once ``n`` events have arrived (within ``timeout_s``)."""
        with self._seen:
            return self._seen.wait_for(lambda: len(self.events) >= n, timeout_s)

    def join(self, timeout_s: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def finished(s: BackgroundStream, timeout_s: float) -> dict[str, Any]:
    """The ``done`` event's data of a stream, once it has ended (within ``timeout_s``)."""
    s.join(timeout_s)
    assert not s.is_alive(), f"the stream did not end within {timeout_s}s"
    kind, data = s.events[-1]
    assert kind == "done", s.events[-1]
    done: dict[str, Any] = json.loads(data)
    return done


def streamed_text(s: BackgroundStream) -> str:
    return "".join(json.loads(d)["text"] for kind, d in s.events if kind == "token")


class HasClient(Protocol):
    def client(self) -> httpx.Client: ...


def stream_in_background(stack: HasClient, body: dict[str, Any]) -> BackgroundStream:
    """POST ``body`` to /medgemma and read its events on a thread until the stream ends."""
    bg = BackgroundStream()

    def read() -> None:
        with stack.client() as c, connect_sse(c, "POST", "/medgemma", json=body) as src:
            bg.job_id = src.response.headers.get("x-job-id", "")
            for e in events_of(src):
                with bg._seen:
                    bg.events.append((e.event, e.data))
                    bg.ids.append(e.id or "")
                    bg.at.append(time.monotonic())
                    bg._seen.notify_all()

    bg._thread = threading.Thread(target=read)
    bg._thread.start()
    return bg
