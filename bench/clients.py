"""The timed HTTP clients: one streamed request each, timed from this process.

* :func:`stream_one` — ``POST /medgemma`` (the seed API), SSE parsed with httpx-sse;
* :func:`stream_openai` — ``POST /v1/chat/completions`` streamed with usage, from any
  OpenAI-compatible server (ours, ``transformers serve``);
* :func:`stream_counted` — the lean client for relay capacity: aiohttp, events counted per
  network read, not parsed.

Each returns a :class:`RequestResult`: TTFT = request sent to the first text received; ITL = the
gaps between text events; E2E = request sent to the terminal event; completion tokens from the
usage; ``sent_at`` is the wall clock at the send, to line up with times the stack records.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse


@dataclass
class RequestResult:
    index: int
    started_s: float  # since the start of the measured phase
    sent_at: float = 0.0  # wall clock (time.time()), to line up with the job's recorded times
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


@dataclass(frozen=True)
class Markers:
    """What the lean client looks for in one API's stream: a token frame, the frame that ends
    the answer (its usage is parsed), an error frame."""

    token: bytes
    end: bytes
    error: bytes


#: ``/medgemma``: ``event: token`` ... ``event: done`` (with usage) or ``event: error``.
SEED_MARKERS = Markers(token=b"event: token", end=b"event: done", error=b"event: error")
#: ``/v1/chat/completions`` with ``include_usage``: content chunks, then the usage chunk.
OPENAI_MARKERS = Markers(token=b'"delta": {"content"', end=b'"usage": {', error=b'"error": {')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens":\s*(\d+)')


async def stream_counted(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    index: int,
    t0: float,
    markers: Markers = SEED_MARKERS,
) -> RequestResult:
    """POST a streamed turn and count its token frames per network read, without parsing.

    For relay capacity (``--lean-client``): thousands of streams and tens of thousands of
    events per second from one client process. aiohttp's C parser undoes the HTTP framing;
    each read is searched for ``markers`` only. Frames that arrive in one read share its
    time (their gaps count as 0, as with the parsing client). A token frame may carry several
    tokens (joined when the worker or the gateway fell behind), so completion tokens are read
    from the usage of the frame that ends the answer, the one frame that is parsed; the text
    is not checked."""
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
                n = data.count(markers.token)
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
                elif markers.end in data or markers.error in data:
                    res.e2e_s = now - sent
                    res.ok = markers.end in data
                    res.error_code = None if res.ok else "error_event"
                    ending = data[data.find(markers.end if res.ok else markers.error) :]
                    # Read on to the end of the response, so the connection is reused.
                # An event name may straddle two reads: keep fewer bytes than a whole one.
                tail = data[-(len(markers.token) - 1) :]
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
