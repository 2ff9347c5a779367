"""Benchmark the serving stack over HTTP, in the spirit of ``vllm bench serve``.

Usage (from the repository root)::

    # against a stack that is already running (make demo, docker compose, ...)
    .venv/bin/python bench/serve.py --base-url http://127.0.0.1:8000 --api-key demo-key \\
        --model smollm2-demo --concurrency 1 --num-requests 20 --out /tmp/serve.json

    # start redis + one worker + the gateway for the run, measure the engine in-process first
    .venv/bin/python bench/serve.py --spawn-stack demo --engine-baseline demo \\
        --num-requests 20 --max-tokens 64 --out docs/bench/overhead_demo_cpu.json

What is measured, and how:

* **Load.** ``--concurrency N`` alone is a closed loop: N clients, each sends its next request
  when the previous answer has ended. ``--request-rate R`` is an open loop: requests start at
  Poisson arrival times (exponential gaps, mean ``1/R`` s, seeded), whether or not earlier ones
  have finished; ``--concurrency`` then caps how many are in flight. ``--warmup`` requests run
  one at a time before the measured ones and are reported apart.
* **Requests.** Every request is the same ``POST /medgemma`` with ``stream: true``,
  ``temperature: 0`` (greedy, so every answer is the same) and a synthetic prompt of exactly
  ``--prompt-words`` words. Each request opens a new conversation (no ``conversation_id``). The
  API has no ``max_tokens`` field: the answer budget is the model's ``max_new_tokens`` in
  models.json scaled by ``verbosity`` (0: 1/4, 1: 1/2, 2: 1x, 3: 2x). ``--max-tokens`` therefore
  only acts where this program writes the registry entry itself (``--spawn-stack``, or a model
  folder given to ``--engine-baseline``); against a running stack, set ``max_new_tokens`` there.
* **Per request**, with :func:`time.perf_counter` in this process: TTFT = request sent to the
  first ``token`` event received; ITL = the gaps between consecutive ``token`` events (one event
  may carry more than one token: the worker sends text as soon as it is printable); E2E =
  request sent to the ``done``/``error`` event; completion tokens from the ``done`` usage;
  TPOT = (E2E - TTFT) / (completion tokens - 1); errors by their ``code`` (the body of a non-200
  answer, or the ``error`` event), or ``client_<Exception>`` when the HTTP client fails.
* **Summary**: p50/p90/p99 (and mean) of TTFT, ITL, TPOT and E2E over the successful requests;
  request throughput and output token throughput = completed requests and completion tokens
  divided by the wall time from the first request sent to the last answer ended.
* **Engine baseline** (``--engine-baseline``): before any HTTP load, the same model is loaded
  in this process with :func:`worker.loader.load_model` and the worker's engine, and
  ``Engine.generate`` runs ``--baseline-runs`` times (after ``--baseline-warmup``) with exactly
  the messages and sampling the gateway builds for the request (the gateway's own
  :func:`gateway.medgemma.serving.sampling_for`). Its TTFT is the call to ``generate`` to the
  first ``on_text`` callback, i.e. the moment the worker would publish the first ``token``
  event; the engine's internal ``first_token_s`` (prompt already encoded, first token id out)
  is reported too. The model is then freed, and only then is the stack started or loaded, so
  the two measurements never share the CPU. The overhead is stack TTFT p50 - engine TTFT p50
  (ms) and their ratio; the same for E2E, and whether the greedy answers were identical.
* **Spawned stack** (``--spawn-stack``): redis-server, one worker and the gateway on free ports
  of 127.0.0.1 (:mod:`devstack.processes`), a temporary models.json, and an API key made for
  the run. Afterwards the gateway's and the worker's logs (millisecond timestamps, one clock)
  split each request's TTFT: request sent -> job enqueued -> worker started -> first token id
  (the engine's own timing) -> first ``token`` event at the client.
* **Noise.** Every phase records how much CPU the machine, this program with the stack it
  started, and everything else ("foreign") used; more than 5% foreign CPU prints a warning.
  ``--quiet-cpu PCT`` waits (bounded by ``--quiet-timeout``) for a quiet machine before each
  phase.

Everything runs on this machine, so on a small CPU the client, the gateway, Redis and the worker
compete for the same cores: the figures are the cost of the stack *on that machine*, not of the
network or of a GPU deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the project's packages importable
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
from shared.protocol import ChatMessage, SamplingParams, TextPart  # noqa: E402
from shared.registry import ModelEntry, Registry, load_registry  # noqa: E402

if TYPE_CHECKING:
    from gateway.medgemma.protocol import MedGemmaRequest

DEMO_MODEL = "smollm2-demo"
LOCAL_MODEL = "bench-local"
LOADTEST = "loadtest"  # --spawn-stack / --engine-baseline value
LOADTEST_MODEL = "bench-loadtest"
DEFAULT_SPAWN_KEY = "bench-local-key"
PERCENTILES = (50.0, 90.0, 99.0)
FOREIGN_CPU_WARN_PCT = 5.0

# Clinical and everyday words; the prompt cycles through them to reach --prompt-words words.
_WORDS = (
    "the patient is a 54 year old man with chest pain shortness of breath and a dry cough "
    "for three days blood pressure is 140 over 90 heart rate 98 temperature 38.2 the lungs "
    "are clear on both sides there is no pleural effusion the heart size is normal laboratory "
    "results show white blood cells 12.4 and C-reactive protein 85 he takes metformin and "
    "aspirin and is allergic to penicillin"
).split()


# --- the request ---------------------------------------------------------------------------


def synthetic_prompt(words: int) -> str:
    """A fixed prompt of exactly ``words`` words: a question, then filler from :data:`_WORDS`."""
    head = "Summarize these notes:".split()
    body = [_WORDS[i % len(_WORDS)] for i in range(max(0, words - len(head)))]
    return " ".join([*head, *body][: max(1, words)])


def request_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    if args.api == "openai":
        return openai_body(args, prompt)
    return medgemma_body(args, prompt)


def medgemma_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "user_message": [{"type": "text", "text": prompt}],
        "temperature": 0,
        "stream": True,
    }
    if args.verbosity is not None:
        body["verbosity"] = args.verbosity
    if args.system_message:
        body["system_message"] = args.system_message
    return body


def openai_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    """The same turn as an OpenAI chat completion (any OpenAI-compatible server)."""
    messages: list[dict[str, str]] = []
    if args.system_message:
        messages.append({"role": "system", "content": args.system_message})
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {
        "model": args.model,
        "messages": messages,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.max_tokens:
        body["max_tokens"] = args.max_tokens
    return body


def engine_inputs(
    body: dict[str, Any], entry: ModelEntry
) -> tuple[list[ChatMessage], SamplingParams]:
    """The messages and sampling the gateway builds for ``body`` (the gateway's own code)."""
    from gateway.medgemma.protocol import MedGemmaRequest
    from gateway.medgemma.serving import sampling_for

    req: MedGemmaRequest = MedGemmaRequest.model_validate({**body, "model": entry.model_name})
    sampling, hint = sampling_for(req, entry)
    # As gateway.medgemma.serving._system: the request's system message, else the model's
    # default one, then the verbosity hint. The report checks the result: the stack's prompt
    # token count (from the done usage) must equal the engine's.
    default = getattr(entry.serving, "default_system_message", None)
    system = "\n\n".join(p for p in (req.system_message or default or "", hint) if p)
    messages: list[ChatMessage] = []
    if system:
        messages.append(ChatMessage(role="system", content=[TextPart(text=system)]))
    messages.append(
        ChatMessage(role="user", content=[TextPart(text=p["text"]) for p in body["user_message"]])
    )
    return messages, sampling


# --- statistics ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def describe(values: Sequence[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """n, mean, p50/p90/p99, min, max of ``values`` times ``scale``."""
    scaled = [v * scale for v in values]
    out: dict[str, float | int | None] = {
        "n": len(scaled),
        "mean": statistics.fmean(scaled) if scaled else None,
        "min": min(scaled) if scaled else None,
        "max": max(scaled) if scaled else None,
    }
    for q in PERCENTILES:
        out[f"p{q:g}"] = percentile(scaled, q)
    return out


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# --- one streamed request ------------------------------------------------------------------


@dataclass
class RequestResult:
    index: int
    started_s: float  # since the start of the measured phase
    sent_at: float = 0.0  # wall clock (time.time()), to line up with the stack's log lines
    ok: bool = False
    status: int | None = None
    job_id: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    token_events: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error_code: str | None = None
    text_sha256: str | None = None
    text_chars: int = 0

    @property
    def tpot_s(self) -> float | None:
        if self.e2e_s is None or self.ttft_s is None or not self.completion_tokens:
            return None
        if self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


def _error_code(payload: str, fallback: str) -> str:
    try:
        code = json.loads(payload)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return fallback
    return str(code)


@dataclass
class _Timing:
    """One request's clock and text while its events arrive."""

    res: RequestResult
    sent: float
    parts: list[str] = field(default_factory=list)
    last_token: float | None = None

    def text(self, now: float, text: str) -> None:
        if self.last_token is None:
            self.res.ttft_s = now - self.sent
        else:
            self.res.itl_s.append(now - self.last_token)
        self.last_token = now
        self.res.token_events += 1
        self.parts.append(text)

    def end(self, now: float, *, ok: bool, error: str | None = None) -> bool:
        self.res.e2e_s = now - self.sent
        self.res.ok = ok
        self.res.error_code = None if ok else (self.res.error_code or error)
        return True


# An API's event handler: reads one SSE event into the timing; True once the answer ended.
EventHandler = Callable[[ServerSentEvent, float, _Timing], bool]


def _seed_event(event: ServerSentEvent, now: float, t: _Timing) -> bool:
    """/medgemma: ``token``, then ``done`` (usage) or ``error``."""
    if event.event == "token":
        t.text(now, json.loads(event.data)["text"])
    elif event.event == "done":
        data = json.loads(event.data)
        usage = data.get("usage") or {}
        t.res.prompt_tokens = usage.get("prompt_tokens")
        t.res.completion_tokens = usage.get("completion_tokens")
        t.res.finish_reason = data.get("finish_reason")
        return t.end(now, ok=True)
    elif event.event == "error":
        return t.end(now, ok=False, error=_error_code(event.data, "error_event"))
    return False


def _openai_event(event: ServerSentEvent, now: float, t: _Timing) -> bool:
    """/v1/chat/completions: content deltas, a usage chunk, ``[DONE]``."""
    if event.data == "[DONE]":
        ok = t.res.error_code is None and t.res.finish_reason is not None
        return t.end(now, ok=ok, error="no_finish_reason")
    chunk = json.loads(event.data)
    if "error" in chunk:
        t.res.error_code = _error_code(event.data, "error_chunk")
        return False
    if chunk.get("usage"):
        t.res.prompt_tokens = chunk["usage"].get("prompt_tokens")
        t.res.completion_tokens = chunk["usage"].get("completion_tokens")
    for choice in chunk.get("choices") or ():
        text = (choice.get("delta") or {}).get("content")
        if text:
            t.text(now, text)
        if choice.get("finish_reason"):
            t.res.finish_reason = choice["finish_reason"]
    return False


async def _timed_sse(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    index: int,
    t0: float,
    handle: EventHandler,
) -> RequestResult:
    sent = time.perf_counter()
    t = _Timing(RequestResult(index=index, started_s=sent - t0, sent_at=time.time()), sent)
    res = t.res
    try:
        async with aconnect_sse(client, "POST", path, json=body) as source:
            resp = source.response
            res.status = resp.status_code
            res.job_id = resp.headers.get("X-Job-Id")
            if resp.status_code != 200:
                payload = (await resp.aread()).decode(errors="replace")
                t.end(time.perf_counter(), ok=False)
                res.error_code = _error_code(payload, f"http_{resp.status_code}")
                return res
            ended = False
            async for event in source.aiter_sse():
                if handle(event, time.perf_counter(), t):
                    ended = True
                    break
            if not ended:
                # The stream closed without its terminal event. (transformers serve sends no
                # [DONE]: there a finish_reason is the end.)
                ok = handle is _openai_event and res.error_code is None and bool(res.finish_reason)
                t.end(time.perf_counter(), ok=ok, error="no_terminal_event")
    except (httpx.HTTPError, OSError, ValueError) as exc:
        t.end(time.perf_counter(), ok=False, error=f"client_{type(exc).__name__}")
    text = "".join(t.parts)
    res.text_chars = len(text)
    res.text_sha256 = hashlib.sha256(text.encode()).hexdigest()
    return res


async def stream_one(
    client: httpx.AsyncClient, body: dict[str, Any], index: int, t0: float
) -> RequestResult:
    """POST /medgemma and time its SSE events."""
    return await _timed_sse(client, "/medgemma", body, index, t0, _seed_event)


async def stream_openai(
    client: httpx.AsyncClient, body: dict[str, Any], index: int, t0: float
) -> RequestResult:
    """POST /v1/chat/completions (stream, usage) and time its chunks: the same figures as
    :func:`stream_one`, from any OpenAI-compatible server (ours, ``transformers serve``)."""
    return await _timed_sse(client, "/v1/chat/completions", body, index, t0, _openai_event)


_TOKEN_EVENT = b"event: token"
_DONE_EVENT = b"event: done"
_ERROR_EVENT = b"event: error"
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


async def stream_counted(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], index: int, t0: float
) -> RequestResult:
    """POST /medgemma and count its events per network read, without parsing them.

    For relay capacity (``--lean-client``): thousands of streams and tens of thousands of
    events per second from one client process. aiohttp's C parser undoes the HTTP framing;
    each read is searched for event names only. Events that arrive in one read share its
    time (their gaps count as 0, as with the parsing client). A token event may carry several
    tokens (joined when the worker or the gateway fell behind), so completion tokens are read
    from the ``done`` event's usage, the one event that is parsed; the text is not checked."""
    sent = time.perf_counter()
    res = RequestResult(index=index, started_s=sent - t0, sent_at=time.time())
    last: float | None = None
    tail = b""
    ending = b""  # from the terminal event on: its usage names the completion tokens
    try:
        async with session.post(url, json=body) as resp:
            res.status = resp.status
            res.job_id = resp.headers.get("X-Job-Id")
            if resp.status != 200:
                res.error_code = _error_code(await resp.text(), f"http_{resp.status}")
                res.e2e_s = time.perf_counter() - sent
                return res
            async for chunk in resp.content.iter_any():
                now = time.perf_counter()
                data = tail + chunk
                n = data.count(_TOKEN_EVENT)
                if n:
                    if last is None:
                        res.ttft_s = now - sent
                    else:
                        res.itl_s.append(now - last)
                    res.itl_s.extend([0.0] * (n - 1))
                    last = now
                    res.token_events += n
                if res.e2e_s is not None:
                    ending += chunk
                elif _DONE_EVENT in data or _ERROR_EVENT in data:
                    res.e2e_s = now - sent
                    res.ok = _DONE_EVENT in data
                    res.error_code = None if res.ok else "error_event"
                    ending = data[data.find(_DONE_EVENT if res.ok else _ERROR_EVENT) :]
                    # Read on to the end of the response, so the connection is reused.
                # An event name may straddle two reads: keep fewer bytes than a whole one.
                tail = data[-(len(_TOKEN_EVENT) - 1) :]
            if res.e2e_s is not None:
                used = _COMPLETION_TOKENS.search(ending)
                res.completion_tokens = int(used.group(1)) if used else res.token_events
                return res
            res.error_code = "no_terminal_event"
    except (aiohttp.ClientError, OSError, ValueError) as exc:
        res.ok = False
        res.error_code = f"client_{type(exc).__name__}"
    res.e2e_s = time.perf_counter() - sent
    return res


async def run_load(
    args: argparse.Namespace, body: dict[str, Any]
) -> tuple[list[RequestResult], list[RequestResult], float]:
    """Warm-up requests, then the measured ones. Returns (warmup, measured, duration_s)."""
    conc = args.concurrency or (1 if args.request_rate is None else args.num_requests)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=conc + 1, max_keepalive_connections=conc + 1)
    headers = {"Authorization": f"Bearer {args.api_key}"}
    if args.lean_client:
        return await _run_load_counted(args, body, conc, headers)
    stream = stream_openai if args.api == "openai" else stream_one
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        warm: list[RequestResult] = []
        for i in range(args.warmup):
            warm.append(await stream(client, body, -1 - i, time.perf_counter()))
        results: list[RequestResult] = []
        t0 = time.perf_counter()
        if args.request_rate is None:
            counter = iter(range(args.num_requests))

            async def closed_client() -> None:
                for i in counter:
                    results.append(await stream(client, body, i, t0))

            jobs = [asyncio.create_task(closed_client()) for _ in range(conc)]
        else:
            sem = asyncio.Semaphore(conc)
            rng = random.Random(args.seed)

            async def open_request(i: int) -> None:
                async with sem:
                    results.append(await stream(client, body, i, t0))

            jobs = []
            for i in range(args.num_requests):
                jobs.append(asyncio.create_task(open_request(i)))
                if i < args.num_requests - 1:
                    await asyncio.sleep(rng.expovariate(args.request_rate))
        try:
            await asyncio.wait_for(asyncio.gather(*jobs), args.max_duration)
        except TimeoutError:
            print(f"stopped after --max-duration {args.max_duration:g} s", file=sys.stderr)
        duration = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return warm, results, duration


async def _run_load_counted(
    args: argparse.Namespace, body: dict[str, Any], conc: int, headers: dict[str, str]
) -> tuple[list[RequestResult], list[RequestResult], float]:
    """:func:`run_load` with :func:`stream_counted` (closed loop only)."""
    url = f"{args.base_url}/medgemma"
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, connect=10.0)
    connector = aiohttp.TCPConnector(limit=conc + 1)
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=connector
    ) as session:
        warm = [
            await stream_counted(session, url, body, -1 - i, time.perf_counter())
            for i in range(args.warmup)
        ]
        results: list[RequestResult] = []
        t0 = time.perf_counter()
        counter = iter(range(args.num_requests))

        async def client(delay: float) -> None:
            await asyncio.sleep(delay)
            for i in counter:
                results.append(await stream_counted(session, url, body, i, t0))

        # Clients start spread over --ramp-up seconds, so a thousand streams do not all
        # arrive in the same millisecond.
        jobs = [asyncio.create_task(client(args.ramp_up * k / conc)) for k in range(conc)]
        try:
            await asyncio.wait_for(asyncio.gather(*jobs), args.max_duration)
        except TimeoutError:
            print(f"stopped after --max-duration {args.max_duration:g} s", file=sys.stderr)
        duration = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return warm, results, duration


MAX_SAVED_GAPS = 20_000


def _compact(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-request rows for the report; past MAX_SAVED_GAPS inter-token gaps in all, the gaps
    are left out (the summary's percentiles were computed from all of them)."""
    if sum(len(r["itl_s"]) for r in rows) <= MAX_SAVED_GAPS:
        return rows
    return [{**r, "itl_s": None} for r in rows]


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    errors = Counter(r.error_code for r in results if not r.ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(errors),
        "duration_s": duration_s,
        "request_throughput_rps": len(ok) / duration_s if duration_s > 0 else None,
        "output_token_throughput_tok_s": out_tokens / duration_s if duration_s > 0 else None,
        "completion_tokens_total": out_tokens,
        "completion_tokens": describe([float(r.completion_tokens or 0) for r in ok]),
        "token_events_per_request": describe([float(r.token_events) for r in ok]),
        "prompt_tokens": ok[0].prompt_tokens if ok else None,
        "ttft_ms": describe(ttft, 1000.0),
        "itl_ms": describe(itl, 1000.0),
        "tpot_ms": describe(tpot, 1000.0),
        "e2e_ms": describe(e2e, 1000.0),
        "distinct_answers": len({r.text_sha256 for r in ok}),
    }


# --- the engine in-process -----------------------------------------------------------------


def _mark(marks: list[float], _text: str) -> None:
    marks.append(time.perf_counter())


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """``--worker-env NAME=VALUE`` pairs."""
    out: dict[str, str] = {}
    for pair in args.worker_env:
        name, sep, value = pair.partition("=")
        if not sep or not name.startswith("WORKER_"):
            raise SystemExit(f"--worker-env takes WORKER_NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def engine_baseline(
    entry: ModelEntry,
    registry: Registry,
    messages: Sequence[ChatMessage],
    sampling: SamplingParams,
    *,
    runs: int,
    warmup: int,
    device: str,
    compile: bool,
) -> dict[str, Any]:
    """Load the model here, run the worker's engine ``warmup + runs`` times (one job at a time,
    so on the single-stream path), free the model."""
    from worker.torch_env import prepare_cpu_compile

    prepare_cpu_compile(device, compile)  # before torch: as the worker does
    import torch

    from worker.engines.base import GenerationEngine
    from worker.engines.factory import EngineOptions, build_engine
    from worker.loader import load_model

    engine: GenerationEngine
    if entry.serving.engine == "loadtest":
        from worker.engines.loadtest import LoadTestEngine

        engine = LoadTestEngine(
            entry.serving.loadtest_tokens_per_s,
            first_token_s=entry.serving.loadtest_first_token_s,
        )
        info: dict[str, Any] = {"device": "none", "model_class": "LoadTestEngine"}
    else:
        loaded = load_model(entry, registry, device=device)
        engine = build_engine(
            loaded,
            context_length=entry.serving.context_length,
            options=EngineOptions(concurrency=1, compile=compile),
        )
        engine.warmup()
        info = {
            "device": loaded.device,
            "dtype": loaded.dtype,
            "quantization": loaded.quantization,
            "load_s": loaded.load_seconds,
            "model_class": type(loaded.model).__name__,
        }
        del loaded
    info["torch_threads"] = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    for i in range(warmup + runs):
        marks: list[float] = []
        t0 = time.perf_counter()
        result = engine.generate(messages, sampling, on_text=partial(_mark, marks))
        t1 = time.perf_counter()
        n = result.completion_tokens
        ttft = marks[0] - t0 if marks else None
        rows.append(
            {
                "warmup": i < warmup,
                "ttft_s": ttft,
                "engine_first_token_s": result.first_token_s,
                "e2e_s": t1 - t0,
                "itl_s": [b - a for a, b in zip(marks, marks[1:], strict=False)],
                "token_events": len(marks),
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": n,
                "finish_reason": result.finish_reason,
                "path": result.path,
                "tpot_s": (t1 - t0 - ttft) / (n - 1) if ttft is not None and n > 1 else None,
                "text_sha256": hashlib.sha256(result.text.encode()).hexdigest(),
                "text_chars": len(result.text),
            }
        )
    engine.close()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    measured = [r for r in rows if not r["warmup"]]

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in measured if r[key] is not None]

    completion = col("completion_tokens")
    e2e = col("e2e_s")
    return {
        **info,
        "runs": runs,
        "warmup": warmup,
        "ttft_ms": describe(col("ttft_s"), 1000.0),
        "engine_first_token_ms": describe(col("engine_first_token_s"), 1000.0),
        "itl_ms": describe([g for r in measured for g in r["itl_s"]], 1000.0),
        "tpot_ms": describe(col("tpot_s"), 1000.0),
        "e2e_ms": describe(e2e, 1000.0),
        "completion_tokens": describe(completion),
        "prompt_tokens": measured[0]["prompt_tokens"] if measured else None,
        "output_tok_s": sum(completion) / sum(e2e) if e2e and sum(e2e) > 0 else None,
        "distinct_answers": len({r["text_sha256"] for r in measured}),
        "per_run": rows,
    }


# --- models.json entries and the spawned stack ---------------------------------------------


def _entry(name: str, alias: str, description: str, serving: dict[str, Any]) -> dict[str, Any]:
    """A text-only /medgemma registry entry with every control on."""
    return {
        "model_name": name,
        "model_alias": alias,
        "description": description,
        "endpoint": "/medgemma",
        "capabilities": {"stream": True, "image": False, "inference": True},
        "controls": {
            "temperature": True,
            "reason": False,
            "verbosity": True,
            "system_message": True,
        },
        "serving": serving,
    }


def local_entry(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A registry entry serving the model folder (or .gguf file) at ``path``."""
    serving = {
        "path": str(path.resolve()),
        "quantization": "none",
        "dtype": args.dtype,
        "context_length": args.context_length,
        "max_new_tokens": args.max_tokens or 256,
    }
    return _entry(LOCAL_MODEL, "Benchmark model", f"bench/serve.py: {path.name}", serving)


def loadtest_entry(args: argparse.Namespace) -> dict[str, Any]:
    """An entry on the load-test engine: no model, ``--loadtest-tokens-per-s`` per stream."""
    serving = {
        "engine": "loadtest",
        "loadtest_tokens_per_s": args.loadtest_tokens_per_s,
        "loadtest_first_token_s": args.loadtest_first_token_ms / 1000.0,
        "context_length": args.context_length,
        "max_new_tokens": args.max_tokens or 64,
        "max_queue": 100_000,
    }
    description = "bench/serve.py: the load-test engine, fixed-rate tokens"
    return _entry(LOADTEST_MODEL, "Load test (no model)", description, serving)


def resolve_model(value: str, args: argparse.Namespace, workdir: Path) -> tuple[Registry, str]:
    """A registry and the entry name for ``value``: ``demo``, ``loadtest``, a model folder,
    or a name.

    ``demo``, ``loadtest`` and a folder are written to ``workdir/models.json`` (with
    ``--max-tokens`` as the entry's ``max_new_tokens``); a name is looked up in ``--models-file``.
    """
    dest = workdir / "models.json"
    if value == LOADTEST:
        raw = loadtest_entry(args)
        name = LOADTEST_MODEL
    elif value == "demo":
        repo = json.loads((ROOT / "models.json").read_text(encoding="utf-8"))
        raw = next(m for m in repo if m["model_name"] == DEMO_MODEL)
        if args.max_tokens:
            raw["serving"]["max_new_tokens"] = args.max_tokens
        name = DEMO_MODEL
    elif Path(value).exists():
        raw = local_entry(Path(value), args)
        name = LOCAL_MODEL
    else:
        registry = load_registry(Path(args.models_file))
        if registry.get(value) is None:
            raise SystemExit(f"{value!r} is neither a path nor a model in {args.models_file}")
        return registry, value
    workdir.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps([raw], indent=2), encoding="utf-8")
    return load_registry(dest), name


class SpawnedStack:
    """redis-server + ``--workers`` workers + the gateway on free local ports, logs in
    ``workdir``."""

    def __init__(self, registry: Registry, model: str, workdir: Path, args: argparse.Namespace):
        self.workdir = workdir
        self.model = model
        self.procs: list[Proc] = []
        rport = free_port()
        self.procs.append(start_redis(rport, workdir / "redis", workdir / "redis.log"))
        self.port = free_port()
        self.env = {
            "REDIS_URL": f"redis://127.0.0.1:{rport}/0",
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
        self.gateway = start_gateway(self.env, self.port, workdir / "gateway.log")
        self.procs.append(self.gateway)
        self.workers: list[Proc] = []
        for n in range(args.workers):
            log = workdir / ("worker.log" if n == 0 else f"worker{n}.log")
            worker = start_worker({**self.env, "WORKER_ID": f"bench-worker-{n}"}, log)
            self.procs.append(worker)
            self.workers.append(worker)
        self.redis = self.procs[0]
        wait_ready(self.port, model, args.ready_timeout, self.workers[0])
        if args.workers > 1:
            wait_workers(self.env["REDIS_URL"], model, args.workers, args.ready_timeout)

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

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def worker_logs(self) -> str:
        """Every worker's log, one after the other (each line names its job)."""
        return "".join(Path(str(w.log_path)).read_text(errors="replace") for w in self.workers)


def wait_workers(redis_url: str, model: str, count: int, timeout_s: float) -> None:
    """Wait until ``count`` workers of ``model`` send heartbeats."""
    import redis

    from shared.keys import Keys

    client = redis.Redis.from_url(redis_url)
    key = Keys("mg").workers(model)
    try:
        wait_for(
            lambda: int(client.zcount(key, time.time() - 10, "+inf")) >= count,
            timeout_s,
            f"{count} workers of {model}",
        )
    finally:
        client.close()


_STARTED = re.compile(r"job (\S+) started after ([0-9.]+)s in queue")
_FINISHED = re.compile(
    r"job (\S+) finished: \w+, \d+ prompt \+ \d+ completion tokens, first token ([0-9.]+)s"
)


_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
_ENQUEUED_AT = re.compile(_STAMP + r"INFO gateway\.jobs \d+ job (\S+) enqueued on", re.M)
_STARTED_AT = re.compile(_STAMP + r"INFO worker\.runner \d+ job (\S+) started after", re.M)


def _stamp(text: str) -> float:
    """A log line's time (shared.logs: local time, millisecond resolution) as Unix time."""
    base, ms = text.split(",")
    return time.mktime(time.strptime(base, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000.0


def worker_breakdown(
    worker_log: str, gateway_log: str, results: Sequence[RequestResult]
) -> dict[str, Any]:
    """Split each request's TTFT along its way through the stack, from the processes' logs.

    Log times have millisecond resolution and every process runs on this machine (one clock),
    so each stage is good to about a millisecond.
    """
    queued = {m[1]: float(m[2]) for m in _STARTED.finditer(worker_log)}
    first = {m[1]: float(m[2]) for m in _FINISHED.finditer(worker_log)}
    enqueued = {m[2]: _stamp(m[1]) for m in _ENQUEUED_AT.finditer(gateway_log)}
    started = {m[2]: _stamp(m[1]) for m in _STARTED_AT.finditer(worker_log)}
    stages: dict[str, list[float]] = {
        "queue_wait": [],
        "client_to_enqueued": [],
        "enqueued_to_worker_start": [],
        "engine_first_token": [],
        "after_first_token": [],
    }
    for r in results:
        jid = r.job_id
        if not (r.ok and jid and r.ttft_s is not None and jid in queued and jid in first):
            continue
        stages["queue_wait"].append(queued[jid])
        stages["engine_first_token"].append(first[jid])
        if jid in enqueued and jid in started:
            stages["client_to_enqueued"].append(enqueued[jid] - r.sent_at)
            stages["enqueued_to_worker_start"].append(started[jid] - enqueued[jid])
            stages["after_first_token"].append(r.ttft_s - (started[jid] - r.sent_at) - first[jid])
    return {
        "matched_jobs": len(stages["queue_wait"]),
        **{f"{k}_ms": describe(v, 1000.0) for k, v in stages.items()},
        "note": "queue_wait: the job's enqueued_at (set by the gateway before it checks for "
        "workers, subscribes and sends the task) to the worker starting it, as the worker logs "
        "it. The other stages add up to the TTFT: client_to_enqueued = request sent to the "
        "gateway's 'enqueued' log line (HTTP, auth, validation, conversation lock and history, "
        "worker check, pub/sub subscribe, Celery send); enqueued_to_worker_start = that line to "
        "the worker's 'started' line (Celery delivery through Redis); engine_first_token = "
        "model.generate() start to the first token id (worker log); after_first_token = the "
        "rest (prompt encoding, Redis publish, relay, SSE, client).",
    }


# --- report --------------------------------------------------------------------------------


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


def _cpu_times() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy(sample_s: float = 1.0) -> float | None:
    """Percent of all cores busy over ``sample_s`` seconds (every process, this one too)."""
    try:
        busy0, total0 = _cpu_times()
        time.sleep(sample_s)
        busy1, total1 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    return 100.0 * (busy1 - busy0) / max(1, total1 - total0)


def _proc_jiffies(pid: int) -> int:
    """utime + stime of one process (and its reaped children: none here), in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


class CpuMeter:
    """CPU used during a phase by the machine, by our processes, and by everything else.

    "Foreign" CPU (other users' processes on a shared machine) competes with the stack and the
    engine for the same cores and skews both; the report shows it per phase so a reader can
    tell a clean run from a noisy one. Percentages are of all cores (100 = every core busy).
    """

    def __init__(self, pids: Sequence[int], names: Sequence[str] = ()) -> None:
        self.pids = list(pids)
        self.names = list(names)
        self.t0 = time.perf_counter()
        self.busy0, self.total0 = _cpu_times()
        self.own0 = {pid: _proc_jiffies(pid) for pid in self.pids}

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.t0
        busy1, total1 = _cpu_times()
        used = {pid: max(0, _proc_jiffies(pid) - self.own0[pid]) for pid in self.pids}
        own = sum(used.values())
        total = max(1, total1 - self.total0)
        busy = 100.0 * (busy1 - self.busy0) / total
        ours = 100.0 * own / total
        out: dict[str, Any] = {
            "wall_s": wall,
            "machine_busy_pct": busy,
            "own_busy_pct": ours,
            "foreign_busy_pct": max(0.0, busy - ours),
        }
        if self.names:  # per process, in cores (1.0 = one core busy the whole phase)
            hz = os.sysconf("SC_CLK_TCK")
            out["cores_used"] = {
                name: used[pid] / hz / wall if wall > 0 else None
                for name, pid in zip(self.names, self.pids, strict=True)
            }
        return out


def memory_kib(pid: int) -> dict[str, int]:
    """Resident memory of a process now (VmRSS) and at its peak (VmHWM), in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def wait_quiet(max_busy: float | None, timeout_s: float, what: str) -> None:
    """Wait (bounded) until the machine's CPUs are at most ``max_busy`` percent busy."""
    if max_busy is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        busy = cpu_busy(3.0)
        if busy is None or busy <= max_busy:
            return
        if time.monotonic() > deadline:
            print(f"CPU still {busy:.0f}% busy before {what}; going on", file=sys.stderr)
            return
        time.sleep(2)


def _fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def print_table(title: str, rows: dict[str, dict[str, Any]]) -> None:
    cols = ["n", "mean", "p50", "p90", "p99", "min", "max"]
    print(f"\n{title}")
    print(f"  {'metric':<24}" + "".join(f"{c:>10}" for c in cols))
    for name, stats in rows.items():
        print(f"  {name:<24}" + "".join(f"{_fmt(stats.get(c)):>10}" for c in cols))


def print_report(report: dict[str, Any]) -> None:
    s = report["stack"]["summary"]
    cpu = report["cpu"]
    phases = [k for k in ("baseline", "load") if k in cpu]
    print(
        "\n== CPU, % of all cores (machine / ours / foreign): "
        + "  ".join(
            f"{k} {cpu[k]['machine_busy_pct']:.0f}/{cpu[k]['own_busy_pct']:.0f}/"
            f"{cpu[k]['foreign_busy_pct']:.0f}"
            for k in phases
        )
    )
    cores = cpu.get("load", {}).get("cores_used")
    if cores:
        print(
            "  load phase, cores used per process: "
            + "  ".join(f"{name} {v:.2f}" for name, v in cores.items() if v is not None)
        )
    per_token = cpu.get("load", {}).get("cpu_us_per_token")
    if per_token:
        print(
            "  CPU per token received, us: "
            + "  ".join(f"{name} {v:.1f}" for name, v in per_token.items())
        )
    mem = report.get("gateway_memory_kib")
    if mem:
        print(
            f"  gateway memory: {mem.get('VmRSS', 0) / 1024:.0f} MiB now, "
            f"{mem.get('VmHWM', 0) / 1024:.0f} MiB peak"
        )
    if any(cpu[k]["foreign_busy_pct"] > FOREIGN_CPU_WARN_PCT for k in phases):
        print(
            f"  WARNING: other processes used more than {FOREIGN_CPU_WARN_PCT:g}% of the CPU "
            "during a phase; the figures below are skewed. Run again on a quiet machine."
        )
    print(
        f"\n== stack: {report['config']['base_url']}  model {report['config']['model']}  "
        f"({report['config']['mode']})"
    )
    print(
        f"  completed {s['completed']}/{s['requests']}  failed {s['failed']}  errors "
        f"{s['errors'] or '{}'}  duration {s['duration_s']:.2f} s"
    )
    print(
        f"  request throughput {_fmt(s['request_throughput_rps'], 3)} req/s  output "
        f"{_fmt(s['output_token_throughput_tok_s'], 1)} tok/s  prompt tokens "
        f"{s['prompt_tokens']}  completion tokens p50 {_fmt(s['completion_tokens']['p50'])}"
    )
    print_table(
        "  stack latency (ms)",
        {k: s[f"{k}_ms"] for k in ("ttft", "itl", "tpot", "e2e")},
    )
    base = report.get("engine_baseline")
    if base:
        print(
            f"\n== engine in-process: {base['model_class']} on {base['device']} "
            f"({base.get('dtype', '-')}), {base['runs']} runs after {base['warmup']} warm-up, "
            f"{base['torch_threads']} torch threads"
        )
        print_table(
            "  engine latency (ms)",
            {
                "ttft (first on_text)": base["ttft_ms"],
                "first token id": base["engine_first_token_ms"],
                "itl": base["itl_ms"],
                "tpot": base["tpot_ms"],
                "e2e": base["e2e_ms"],
            },
        )
    bd = report.get("worker_breakdown")
    if bd:
        print_table(
            f"  stack TTFT along the way, from the stack's logs ({bd['matched_jobs']} jobs, ms)",
            {
                "queue wait (worker)": bd["queue_wait_ms"],
                "client -> enqueued": bd["client_to_enqueued_ms"],
                "enqueued -> worker start": bd["enqueued_to_worker_start_ms"],
                "engine first token": bd["engine_first_token_ms"],
                "after first token": bd["after_first_token_ms"],
            },
        )
    ov = report.get("overhead")
    if ov:
        closed_one = (
            report["config"]["request_rate"] is None and (report["config"]["concurrency"] or 1) == 1
        )
        print(
            "\n== overhead (medians of this run)"
            + ("" if closed_one else ": NOT like for like, the engine ran one request at a time")
        )
        for key in ("ttft", "e2e"):
            print(
                f"  {key.upper():<5} stack p50 {_fmt(ov[f'{key}_stack_p50_ms'])} ms  engine p50 "
                f"{_fmt(ov[f'{key}_engine_p50_ms'])} ms  overhead "
                f"{_fmt(ov[f'{key}_overhead_ms'])} ms  ratio {_fmt(ov[f'{key}_ratio'], 2)}x  "
                f"(min vs min: {_fmt(ov[f'{key}_overhead_min_ms'])} ms)"
            )
        print(
            f"  same prompt tokens: {ov['same_prompt']} ({ov['prompt_tokens_stack']} / "
            f"{ov['prompt_tokens_engine']})  same greedy answer: {ov['same_answer']}  "
            "completion tokens "
            f"stack {ov['completion_tokens_stack_p50']} / engine "
            f"{ov['completion_tokens_engine_p50']}"
        )
    hf = report.get("transformers_serve")
    if hf:
        t = hf["summary"]
        print(
            f"\n== transformers serve, same load (continuous batching "
            f"{hf['continuous_batching']}): completed {t['completed']}/{t['requests']}  "
            f"errors {t['errors'] or '{}'}  output {_fmt(t['output_token_throughput_tok_s'])} "
            f"tok/s  cores: "
            + "  ".join(f"{k} {v:.2f}" for k, v in hf["cpu"].get("cores_used", {}).items())
        )
        print_table(
            "  transformers serve latency (ms)", {k: t[f"{k}_ms"] for k in ("ttft", "itl", "e2e")}
        )
        vs = report["vs_transformers_serve"]
        print(
            f"  stack / transformers serve: output tok/s {_fmt(vs['throughput_ratio'], 2)}x, "
            f"TTFT p50 {_fmt(vs['ttft_p50_ratio'], 2)}x, E2E p50 {_fmt(vs['e2e_p50_ratio'], 2)}x;"
            f" prompt tokens {vs['prompt_tokens']}, completion p50 "
            f"{vs['completion_tokens_p50']}, same greedy answer {vs['same_answer']}"
        )


def overhead(
    stack: dict[str, Any], base: dict[str, Any], results: Sequence[RequestResult]
) -> dict[str, Any]:
    """Stack minus engine, and stack / engine, for the p50 TTFT and E2E of this run."""
    out: dict[str, Any] = {}
    for key in ("ttft", "e2e"):
        s, e = stack[f"{key}_ms"]["p50"], base[f"{key}_ms"]["p50"]
        out[f"{key}_stack_p50_ms"] = s
        out[f"{key}_engine_p50_ms"] = e
        out[f"{key}_overhead_ms"] = s - e if s is not None and e is not None else None
        out[f"{key}_ratio"] = s / e if s is not None and e else None
        # The fastest request of each side: a check that is robust to bursts of foreign load.
        smin, emin = stack[f"{key}_ms"]["min"], base[f"{key}_ms"]["min"]
        out[f"{key}_overhead_min_ms"] = (
            smin - emin if smin is not None and emin is not None else None
        )
    engine_answers = {r["text_sha256"] for r in base["per_run"]}
    stack_answers = {r.text_sha256 for r in results if r.ok}
    out["same_answer"] = bool(stack_answers) and stack_answers == engine_answers
    out["prompt_tokens_stack"] = stack["prompt_tokens"]
    out["prompt_tokens_engine"] = base["prompt_tokens"]
    out["same_prompt"] = stack["prompt_tokens"] == base["prompt_tokens"]
    out["completion_tokens_stack_p50"] = stack["completion_tokens"]["p50"]
    out["completion_tokens_engine_p50"] = base["completion_tokens"]["p50"]
    return out


# --- side by side with transformers serve --------------------------------------------------


def transformers_serve_phase(
    args: argparse.Namespace, prompt: str, workdir: Path
) -> dict[str, Any]:
    """The same load, after the stack has stopped, on ``transformers serve`` pinned to the
    same model folder (``--continuous-batching`` when the stack's workers batch)."""
    from bench.hf_serve import (
        served_model_name,
        start_transformers_serve,
        wait_transformers_serve,
    )

    registry, name = resolve_model(args.vs_transformers_serve, args, workdir / "hf")
    entry = registry.get(name)
    assert entry is not None
    if entry.serving.engine == "loadtest":
        raise SystemExit("--vs-transformers-serve needs a model, not the load-test engine")
    from worker.loader import weights_folder

    folder = weights_folder(entry, registry)
    batching = args.hf_continuous_batching == "on" or (
        args.hf_continuous_batching == "auto" and args.worker_concurrency > 1
    )
    port = free_port()
    print(
        f"transformers serve: {folder.name}, continuous batching {batching}, port {port} ...",
        flush=True,
    )
    proc = start_transformers_serve(
        folder,
        port,
        workdir / "transformers-serve.log",
        continuous_batching=batching,
        dtype=args.hf_dtype,
    )
    try:
        wait_transformers_serve(port, args.ready_timeout, proc)
        their = argparse.Namespace(**vars(args))
        their.api, their.base_url = "openai", f"http://127.0.0.1:{port}"
        their.model = served_model_name(folder)
        body = openai_body(their, prompt)
        wait_quiet(args.quiet_cpu, args.quiet_timeout, "the transformers serve load")
        meter = CpuMeter([os.getpid(), proc.popen.pid], ["client", "transformers_serve"])
        warm, results, duration = asyncio.run(run_load(their, body))
        cpu = meter.stop()
    finally:
        proc.stop()
    return {
        "command": proc.popen.args,
        "continuous_batching": batching,
        "dtype": args.hf_dtype,
        "cpu": cpu,
        "summary": summarize(results, duration),
        "warmup": [asdict(r) for r in warm],
        "per_request": [asdict(r) for r in results],
    }


def versus(
    ours: dict[str, Any], results: Sequence[RequestResult], theirs: dict[str, Any]
) -> dict[str, Any]:
    """Our stack against transformers serve, same load: ratios > 1 favour the stack for
    throughput; TTFT and E2E ratios are ours / theirs (below 1 favours the stack)."""
    t = theirs["summary"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ours_answers = {r.text_sha256 for r in results if r.ok}
    their_answers = {r["text_sha256"] for r in theirs["per_request"] if r["ok"]}
    return {
        "output_tok_s": [ours["output_token_throughput_tok_s"], t["output_token_throughput_tok_s"]],
        "throughput_ratio": ratio(
            ours["output_token_throughput_tok_s"], t["output_token_throughput_tok_s"]
        ),
        "ttft_p50_ms": [ours["ttft_ms"]["p50"], t["ttft_ms"]["p50"]],
        "ttft_p50_ratio": ratio(ours["ttft_ms"]["p50"], t["ttft_ms"]["p50"]),
        "e2e_p50_ratio": ratio(ours["e2e_ms"]["p50"], t["e2e_ms"]["p50"]),
        "prompt_tokens": [ours["prompt_tokens"], t["prompt_tokens"]],
        "completion_tokens_p50": [ours["completion_tokens"]["p50"], t["completion_tokens"]["p50"]],
        "same_answer": bool(ours_answers) and ours_answers == their_answers,
    }


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark POST /medgemma over HTTP (TTFT, ITL, E2E, throughput).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("MEDGEMMA_API_KEY"))
    p.add_argument("--model", default=DEMO_MODEL, help="model name sent in the request")
    p.add_argument("--concurrency", type=int, default=None, help="closed loop clients (default 1)")
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="Poisson open loop, requests/s; --concurrency then caps requests in flight",
    )
    p.add_argument("--num-requests", type=int, default=20)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests sent first")
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="max_new_tokens of the entry this program writes (--spawn-stack, or a folder "
        "given to --engine-baseline); the API itself has no such field",
    )
    p.add_argument("--verbosity", type=int, choices=(0, 1, 2, 3), default=None)
    p.add_argument("--system-message", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-duration", type=float, default=1800.0, help="bound on the load phase")
    p.add_argument("--engine-baseline", default=None, metavar="PATH_OR_MODEL")
    p.add_argument("--baseline-runs", type=int, default=10)
    p.add_argument("--baseline-warmup", type=int, default=1)
    p.add_argument(
        "--api",
        choices=("medgemma", "openai"),
        default="medgemma",
        help="POST /medgemma, or POST /v1/chat/completions (also for any OpenAI-compatible "
        "server, e.g. transformers serve)",
    )
    p.add_argument(
        "--spawn-stack",
        default=None,
        metavar="MODEL_DIR_OR_DEMO",
        help="a model folder, 'demo' (SmolLM2), or 'loadtest' (the load-test engine)",
    )
    p.add_argument(
        "--vs-transformers-serve",
        default=None,
        metavar="MODEL_DIR_OR_DEMO",
        help="after the stack, run the same load on `transformers serve` pinned to this model "
        "(continuous batching when --worker-concurrency > 1); needs --api openai",
    )
    p.add_argument(
        "--hf-continuous-batching",
        choices=("auto", "on", "off"),
        default="auto",
        help="transformers serve's --continuous-batching: auto = when --worker-concurrency > 1",
    )
    p.add_argument(
        "--hf-dtype", default="float32", help="transformers serve's --dtype (auto, bfloat16 ...)"
    )
    p.add_argument(
        "--lean-client",
        action="store_true",
        help="count events per network read instead of parsing them (aiohttp; /medgemma, "
        "closed loop): for relay capacity with thousands of streams",
    )
    p.add_argument(
        "--ramp-up", type=float, default=0.0, help="spread the closed-loop clients' starts (s)"
    )
    p.add_argument("--workers", type=int, default=1, help="workers of the spawned stack")
    p.add_argument(
        "--worker-concurrency", type=int, default=1, help="WORKER_CONCURRENCY of each worker"
    )
    p.add_argument(
        "--worker-batch-tokens", type=int, default=None, help="WORKER_BATCH_TOKENS of each worker"
    )
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another setting of each spawned worker (repeatable), e.g. WORKER_COMPILE=off; "
        "WORKER_COMPILE applies to the engine baseline too",
    )
    p.add_argument(
        "--loadtest-tokens-per-s", type=float, default=50.0, help="per stream, 'loadtest' only"
    )
    p.add_argument("--loadtest-first-token-ms", type=float, default=0.0, help="simulated prefill")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--keep-workdir", action="store_true", help="keep the spawned stack's logs")
    p.add_argument(
        "--models-file",
        default=os.environ.get("MODELS_FILE", str(ROOT / "models.json")),
        help="registry for --engine-baseline MODEL_NAME",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="device of the engine baseline and of the spawned worker (WORKER_DEVICE)",
    )
    p.add_argument("--dtype", default="float32", help="dtype of an entry made for a folder")
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument(
        "--quiet-cpu",
        type=float,
        default=None,
        metavar="PCT",
        help="before each phase, wait until the machine's CPUs are at most PCT%% busy",
    )
    p.add_argument("--quiet-timeout", type=float, default=600.0, help="longest such wait, s")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.num_requests < 1:
        p.error("--num-requests must be at least 1")
    if args.concurrency is not None and args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.lean_client and (args.api != "medgemma" or args.request_rate is not None):
        p.error("--lean-client drives /medgemma in a closed loop only")
    if args.vs_transformers_serve and args.api != "openai":
        p.error("--vs-transformers-serve compares the OpenAI API: add --api openai")
    if args.workers < 1 or args.worker_concurrency < 1:
        p.error("--workers and --worker-concurrency must be at least 1")
    if args.request_rate is not None and args.request_rate <= 0:
        p.error("--request-rate must be > 0")
    if args.max_tokens is not None and not (args.spawn_stack or args.engine_baseline):
        p.error(
            "--max-tokens only acts with --spawn-stack or --engine-baseline (the API has no "
            "max_tokens field; set max_new_tokens in the stack's models.json)"
        )
    if args.spawn_stack:
        args.api_key = args.api_key or DEFAULT_SPAWN_KEY
    elif not args.api_key:
        p.error("--api-key (or MEDGEMMA_API_KEY) is needed for a running stack")
    return args


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="medgemma-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs and registry kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prompt = synthetic_prompt(args.prompt_words)
    mode = (
        f"closed loop, concurrency {args.concurrency or 1}"
        if args.request_rate is None
        else f"open loop, Poisson {args.request_rate:g} req/s, cap {args.concurrency or 'none'}"
    )
    report: dict[str, Any] = {
        "benchmark": "bench/serve.py",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name, *sys.argv],
        "machine": machine_info(),
        "source": source_info(),
        "cpu": {"busy_before_pct": cpu_busy()},
    }
    with _workdir(args.keep_workdir) as workdir:
        spawn: tuple[Registry, str] | None = None
        if args.spawn_stack:
            spawn = resolve_model(args.spawn_stack, args, workdir)
            if args.model != spawn[1]:
                print(f"--spawn-stack serves {spawn[1]!r}: sending model {spawn[1]!r}")
            args.model = spawn[1]
        body = request_body(args, prompt)

        if args.engine_baseline:
            if spawn is not None and args.engine_baseline in (args.spawn_stack, spawn[1]):
                registry, name = spawn
            else:
                registry, name = resolve_model(args.engine_baseline, args, workdir / "baseline")
            entry = registry.get(name)
            assert entry is not None
            messages, sampling = engine_inputs(medgemma_body(args, prompt), entry)
            wait_quiet(args.quiet_cpu, args.quiet_timeout, "the engine baseline")
            print(
                f"engine baseline: loading {name} in-process, {args.baseline_warmup} warm-up + "
                f"{args.baseline_runs} runs (max_new_tokens {sampling.max_new_tokens}) ...",
                flush=True,
            )
            meter = CpuMeter([os.getpid()])
            report["engine_baseline"] = engine_baseline(
                entry,
                registry,
                messages,
                sampling,
                runs=args.baseline_runs,
                warmup=args.baseline_warmup,
                device=args.device,
                compile=worker_env(args).get("WORKER_COMPILE", "auto") != "off",
            )
            report["engine_baseline"]["sampling"] = sampling.model_dump()
            report["cpu"]["baseline"] = meter.stop()

        stack: SpawnedStack | None = None
        try:
            if spawn is not None:
                print(f"starting redis, a worker for {spawn[1]} and the gateway ...", flush=True)
                started = time.perf_counter()
                stack = SpawnedStack(spawn[0], spawn[1], workdir, args)
                args.base_url = stack.base_url
                report["spawned_stack_ready_s"] = time.perf_counter() - started
            print(f"load: {args.num_requests} requests, {mode}, on {args.base_url}", flush=True)
            wait_quiet(args.quiet_cpu, args.quiet_timeout, "the HTTP load")
            named = {"client": os.getpid()}
            if stack is not None:
                named.update(stack.named_pids())
            meter = CpuMeter(list(named.values()), list(named))
            warm, results, duration = asyncio.run(run_load(args, body))
            report["cpu"]["load"] = load = meter.stop()
            # CPU per token the clients received (user + system time over the load phase).
            received = sum(r.completion_tokens or 0 for r in (*warm, *results))
            if received and load.get("cores_used"):
                load["cpu_us_per_token"] = {
                    name: cores * load["wall_s"] / received * 1e6
                    for name, cores in load["cores_used"].items()
                    if cores is not None
                }
            if stack is not None:
                report["gateway_memory_kib"] = memory_kib(stack.gateway.popen.pid)
            if stack is not None:
                report["worker_breakdown"] = worker_breakdown(
                    stack.worker_logs(), stack.log("gateway"), results
                )
        finally:
            if stack is not None:
                stack.stop()
        if args.vs_transformers_serve:
            report["transformers_serve"] = transformers_serve_phase(args, prompt, workdir)

    report["config"] = {
        "base_url": args.base_url,
        "model": args.model,
        "mode": mode,
        "concurrency": args.concurrency,
        "request_rate": args.request_rate,
        "num_requests": args.num_requests,
        "warmup": args.warmup,
        "prompt_words": args.prompt_words,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "max_tokens": args.max_tokens,
        "verbosity": args.verbosity,
        "spawn_stack": args.spawn_stack,
        "engine_baseline": args.engine_baseline,
        "device": args.device,
        "request_body": {k: v for k, v in body.items() if k != "user_message"},
    }
    summary = summarize(results, duration)
    report["stack"] = {
        "summary": summary,
        "warmup": [asdict(r) for r in warm],
        "per_request": _compact([asdict(r) for r in results]),
    }
    if "engine_baseline" in report:
        report["overhead"] = overhead(summary, report["engine_baseline"], results)
    if "transformers_serve" in report:
        report["vs_transformers_serve"] = versus(summary, results, report["transformers_serve"])
    print_report(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
