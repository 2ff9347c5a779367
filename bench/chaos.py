"""Chaos run: real processes, many concurrent clients, faults on a schedule, then invariants.

    python bench/chaos.py --duration 300 --streams 30 --workers 3 --out result.json

What it does:

1. Starts its own stack in a temporary folder with ``devstack.processes`` (nothing mocked):
   redis-server with an append-only file on a free port, one uvicorn gateway, ``--workers``
   Celery workers of a load-test-engine model (``worker/engines/loadtest.py``: its answer is
   ``tok0 tok1 ... tok{k-1} ``), 4 answers at once each, so ``--streams`` clients exceed the
   capacity now and then (429 ``queue_full``). Logs: ``*.log`` in that folder (printed).
2. Runs ``--streams`` client loops (threads, httpx) for ``--duration`` seconds. Each request
   is one of: ``/medgemma`` streamed (in a conversation, sometimes several turns) or not;
   ``/v1/chat/completions`` streamed (``include_usage``) or not; a stream cancelled mid-way
   (``POST /jobs/{id}/cancel``); a stream dropped and resumed (``GET /jobs/{id}/events`` with
   ``Last-Event-ID``); a stream dropped for good; a body the gateway must refuse (4xx with a
   stable code, no stream). A stream ended by ``gateway_shutdown``, or cut by the network, is
   resumed from its last event id; 429 and 503 are retried with backoff (and counted).
3. Injects a fault every ``--fault-every`` seconds, in turn: SIGKILL a worker, SIGTERM a worker,
   SIGSTOP a worker past its lease and heartbeat TTL (then SIGCONT), restart Redis (same port,
   same data folder), restart the gateway (SIGTERM, a new one on the same port). A killed or
   stopped worker is replaced by a new process.
4. Stops new requests, lets the open ones finish (``--drain``), waits for the stack to go quiet
   (``--quiesce``), then checks and prints:

   * requests accepted (by kind), done, errors (by code), refused (by code), retries; hangs:
     accepted requests that got neither a terminal event nor an HTTP error in time (must be 0);
   * text: every ``done`` answer, both APIs, streamed or not, assembled across resumes, is
     exactly ``tok0 ... tok{k-1} `` with k the completion tokens of its usage, and k is the
     budget when it ended for length; lost and duplicated tokens counted apart (both 0); a
     finished ``/medgemma`` conversation turn is stored exactly as the client got it;
   * event ids strictly increase per job across all its connections (no id twice);
   * every error event and error body carries a ``code``;
   * after quiesce: no unexpired stream slot (``mg:rl:*:streams``), no conversation lock, no
     key under the prefix without a TTL (keys outside it, Celery's, are listed apart).

   The figures go to stdout and, as JSON, to ``--out``. Exit status 0 only if every
   invariant held; each violation is printed.

``tests/test_chaos.py`` runs it for about a minute with every fault once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from httpx_sse import EventSource, ServerSentEvent
from redis import Redis
from redis.exceptions import RedisError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: python bench/chaos.py
    sys.path.insert(0, str(ROOT))

from devstack.processes import (  # noqa: E402
    Proc,
    free_port,
    start_gateway,
    start_redis,
    start_worker,
    wait_for,
    wait_ready,
)

MODEL = "chaos-model"  # load-test engine, no image capability
PREFIX = "mg"
USERS = {"chaos-key-ann": "ann", "chaos-key-ben": "ben", "chaos-key-cy": "cy"}
VERBOSITY_BUDGET = {0: 0.25, 1: 0.5, 2: 1.0, 3: 2.0}  # gateway/api/medgemma/serving.py
CONTEXT_LENGTH = 4096
STOP_S = 7.0  # SIGSTOP lasts longer than the lease (3 s) and the heartbeat TTL (5 s)
REQUEST_DEADLINE_S = 150.0  # an accepted request that has not ended by then hangs
RETRY_FOR_S = 60.0  # how long 429/503/connection failures are retried
STREAM_TIMEOUT = httpx.Timeout(60.0, connect=5.0)  # 60 s of silence on a stream is a hang
BODY_TIMEOUT = httpx.Timeout(REQUEST_DEADLINE_S, connect=5.0)
CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# A 1x1 PNG: a valid image, refused because the model reads no images.
PNG_1X1 = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNg"
    "YGBgAAAABQABpfZFQAAAAABJRU5ErkJggg=="
)

FaultKind = Literal[
    "sigkill_worker", "sigterm_worker", "sigstop_worker", "restart_redis", "restart_gateway"
]
FAULT_KINDS: tuple[FaultKind, ...] = (
    "sigkill_worker",
    "sigterm_worker",
    "sigstop_worker",
    "restart_redis",
    "restart_gateway",
)

Api = Literal["medgemma", "openai"]
# kind -> (api, streamed, what the client does to the stream)
KINDS: dict[str, tuple[Api, bool, str]] = {
    "medgemma_stream": ("medgemma", True, "read"),
    "medgemma_stream_resume": ("medgemma", True, "resume"),
    "medgemma_stream_cancel": ("medgemma", True, "cancel"),
    "medgemma_stream_abandon": ("medgemma", True, "abandon"),
    "medgemma_nonstream": ("medgemma", False, "read"),
    "openai_stream": ("openai", True, "read"),
    "openai_stream_resume": ("openai", True, "resume"),
    "openai_stream_cancel": ("openai", True, "cancel"),
    "openai_nonstream": ("openai", False, "read"),
    "refused": ("medgemma", False, "refused"),
}
KIND_WEIGHTS = {
    "medgemma_stream": 4,
    "medgemma_stream_resume": 2,
    "medgemma_stream_cancel": 1,
    "medgemma_stream_abandon": 1,
    "medgemma_nonstream": 2,
    "openai_stream": 3,
    "openai_stream_resume": 2,
    "openai_stream_cancel": 1,
    "openai_nonstream": 2,
    "refused": 2,
}


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# The stack


@dataclass(frozen=True)
class ChaosConfig:
    duration_s: float = 300.0
    streams: int = 30
    workers: int = 3
    fault_every_s: float = 25.0
    first_fault_s: float = 10.0
    drain_s: float = 90.0
    quiesce_s: float = 30.0
    tokens_per_s: float = 30.0
    max_new_tokens: int = 80
    worker_concurrency: int = 4
    seed: int = 0
    workdir: Path | None = None  # default: a new temporary folder, removed if all held


def registry(config: ChaosConfig) -> list[dict[str, Any]]:
    """models.json: one load-test model without the image capability."""
    return [
        {
            "model_name": MODEL,
            "model_alias": "Chaos load test",
            "description": "load-test engine for bench/chaos.py",
            "endpoint": "/medgemma",
            "in_billing": "0",
            "out_billing": "0",
            "capabilities": {"stream": True, "image": False, "inference": True},
            "controls": {"temperature": True, "verbosity": True, "system_message": True},
            "serving": {
                "path": "unused",
                "engine": "loadtest",
                "loadtest_tokens_per_s": config.tokens_per_s,
                "max_new_tokens": config.max_new_tokens,
                "context_length": CONTEXT_LENGTH,
                # Past this many waiting jobs: 429 queue_full (retried by the clients).
                "max_queue": config.workers * config.worker_concurrency,
            },
        }
    ]


def stack_env(config: ChaosConfig, workdir: Path, redis_url: str) -> dict[str, str]:
    models = workdir / "models.json"
    models.write_text(json.dumps(registry(config), indent=2))
    return {
        "REDIS_URL": redis_url,
        "MODELS_FILE": str(models),
        "GATEWAY_API_KEYS": ",".join(f"{k}:{u}:user" for k, u in USERS.items()),
        "GATEWAY_DEFAULT_MODEL": MODEL,
        "GATEWAY_QUEUE_TIMEOUT_S": "20",
        "GATEWAY_RESUME_GRACE_S": "1.0",
        "GATEWAY_PING_S": "0.5",
        "GATEWAY_IDLE_TIMEOUT_S": "5",
        "GATEWAY_MAX_GENERATION_S": "60",
        "GATEWAY_RATE_LIMIT_RPM": "1000000",
        "GATEWAY_MAX_CONCURRENT_STREAMS": "1000",
        "GATEWAY_AUDIT_LOG": str(workdir / "audit.jsonl"),
        "HEARTBEAT_INTERVAL_S": "0.5",
        "HEARTBEAT_TTL_S": "5",
        "WORKER_DEVICE": "cpu",
        "WORKER_CONCURRENCY": str(config.worker_concurrency),
        "WORKER_COMPILE": "off",
        "WORKER_SHUTDOWN_GRACE_S": "15",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


class ChaosStack:
    """redis-server (AOF), one gateway and the workers, restartable in place."""

    def __init__(self, config: ChaosConfig, workdir: Path) -> None:
        self.workdir = workdir
        self.redis_port = free_port()
        self.port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = stack_env(config, workdir, self.redis_url)
        self.redis_proc: Proc | None = None
        self.gateway: Proc | None = None
        self.workers: list[Proc] = []
        self.retired: list[Proc] = []  # stopped workers and gateways, for their exit codes
        self._started = 0
        self._lock = threading.Lock()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def redis(self) -> Redis:
        return Redis.from_url(self.redis_url, decode_responses=True, socket_timeout=5)

    def start(self, workers: int) -> None:
        self.start_redis()
        self.start_gateway()
        for _ in range(workers):
            self.add_worker()

    def start_redis(self) -> None:
        self.redis_proc = start_redis(
            self.redis_port, self.workdir / "redis", self.workdir / "redis.log", appendonly=True
        )

    def start_gateway(self) -> None:
        self.gateway = start_gateway(self.env, self.port, self.workdir / "gateway.log")

    def add_worker(self) -> Proc:
        with self._lock:
            n = self._started
            self._started += 1
        proc = start_worker({**self.env, "WORKER_MODEL": MODEL}, self.workdir / f"worker-{n}.log")
        wait_ready(self.port, MODEL, 120, proc)
        key = f"{PREFIX}:worker:{socket.gethostname()}-{proc.popen.pid}"
        with contextlib.closing(self.redis()) as r:
            wait_for(lambda: _exists(r, key), 120, "a new worker to announce itself", proc)
        with self._lock:
            self.workers.append(proc)
        return proc

    def dead_workers(self) -> list[Proc]:
        """Workers of the fleet that exited (taken out of it)."""
        with self._lock:
            dead = [w for w in self.workers if not w.alive]
            for proc in dead:
                self.workers.remove(proc)
                self.retired.append(proc)
        return dead

    def pick_worker(self, rng: random.Random) -> Proc:
        with self._lock:
            return rng.choice([w for w in self.workers if w.alive])

    def take_worker(self, rng: random.Random) -> Proc:
        """A live worker, removed from the fleet (the caller replaces it)."""
        with self._lock:
            proc = rng.choice([w for w in self.workers if w.alive])
            self.workers.remove(proc)
            self.retired.append(proc)
        return proc

    def logs(self) -> list[Path]:
        return sorted(self.workdir.glob("*.log"))

    def stop(self) -> None:
        for proc in [*self.workers, *self.retired]:
            with contextlib.suppress(ProcessLookupError):
                proc.signal(signal.SIGCONT)
            proc.stop(20)
        if self.gateway is not None:
            self.gateway.stop(20)
        if self.redis_proc is not None:
            self.redis_proc.stop(20)


def _exists(r: Redis, key: str) -> bool:
    try:
        return bool(r.exists(key))
    except RedisError:
        return False


# --------------------------------------------------------------------------------------------
# Faults


@dataclass
class FaultRecord:
    at_s: float  # since the clients started
    kind: FaultKind
    target: str
    took_s: float = 0.0
    note: str = ""


class FaultInjector(threading.Thread):
    def __init__(
        self, stack: ChaosStack, config: ChaosConfig, started: float, stop: threading.Event
    ) -> None:
        super().__init__(name="faults", daemon=True)
        self._stack = stack
        self._config = config
        self._t0 = started
        self._halt = stop
        self._rng = random.Random(config.seed + 1)
        self.faults: list[FaultRecord] = []
        self.failures: list[str] = []  # a fault that could not be carried out
        self.unexpected_exits: list[str] = []

    def run(self) -> None:
        due = self._config.first_fault_s
        n = 0
        while not self._halt.wait(min(1.0, max(0.0, self._t0 + due - time.monotonic()))):
            self.replace_dead()
            if time.monotonic() < self._t0 + due:
                continue
            kind = FAULT_KINDS[n % len(FAULT_KINDS)]
            n += 1
            at = round(time.monotonic() - self._t0, 1)
            record = FaultRecord(at_s=at, kind=kind, target="")
            t0 = time.monotonic()
            try:
                getattr(self, kind)(record)
            except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                self.failures.append(f"{kind} at {record.at_s}s: {type(exc).__name__}: {exc}")
                log(f"[{record.at_s:6.1f}s] fault {kind} FAILED: {exc}")
            record.took_s = round(time.monotonic() - t0, 1)
            self.faults.append(record)
            log(f"[{at:6.1f}s] fault {kind} {record.target} ({record.took_s}s) {record.note}")
            due += self._config.fault_every_s

    def replace_dead(self, *, replace: bool = True) -> None:
        """A worker that exited on its own (no fault of ours) is a finding; it is replaced,
        as an orchestrator would."""
        for proc in self._stack.dead_workers():
            at = round(time.monotonic() - self._t0, 1)
            what = f"worker pid {proc.popen.pid} exited by itself with {proc.popen.returncode}"
            self.unexpected_exits.append(f"{at}s: {what} (log {proc.log_path})")
            log(f"[{at:6.1f}s] {what}")
            if replace:
                self._stack.add_worker()

    def sigkill_worker(self, record: FaultRecord) -> None:
        proc = self._stack.take_worker(self._rng)
        record.target = f"worker pid {proc.popen.pid}"
        proc.signal(signal.SIGKILL)
        proc.popen.wait(10)
        new = self._stack.add_worker()
        record.note = f"replaced by pid {new.popen.pid}"

    def sigterm_worker(self, record: FaultRecord) -> None:
        proc = self._stack.take_worker(self._rng)
        record.target = f"worker pid {proc.popen.pid}"
        proc.signal(signal.SIGTERM)  # it finishes its answers; its exit code is checked at the end
        new = self._stack.add_worker()
        record.note = f"replaced by pid {new.popen.pid}"

    def sigstop_worker(self, record: FaultRecord) -> None:
        proc = self._stack.pick_worker(self._rng)
        record.target = f"worker pid {proc.popen.pid}"
        proc.signal(signal.SIGSTOP)
        try:
            time.sleep(STOP_S)  # pacing: the lease and the heartbeat lapse meanwhile
        finally:
            proc.signal(signal.SIGCONT)
        record.note = f"stopped {STOP_S:.0f}s, then SIGCONT"

    def restart_redis(self, record: FaultRecord) -> None:
        assert self._stack.redis_proc is not None
        record.target = f"redis pid {self._stack.redis_proc.popen.pid}"
        self._stack.redis_proc.stop(20)
        time.sleep(1.0)  # pacing: an outage clients notice
        self._stack.start_redis()
        record.note = f"back as pid {self._stack.redis_proc.popen.pid}"

    def restart_gateway(self, record: FaultRecord) -> None:
        old = self._stack.gateway
        assert old is not None
        record.target = f"gateway pid {old.popen.pid}"
        code = old.stop(20)
        self._stack.retired.append(old)
        self._stack.start_gateway()
        assert self._stack.gateway is not None
        record.note = f"exit {code}; back as pid {self._stack.gateway.popen.pid}"


# --------------------------------------------------------------------------------------------
# Clients


@dataclass
class RequestRecord:
    """One client request, as the client saw it, across all its connections."""

    kind: str
    api: Api
    stream: bool
    started_s: float
    user: str = ""
    job_id: str = ""
    conversation_id: str | None = None
    budget: int = 0  # the answer's token budget
    accepted: bool = False  # a job was created (a 200, a job id, or a terminal event)
    outcome: str = "running"  # done | error | refused | abandoned | gave_up | hang | client_bug
    code: str | None = None  # of the final error
    http_status: int | None = None
    finish_reason: str | None = None
    completion_tokens: int | None = None
    text: str = ""
    ids: list[int] = field(default_factory=list)
    connections: int = 0
    resumes: int = 0
    shutdowns_seen: int = 0
    cut_streams: int = 0  # connections cut without a terminal event (then resumed)
    cut_bodies: int = 0  # non-stream requests whose connection was cut before an answer
    retries_429: int = 0
    retries_503: int = 0
    connect_retries: int = 0
    conversation_busy: int = 0
    cancel_sent: bool = False
    error_codes: list[str] = field(default_factory=list)  # every error seen, retried included
    errors_without_code: int = 0
    stored_turn: str | None = None  # GET /conversations/{id}'s last answer, after a done
    problems: list[str] = field(default_factory=list)
    ended_s: float = 0.0


@dataclass(frozen=True)
class Frame:
    """One SSE event, either API, reduced to what the checks need. ``seq`` only for frames
    that carry an id of their own (httpx-sse repeats the last id on frames without one)."""

    kind: Literal["token", "done", "finish", "usage", "error", "queued", "role", "end", "other"]
    seq: int | None = None
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: dict[str, Any] | None = None


def _seq(event: ServerSentEvent) -> int | None:
    return int(event.id) if event.id else None


def _is_shutdown(error: dict[str, Any] | None) -> bool:
    return bool(error) and error.get("code") == "gateway_shutdown"  # type: ignore[union-attr]


def seed_frame(event: ServerSentEvent) -> Frame:
    data: dict[str, Any] = json.loads(event.data) if event.data else {}
    if event.event == "token":
        return Frame("token", _seq(event), text=str(data["text"]))
    if event.event == "done":
        usage = data.get("usage") or {}
        reason, tokens = data.get("finish_reason"), usage.get("completion_tokens")
        return Frame("done", _seq(event), finish_reason=reason, completion_tokens=tokens)
    if event.event == "error":
        err = data.get("error")
        err = err if isinstance(err, dict) else {}
        return Frame("error", None if _is_shutdown(err) else _seq(event), error=err)
    if event.event == "queued":
        return Frame("queued")
    return Frame("other")


def openai_frame(event: ServerSentEvent) -> Frame:
    if event.data == "[DONE]":
        return Frame("end")
    data: dict[str, Any] = json.loads(event.data)
    if "error" in data:
        err = data["error"] if isinstance(data["error"], dict) else {}
        return Frame("error", None if _is_shutdown(err) else _seq(event), error=err)
    choices = data.get("choices")
    if choices == [] and data.get("usage"):
        return Frame("usage", completion_tokens=data["usage"].get("completion_tokens"))
    if not choices:
        return Frame("other")
    choice = choices[0]
    delta = choice.get("delta") or {}
    if "role" in delta:
        return Frame("role")
    if choice.get("finish_reason") is not None:
        return Frame("finish", _seq(event), finish_reason=choice["finish_reason"])
    return Frame("token", _seq(event), text=str(delta.get("content") or ""))


class Progress:
    """Applies a job's frames, over all its connections, to its record."""

    def __init__(self, rec: RequestRecord) -> None:
        self.rec = rec
        self.last = 0
        self.tokens = 0
        self.parts: list[str] = []
        self.finished = False  # the OpenAI finish chunk arrived (usage follows)

    def apply(self, frame: Frame) -> Literal["terminal", "shutdown", "more"]:
        rec = self.rec
        if frame.seq is not None:
            if frame.seq <= self.last:
                rec.problems.append(f"event id {frame.seq} after {self.last}")
            self.last = max(self.last, frame.seq)
            rec.ids.append(frame.seq)
        if frame.kind == "token":
            self.parts.append(frame.text)
            self.tokens += 1
        elif frame.kind in ("done", "finish"):
            rec.finish_reason = frame.finish_reason
            rec.completion_tokens = frame.completion_tokens
            if frame.kind == "done":
                return self._end("done")
            self.finished = True
        elif frame.kind == "usage":
            rec.completion_tokens = frame.completion_tokens
            if self.finished:
                return self._end("done")
            rec.problems.append("usage chunk before the finish chunk")
        elif frame.kind == "error":
            note_error(rec, frame.error)
            if _is_shutdown(frame.error):
                rec.shutdowns_seen += 1
                return "shutdown"
            rec.code = (frame.error or {}).get("code")
            return self._end("error")
        elif frame.kind == "end" and self.finished:
            rec.problems.append("stream ended without the usage chunk")
            return self._end("done")
        return "more"

    def _end(self, outcome: str) -> Literal["terminal"]:
        self.rec.outcome = outcome
        self.rec.text = "".join(self.parts)
        return "terminal"


def note_error(rec: RequestRecord, error: object, response: httpx.Response | None = None) -> None:
    code = error.get("code") if isinstance(error, dict) else None
    if isinstance(code, str) and code:
        rec.error_codes.append(code)
        return
    rec.errors_without_code += 1
    if response is None:
        rec.problems.append(f"error event without a code: {error!r}"[:200])
    else:
        rec.problems.append(
            f"HTTP {response.status_code} without an error code: {response.text[:100]!r}"
        )


def error_of(response: httpx.Response) -> dict[str, Any] | None:
    try:
        body = response.json()
    except ValueError:
        return None
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else None


def events_of(source: EventSource) -> Iterator[ServerSentEvent]:
    """The events of a stream, without keep-alive comments."""
    for event in source.iter_sse():
        if event.data or event.event not in ("", "message"):
            yield event


class ClientLoop(threading.Thread):
    """One client: request after request until told to stop."""

    def __init__(
        self, index: int, base_url: str, seed: int, stop: threading.Event, t0: float
    ) -> None:
        super().__init__(name=f"client-{index}", daemon=True)
        self.index = index
        self._base_url = base_url
        self._rng = random.Random(seed * 1000 + index)
        self._halt = stop
        self._t0 = t0
        self.key, self.user = list(USERS.items())[index % len(USERS)]
        self.records: list[RequestRecord] = []
        self.current: RequestRecord | None = None
        self._cid: str | None = None
        self._turns_left = 0
        self._n = 0
        self._max_new_tokens = 0

    def configure(self, max_new_tokens: int) -> None:
        self._max_new_tokens = max_new_tokens

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.Client(base_url=self._base_url, headers=headers, timeout=STREAM_TIMEOUT) as c:
            while not self._halt.is_set():
                kind = self._rng.choices(list(KIND_WEIGHTS), list(KIND_WEIGHTS.values()))[0]
                api, streamed, _ = KINDS[kind]
                rec = RequestRecord(kind, api, streamed, self._now(), user=self.user)
                self.current = rec
                try:
                    self._perform(c, rec)
                except Exception as exc:  # noqa: BLE001 - a bug of this program: reported
                    rec.outcome = "client_bug"
                    rec.problems.append(f"client exception {type(exc).__name__}: {exc}")
                rec.ended_s = self._now()
                self.records.append(rec)
                self.current = None

    def _now(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    # -- one request ---------------------------------------------------------------------

    def _perform(self, c: httpx.Client, rec: RequestRecord) -> None:
        if rec.kind == "refused":
            self._refused(c, rec)
            return
        _, _, action = KINDS[rec.kind]
        self._n += 1
        prompt = f"chaos client {self.index} request {self._n}"
        if rec.api == "medgemma":
            path, body = "/medgemma", self._seed_body(rec, prompt)
        else:
            path, body = "/v1/chat/completions", self._openai_body(rec, prompt)
        deadline = time.monotonic() + REQUEST_DEADLINE_S
        if rec.stream:
            self._stream(c, rec, path, body, action, deadline)
        else:
            self._body(c, rec, path, body, deadline)
        self._after(c, rec)

    def _seed_body(self, rec: RequestRecord, prompt: str) -> dict[str, Any]:
        verbosity = self._rng.randrange(4)
        rec.budget = max(16, int(self._max_new_tokens * VERBOSITY_BUDGET[verbosity]))
        body: dict[str, Any] = {
            "model": MODEL,
            "user_message": [{"type": "text", "text": prompt}],
            "temperature": 0,
            "verbosity": verbosity,
            "stream": rec.stream,
        }
        if self._rng.random() < 0.6:  # in a conversation, sometimes several turns
            if self._cid is None or self._turns_left <= 0:
                self._new_conversation()
            self._turns_left -= 1
            body["conversation_id"] = rec.conversation_id = self._cid
        return body

    def _new_conversation(self) -> None:
        self._cid = f"chaos-{self.index}-{self._n}-{self._rng.randrange(10**6)}"
        self._turns_left = self._rng.randint(1, 4)

    def _openai_body(self, rec: RequestRecord, prompt: str) -> dict[str, Any]:
        rec.budget = self._rng.randint(10, self._max_new_tokens)
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": rec.budget,
            "temperature": 0,
            "stream": rec.stream,
        }
        if rec.stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _after(self, c: httpx.Client, rec: RequestRecord) -> None:
        """Read back the stored turn of a finished conversation turn; pick the next turn's
        conversation."""
        if rec.conversation_id is None:
            return
        if rec.outcome == "done" and rec.finish_reason != "cancelled":
            rec.stored_turn = self._stored_answer(c, rec.conversation_id)
        else:
            self._cid = None  # an unfinished turn may still hold the lock: start afresh

    def _stored_answer(self, c: httpx.Client, cid: str) -> str | None:
        deadline = time.monotonic() + RETRY_FOR_S
        while time.monotonic() < deadline:
            try:
                r = c.get(f"/conversations/{cid}")
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            if r.status_code == 200:
                messages = r.json()["messages"]
                return str(messages[-1]["content"]) if messages else ""
            if r.status_code == 404:
                return "<conversation not found>"
            time.sleep(0.5)
        return None  # could not be read back: counted as unverified

    # -- the retry policy ----------------------------------------------------------------

    def _retry_http(self, rec: RequestRecord, response: httpx.Response, attempt: int) -> bool:
        """True if the request should be sent again (429, 503, 409 busy), after a backoff."""
        err = error_of(response)
        note_error(rec, err, response)
        code = (err or {}).get("code")
        if response.status_code == 409 and code == "conversation_busy":
            rec.conversation_busy += 1
            return False
        if response.status_code not in (429, 503):
            return False
        if response.status_code == 429:
            rec.retries_429 += 1
        else:
            rec.retries_503 += 1
        retry_after = float(response.headers.get("retry-after", "1") or 1)
        self._backoff(attempt, cap=min(retry_after, 5.0))
        return True

    def _backoff(self, attempt: int, cap: float = 5.0) -> None:
        time.sleep(min(cap, 0.2 * 2 ** min(attempt, 5)) * self._rng.uniform(0.5, 1.0))

    def _final_http_error(self, rec: RequestRecord, response: httpx.Response) -> None:
        """A final HTTP error (``_retry_http`` has noted it already)."""
        err = error_of(response) or {}
        rec.http_status = response.status_code
        rec.code = err.get("code")
        rec.outcome = "error" if rec.accepted or response.status_code >= 500 else "refused"
        if response.headers.get("x-job-id"):
            rec.job_id = response.headers["x-job-id"]
            rec.accepted = True
            rec.outcome = "error"

    # -- non-stream ----------------------------------------------------------------------

    def _body(
        self, c: httpx.Client, rec: RequestRecord, path: str, body: dict[str, Any], deadline: float
    ) -> None:
        attempt = 0
        while True:
            attempt += 1
            if time.monotonic() > deadline:
                rec.outcome = "gave_up"
                return
            try:
                rec.connections += 1
                r = c.post(path, json=body, timeout=BODY_TIMEOUT)
            except CONNECT_ERRORS:
                rec.connect_retries += 1
                self._backoff(attempt)
                continue
            except httpx.TimeoutException:
                rec.outcome = "hang"
                rec.problems.append("no answer within the request deadline")
                return
            except httpx.TransportError:
                # Cut before the answer (the gateway went away): no answer, no job id to
                # resume. Sent again, as a client would.
                rec.cut_bodies += 1
                self._backoff(attempt)
                continue
            if r.status_code == 200:
                self._read_body(rec, r)
                return
            if r.status_code == 409 and rec.conversation_id is not None:
                self._retry_http(rec, r, attempt)
                self._switch_conversation(rec, body)
                continue
            if self._retry_http(rec, r, attempt):
                continue
            self._final_http_error(rec, r)
            return

    def _switch_conversation(self, rec: RequestRecord, body: dict[str, Any]) -> None:
        self._new_conversation()
        self._turns_left -= 1
        body["conversation_id"] = rec.conversation_id = self._cid

    def _read_body(self, rec: RequestRecord, r: httpx.Response) -> None:
        data = r.json()
        rec.accepted, rec.outcome, rec.http_status = True, "done", 200
        rec.job_id = r.headers.get("x-job-id", "")
        if rec.api == "medgemma":
            rec.text = str(data["content"])
            rec.finish_reason = data.get("finish_reason")
        else:
            choice = data["choices"][0]
            rec.text = str(choice["message"]["content"] or "")
            rec.finish_reason = choice.get("finish_reason")
        rec.completion_tokens = (data.get("usage") or {}).get("completion_tokens")

    # -- streams -------------------------------------------------------------------------

    def _stream(
        self,
        c: httpx.Client,
        rec: RequestRecord,
        path: str,
        body: dict[str, Any],
        action: str,
        deadline: float,
    ) -> None:
        progress = Progress(rec)
        # The client leaves (resume / abandon) or cancels after this many tokens.
        act_at = self._rng.randint(2, max(3, rec.budget // 2)) if action != "read" else None
        acted = False
        attempt = 0
        while True:
            attempt += 1
            if time.monotonic() > deadline:
                rec.outcome = "hang" if rec.accepted else "gave_up"
                rec.problems.append("no terminal event within the request deadline")
                return
            if rec.job_id:
                method, url, kwargs = (
                    "GET",
                    f"/jobs/{rec.job_id}/events",
                    {"headers": {"Last-Event-ID": str(progress.last)}},
                )
            else:
                # This client comes back for the rest of a stream it left or lost, so it says
                # so: an OpenAI stream is otherwise cancelled the moment its client leaves.
                resumable = {"X-Resumable": "true"} if path.startswith("/v1/") else {}
                method, url, kwargs = "POST", path, {"json": body, "headers": resumable}
            stop_at = None if acted or act_at is None else act_at
            try:
                rec.connections += 1
                end = self._connection(c, rec, progress, method, url, kwargs, attempt, stop_at)
            except CONNECT_ERRORS:
                end = "no_connection"  # the gateway is restarting: try again
            except httpx.TimeoutException:
                rec.outcome = "hang"
                rec.problems.append(f"stream silent for {STREAM_TIMEOUT.read}s")
                return
            except httpx.TransportError:
                end = "cut"
            if end in ("terminal", "refused"):
                return
            if end == "retry_new_conversation":
                self._switch_conversation(rec, body)
                continue
            if end == "acted":
                acted = True
                if action == "abandon":
                    rec.outcome = "abandoned"
                    return
                # resume: come back within the resume grace
                time.sleep(self._rng.uniform(0.0, 0.5))
            elif end == "no_connection":
                rec.connect_retries += 1
                self._backoff(attempt)
            elif end == "cut":
                if rec.job_id:
                    rec.cut_streams += 1
                else:
                    rec.connect_retries += 1
                self._backoff(attempt)
            elif end == "backoff":
                pass  # _retry_http slept already
            if rec.job_id:
                rec.resumes += 1

    def _connection(
        self,
        c: httpx.Client,
        rec: RequestRecord,
        progress: Progress,
        method: str,
        url: str,
        kwargs: dict[str, Any],
        attempt: int,
        stop_at: int | None,
    ) -> str:
        """One connection of a stream. Returns why it ended: terminal, shutdown, acted (the
        client's own move after ``stop_at`` tokens), cut, backoff, refused,
        retry_new_conversation."""
        with c.stream(method, url, **kwargs) as r:
            if r.status_code != 200:
                r.read()
                return self._stream_refused(rec, r, attempt)
            if "text/event-stream" not in r.headers.get("content-type", ""):
                rec.problems.append(f"200 without a stream: {r.headers.get('content-type')}")
                rec.outcome = "error"
                return "terminal"
            rec.accepted = True
            rec.job_id = rec.job_id or r.headers.get("x-job-id", "")
            parse = seed_frame if rec.api == "medgemma" else openai_frame
            for event in events_of(EventSource(r)):
                outcome = progress.apply(parse(event))
                if outcome == "terminal":
                    return "terminal"
                if outcome == "shutdown":
                    return "shutdown"
                if stop_at is not None and progress.tokens >= stop_at:
                    if KINDS[rec.kind][2] == "cancel":
                        self._cancel(c, rec)  # the stream stays open: read it to its done
                        stop_at = None
                        continue
                    return "acted"
        return "cut"  # the server closed the stream without a terminal event

    def _stream_refused(self, rec: RequestRecord, r: httpx.Response, attempt: int) -> str:
        if r.status_code == 409 and rec.conversation_id is not None and not rec.job_id:
            self._retry_http(rec, r, attempt)
            return "retry_new_conversation"
        if self._retry_http(rec, r, attempt):
            return "backoff"
        self._final_http_error(rec, r)
        return "refused"

    def _cancel(self, c: httpx.Client, rec: RequestRecord) -> None:
        if rec.cancel_sent:
            return
        rec.cancel_sent = True
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                r = c.post(f"/jobs/{rec.job_id}/cancel", timeout=10)
            except httpx.TransportError:
                time.sleep(0.5)
                continue
            if r.status_code == 202:
                return
            if r.status_code not in (429, 503):
                note_error(rec, error_of(r), r)
                rec.problems.append(f"cancel answered {r.status_code}")
                return
            time.sleep(0.5)

    # -- refused bodies ------------------------------------------------------------------

    def _refused(self, c: httpx.Client, rec: RequestRecord) -> None:
        name, path, content, expected = self._rng.choice(REFUSED_BODIES)
        rec.kind = f"refused:{name}"
        attempt = 0
        deadline = time.monotonic() + RETRY_FOR_S
        while time.monotonic() < deadline:
            attempt += 1
            try:
                rec.connections += 1
                r = c.post(path, content=content, headers={"Content-Type": "application/json"})
            except httpx.TransportError:
                rec.connect_retries += 1
                self._backoff(attempt)
                continue
            if r.status_code in (429, 503):
                self._retry_http(rec, r, attempt)
                continue
            rec.http_status = r.status_code
            err = error_of(r)
            if "text/event-stream" in r.headers.get("content-type", ""):
                rec.problems.append(f"refused body {name} got a stream")
            if not 400 <= r.status_code < 500:
                rec.problems.append(f"refused body {name} got HTTP {r.status_code}")
            note_error(rec, err, r)
            rec.code = (err or {}).get("code")
            if rec.code != expected:
                rec.problems.append(f"refused body {name}: code {rec.code!r}, not {expected!r}")
            rec.outcome = "refused"
            return
        rec.outcome = "gave_up"


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def _seed(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "user_message": [{"type": "text", "text": "refuse me"}], **fields}


REFUSED_BODIES: list[tuple[str, str, bytes, str]] = [
    ("malformed_json", "/medgemma", b'{"model": "chaos-model", "user_message": [',
     "invalid_request"),
    ("unknown_model", "/medgemma", _json(_seed(model="no-such-model", stream=True)),
     "model_not_found"),
    ("image_to_text_model", "/medgemma", _json(_seed(stream=True, user_message=[
        {"type": "image", "data_url": PNG_1X1}, {"type": "text", "text": "what is this"}])),
     "unsupported_capability"),
    ("bad_temperature", "/medgemma", _json(_seed(temperature="hot", stream=True)),
     "invalid_request"),
    ("dan", "/medgemma", _json(_seed(dan=True)), "unsupported_option"),
    ("openai_n", "/v1/chat/completions", _json({"model": MODEL, "n": 3, "stream": True,
     "messages": [{"role": "user", "content": "x"}]}), "unsupported_option"),
    ("openai_unknown_model", "/v1/chat/completions", _json({"model": "no-such-model",
     "messages": [{"role": "user", "content": "x"}]}), "model_not_found"),
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Checks


_WORD = re.compile(r"tok(\d+)")


@dataclass
class TextCheck:
    checked: int = 0
    exact: int = 0
    lost_tokens: int = 0
    duplicated_tokens: int = 0
    out_of_order: int = 0  # answers whose tokens are all there once but not in order
    usage_mismatch: int = 0  # k != completion tokens in usage
    length_mismatch: int = 0  # finish_reason length but k != the budget
    examples: list[str] = field(default_factory=list)


def expected_text(k: int) -> str:
    return "".join(f"tok{i} " for i in range(k))


def check_text(rec: RequestRecord, out: TextCheck) -> None:
    """The answer of a ``done`` request against the load-test engine's sequence."""
    out.checked += 1
    k = rec.completion_tokens
    words = rec.text.split()
    nums = [int(m.group(1)) for w in words if (m := _WORD.fullmatch(w))]
    problems: list[str] = []
    if k is None:
        problems.append("no completion_tokens in usage")
        k = len(set(nums))
    if rec.text == expected_text(k):
        out.exact += 1
    else:
        seen = Counter(nums)
        lost = sum(1 for i in range(k) if i not in seen)
        dup = sum(n - 1 for n in seen.values() if n > 1)
        out.lost_tokens += lost
        out.duplicated_tokens += dup
        if not lost and not dup and len(words) == k:
            out.out_of_order += 1
        problems.append(f"text mismatch: {lost} lost, {dup} duplicated, {len(words)} words")
    if rec.completion_tokens is not None and len(words) != rec.completion_tokens:
        out.usage_mismatch += 1
        problems.append(f"{len(words)} tokens but usage says {rec.completion_tokens}")
    if rec.finish_reason == "length" and rec.completion_tokens != rec.budget:
        out.length_mismatch += 1
        problems.append(f"finish length after {rec.completion_tokens} of {rec.budget} tokens")
    if problems:
        rec.problems.extend(problems)
        if len(out.examples) < 10:
            out.examples.append(f"{rec.kind} job {rec.job_id}: {'; '.join(problems)}")


@dataclass
class LeakCheck:
    unexpired_slots: int = 0
    slot_keys: list[str] = field(default_factory=list)
    locks: list[str] = field(default_factory=list)
    running_claims: list[str] = field(default_factory=list)
    without_ttl: list[str] = field(default_factory=list)  # under the prefix: none by design
    outside_prefix_without_ttl: list[str] = field(default_factory=list)  # Celery's, reported
    keys_scanned: int = 0
    quiet_after_s: float | None = None  # None: not quiet within the quiesce time


def scan_leaks(redis: Redis) -> LeakCheck:
    out = LeakCheck()
    now = time.time()
    keys = sorted(str(k) for k in redis.scan_iter(match="*", count=1000))
    out.keys_scanned = len(keys)
    pipe = redis.pipeline(transaction=False)
    for k in keys:
        pipe.ttl(k)
    ttls = pipe.execute()
    for key, ttl in zip(keys, ttls, strict=True):
        mine = key.startswith(f"{PREFIX}:")
        if int(ttl) == -1:
            (out.without_ttl if mine else out.outside_prefix_without_ttl).append(key)
        if not mine:
            continue
        if key.startswith(f"{PREFIX}:rl:") and key.endswith(":streams"):
            n = int(redis.zcount(key, now, "+inf"))
            if n:
                out.unexpired_slots += n
                out.slot_keys.append(key)
        elif key.startswith(f"{PREFIX}:conv:") and key.endswith(":lock"):
            job = str(redis.get(key))
            claim = str(redis.get(f"{PREFIX}:job:{job}:claim"))
            events = redis.xlen(f"{PREFIX}:job:{job}:log")
            out.locks.append(f"{key} (job {job}: claim {claim}, {events} events logged)")
        elif key.startswith(f"{PREFIX}:job:") and key.endswith(":claim"):
            value = redis.get(key)
            if value is not None and not str(value).startswith("done:"):
                out.running_claims.append(key)
    return out


def quiesce(redis: Redis, timeout_s: float) -> LeakCheck:
    """Wait (up to ``timeout_s``) until no job runs and nothing is held; the leaks then."""
    t0 = time.monotonic()
    while True:
        try:
            leaks = scan_leaks(redis)
        except RedisError:
            leaks = None
        quiet = leaks is not None and not (
            leaks.unexpired_slots or leaks.locks or leaks.running_claims
        )
        if leaks is not None and (quiet or time.monotonic() - t0 > timeout_s):
            leaks.quiet_after_s = round(time.monotonic() - t0, 1) if quiet else None
            return leaks
        time.sleep(0.5)


@dataclass
class RequestFigures:
    total: int = 0
    accepted: int = 0
    accepted_by_kind: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    done: int = 0
    finish_reasons: dict[str, int] = field(default_factory=dict)
    errors_by_code: dict[str, int] = field(default_factory=dict)  # final errors of requests
    refused_by_code: dict[str, int] = field(default_factory=dict)
    all_error_codes: dict[str, int] = field(default_factory=dict)  # retried ones included
    hangs: int = 0
    gave_up: int = 0
    client_bugs: int = 0
    retries_429: int = 0
    retries_503: int = 0
    connect_retries: int = 0
    conversation_busy: int = 0
    resumes: int = 0
    shutdowns_seen: int = 0
    cut_streams: int = 0
    cut_bodies: int = 0
    cancels: int = 0


@dataclass
class EventFigures:
    jobs_with_ids: int = 0
    ids_not_increasing: int = 0  # jobs with an id not above the one before (across resumes)
    id_gaps: int = 0  # jobs whose ids skip a number: joined frames do (text checks find loss)
    errors_without_code: int = 0


@dataclass
class ConversationFigures:
    checked: int = 0
    matched: int = 0
    mismatched: int = 0
    unverified: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class ProcessFigures:
    sigterm_worker_exits: list[int | None] = field(default_factory=list)
    gateway_exits: list[int | None] = field(default_factory=list)
    fault_failures: list[str] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)  # workers that died by themselves


@dataclass
class ChaosResult:
    config: dict[str, Any]
    workdir: str
    ran_s: float
    faults: list[FaultRecord]
    requests: RequestFigures
    text: TextCheck
    events: EventFigures
    conversations: ConversationFigures
    leaks: LeakCheck
    processes: ProcessFigures
    violations: list[str]
    problem_examples: list[str]

    @property
    def ok(self) -> bool:
        return not self.violations


def request_figures(records: list[RequestRecord]) -> RequestFigures:
    f = RequestFigures(total=len(records))
    by_kind: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for rec in records:
        outcomes[rec.outcome] += 1
        seen.update(rec.error_codes)
        if rec.accepted:
            by_kind[rec.kind] += 1
        if rec.outcome == "done":
            reasons[f"{rec.api}:{rec.finish_reason}"] += 1
        elif rec.outcome == "error":
            errors[str(rec.code)] += 1
        elif rec.outcome == "refused":
            refused[f"{rec.kind.removeprefix('refused:')}:{rec.code}"] += 1
        f.retries_429 += rec.retries_429
        f.retries_503 += rec.retries_503
        f.connect_retries += rec.connect_retries
        f.conversation_busy += rec.conversation_busy
        f.resumes += rec.resumes
        f.shutdowns_seen += rec.shutdowns_seen
        f.cut_streams += rec.cut_streams
        f.cut_bodies += rec.cut_bodies
        f.cancels += rec.cancel_sent
    f.accepted = sum(by_kind.values())
    f.accepted_by_kind = dict(sorted(by_kind.items()))
    f.outcomes = dict(sorted(outcomes.items()))
    f.done = outcomes["done"]
    f.hangs = outcomes["hang"]
    f.gave_up = outcomes["gave_up"]
    f.client_bugs = outcomes["client_bug"]
    f.finish_reasons = dict(sorted(reasons.items()))
    f.errors_by_code = dict(sorted(errors.items()))
    f.refused_by_code = dict(sorted(refused.items()))
    f.all_error_codes = dict(sorted(seen.items()))
    return f


def event_figures(records: list[RequestRecord]) -> EventFigures:
    f = EventFigures()
    for rec in records:
        f.errors_without_code += rec.errors_without_code
        if not rec.ids:
            continue
        f.jobs_with_ids += 1
        pairs = list(zip(rec.ids, rec.ids[1:], strict=False))
        if any(b <= a for a, b in pairs):
            f.ids_not_increasing += 1
        elif rec.ids[0] != 1 or any(b != a + 1 for a, b in pairs):
            f.id_gaps += 1
    return f


def conversation_figures(records: list[RequestRecord]) -> ConversationFigures:
    f = ConversationFigures()
    for rec in records:
        if rec.conversation_id is None or rec.outcome != "done":
            continue
        if rec.finish_reason == "cancelled":
            continue
        f.checked += 1
        if rec.stored_turn is None:
            f.unverified += 1
        elif rec.stored_turn == rec.text:
            f.matched += 1
        else:
            f.mismatched += 1
            rec.problems.append("stored turn differs from the answer the client got")
            if len(f.examples) < 10:
                f.examples.append(
                    f"job {rec.job_id} conversation {rec.conversation_id}: got "
                    f"{len(rec.text.split())} tokens, stored {len(rec.stored_turn.split())}"
                )
    return f


def violations_of(result: ChaosResult) -> list[str]:
    r, t, e, c, lk = result.requests, result.text, result.events, result.conversations, result.leaks
    found: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            found.append(what)

    kinds = {f.kind for f in result.faults}
    need(r.hangs == 0, f"{r.hangs} accepted requests hung (no done, no error)")
    need(r.client_bugs == 0, f"{r.client_bugs} requests failed inside this program (see examples)")
    need(t.lost_tokens == 0, f"{t.lost_tokens} tokens lost from done answers")
    need(t.duplicated_tokens == 0, f"{t.duplicated_tokens} tokens duplicated in done answers")
    need(t.exact == t.checked, f"{t.checked - t.exact} done answers are not tok0..tok(k-1)")
    need(t.usage_mismatch == 0, f"{t.usage_mismatch} answers disagree with their usage")
    need(t.length_mismatch == 0, f"{t.length_mismatch} 'length' answers short of the budget")
    need(e.ids_not_increasing == 0, f"{e.ids_not_increasing} jobs repeated or reordered ids")
    need(e.errors_without_code == 0, f"{e.errors_without_code} errors without a code")
    need(c.mismatched == 0, f"{c.mismatched} stored turns differ from the client's answer")
    need(lk.unexpired_slots == 0, f"{lk.unexpired_slots} stream slots still held after quiesce")
    need(not lk.locks, f"{len(lk.locks)} conversation locks left after quiesce")
    need(not lk.running_claims, f"{len(lk.running_claims)} jobs still claimed after quiesce")
    need(not lk.without_ttl, f"{len(lk.without_ttl)} keys under {PREFIX}: without a TTL")
    need(not result.processes.fault_failures, "a fault could not be injected")
    exits = result.processes.unexpected_exits
    need(not exits, f"{len(exits)} workers exited by themselves: {exits}")
    bad_exit = [x for x in result.processes.sigterm_worker_exits if x != 0]
    need(not bad_exit, f"SIGTERMed workers exited with {bad_exit}, not 0")
    need(r.done > 0, "no request finished at all")
    if result.ran_s >= len(FAULT_KINDS) * result.config["fault_every_s"]:
        need(kinds == set(FAULT_KINDS), f"faults injected: {sorted(kinds)}, not all kinds")
    return found


# --------------------------------------------------------------------------------------------
# The run


def run_chaos(config: ChaosConfig) -> ChaosResult:
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"chaos: stack in {workdir}")
    stack = ChaosStack(config, workdir)
    stop_clients, stop_faults = threading.Event(), threading.Event()
    try:
        stack.start(config.workers)
        log(f"chaos: gateway {stack.base_url}, redis {stack.redis_url}, {config.workers} workers")
        t0 = time.monotonic()
        loops = [
            ClientLoop(i, stack.base_url, config.seed, stop_clients, t0)
            for i in range(config.streams)
        ]
        for loop in loops:
            loop.configure(config.max_new_tokens)
            loop.start()
        injector = FaultInjector(stack, config, t0, stop_faults)
        injector.start()
        stop_clients.wait(config.duration_s)  # pacing: the run's length
        stop_clients.set()
        stop_faults.set()
        injector.join(60)
        log(f"chaos: {time.monotonic() - t0:.0f}s, no new requests; draining")
        records = drain(loops, config.drain_s)
        ran_s = round(time.monotonic() - t0, 1)
        with contextlib.closing(stack.redis()) as redis:
            leaks = quiesce(redis, config.quiesce_s)
        injector.replace_dead(replace=False)  # records any exit since the last look
    finally:
        stack.stop()
    result = summarize(config, workdir, ran_s, records, injector, stack, leaks)
    return result


def drain(loops: list[ClientLoop], drain_s: float) -> list[RequestRecord]:
    """Wait for the open requests (up to ``drain_s``); one still open then hangs."""
    deadline = time.monotonic() + drain_s
    for loop in loops:
        loop.join(max(0.0, deadline - time.monotonic()))
    records: list[RequestRecord] = []
    for loop in loops:
        records.extend(loop.records)
        current = loop.current
        if loop.is_alive() and current is not None:
            current.outcome = "hang" if current.accepted else "gave_up"
            current.problems.append(f"still open {drain_s:.0f}s after the clients stopped")
            records.append(current)
    return records


def summarize(
    config: ChaosConfig,
    workdir: Path,
    ran_s: float,
    records: list[RequestRecord],
    injector: FaultInjector,
    stack: ChaosStack,
    leaks: LeakCheck,
) -> ChaosResult:
    text = TextCheck()
    for rec in records:
        if rec.outcome == "done":
            check_text(rec, text)
    processes = ProcessFigures(
        fault_failures=list(injector.failures), unexpected_exits=list(injector.unexpected_exits)
    )
    for proc in stack.retired:
        code = proc.popen.poll()
        if proc.name == "gateway":
            processes.gateway_exits.append(code)
    for fault in injector.faults:
        if fault.kind == "sigterm_worker":
            pid = int(fault.target.rsplit(" ", 1)[-1]) if fault.target else -1
            for proc in stack.retired:
                if proc.popen.pid == pid:
                    processes.sigterm_worker_exits.append(proc.popen.poll())
    result = ChaosResult(
        config={k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        workdir=str(workdir),
        ran_s=ran_s,
        faults=injector.faults,
        requests=request_figures(records),
        text=text,
        events=event_figures(records),
        conversations=conversation_figures(records),
        leaks=leaks,
        processes=processes,
        violations=[],
        problem_examples=[
            f"{r.kind} job {r.job_id or '-'} ({r.outcome}): {'; '.join(r.problems)}"[:400]
            for r in records
            if r.problems
        ][:30],
    )
    result.violations = violations_of(result)
    return result


def report(result: ChaosResult) -> str:
    r, t, e, c, lk = result.requests, result.text, result.events, result.conversations, result.leaks
    lines = [
        f"chaos run: {result.ran_s}s, stack in {result.workdir}",
        "faults:",
        *(f"  {f.at_s:6.1f}s {f.kind:16} {f.target} ({f.took_s}s) {f.note}" for f in result.faults),
        f"requests: {r.total} sent, {r.accepted} accepted, {r.done} done, {r.hangs} hangs, "
        f"{r.gave_up} gave up",
        f"  accepted by kind: {r.accepted_by_kind}",
        f"  outcomes: {r.outcomes}",
        f"  finish reasons: {r.finish_reasons}",
        f"  final errors by code: {r.errors_by_code}",
        f"  refused by body:code: {r.refused_by_code}",
        f"  every error code seen (retried ones too): {r.all_error_codes}",
        f"  retries: 429 x{r.retries_429}, 503 x{r.retries_503}, connection x{r.connect_retries}, "
        f"409 busy x{r.conversation_busy}",
        f"  resumes {r.resumes} (gateway_shutdown seen {r.shutdowns_seen}, cut streams "
        f"{r.cut_streams}), cancels {r.cancels}, non-stream bodies cut {r.cut_bodies}",
        f"text: {t.checked} done answers checked, {t.exact} exact; lost tokens {t.lost_tokens}, "
        f"duplicated {t.duplicated_tokens}, out of order {t.out_of_order}, usage mismatches "
        f"{t.usage_mismatch}, short 'length' answers {t.length_mismatch}",
        f"event ids: {e.jobs_with_ids} jobs; not increasing {e.ids_not_increasing}; with gaps "
        f"{e.id_gaps} (informational); errors without code {e.errors_without_code}",
        f"conversations: {c.checked} stored turns checked, {c.matched} match, {c.mismatched} "
        f"differ, {c.unverified} unverified",
        f"leaks after quiesce (quiet after {lk.quiet_after_s} s, {lk.keys_scanned} keys): "
        f"unexpired stream slots {lk.unexpired_slots} {lk.slot_keys[:5]}, locks {len(lk.locks)} "
        f"{lk.locks[:5]}, running claims {len(lk.running_claims)}, keys under {PREFIX}: without "
        f"TTL {len(lk.without_ttl)} {lk.without_ttl[:10]}",
        f"  outside the prefix without TTL (Celery's, not checked): "
        f"{lk.outside_prefix_without_ttl[:10]}",
        f"processes: SIGTERMed worker exits {result.processes.sigterm_worker_exits}, gateway "
        f"exits {result.processes.gateway_exits}, workers that exited by themselves "
        f"{result.processes.unexpected_exits}",
    ]
    if t.examples or c.examples:
        lines += ["text/conversation examples:", *(f"  {x}" for x in t.examples + c.examples)]
    if result.problem_examples:
        lines += ["requests with problems (first 30):"]
        lines += [f"  {x}" for x in result.problem_examples]
    if result.violations:
        lines += ["INVARIANTS VIOLATED:", *(f"  - {v}" for v in result.violations)]
    else:
        lines.append("all invariants held")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[ChaosConfig, Path | None, bool]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of traffic")
    p.add_argument("--streams", type=int, default=30, help="concurrent client loops")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--fault-every", type=float, default=25.0, help="seconds between faults")
    p.add_argument("--first-fault", type=float, default=10.0, help="seconds before the first")
    p.add_argument("--drain", type=float, default=90.0, help="seconds for open requests to end")
    p.add_argument("--quiesce", type=float, default=30.0, help="seconds for the stack to settle")
    p.add_argument("--tokens-per-s", type=float, default=30.0)
    p.add_argument("--max-new-tokens", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the stack's folder (logs)")
    a = p.parse_args(argv)
    config = ChaosConfig(
        duration_s=a.duration,
        streams=a.streams,
        workers=a.workers,
        fault_every_s=a.fault_every,
        first_fault_s=a.first_fault,
        drain_s=a.drain,
        quiesce_s=a.quiesce,
        tokens_per_s=a.tokens_per_s,
        max_new_tokens=a.max_new_tokens,
        seed=a.seed,
        workdir=a.workdir,
    )
    return config, a.out, a.keep


def main(argv: list[str] | None = None) -> int:
    config, out, keep = parse_args(argv)
    result = run_chaos(config)
    log(report(result))
    if out is not None:
        payload = {**asdict(result), "ok": result.ok}
        out.write_text(json.dumps(payload, indent=2, default=str))
        log(f"figures written to {out}")
    if result.ok and not keep and config.workdir is None:
        shutil.rmtree(result.workdir, ignore_errors=True)
    elif not result.ok:
        log(f"logs kept in {result.workdir}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
