"""Coalesced token events on the real stack: a worker that produces tokens faster than one
Redis round trip each joins them into fewer, bigger events. What clients see must not change:
the official SDK parses the chunks, the text and the usage are exact, a resume after a
joined event's id continues exactly after it, and a client that falls behind gets what waited
for it joined, with nothing lost."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from devstack.processes import wait_for
from shared.keys import Keys
from shared.protocol import decode_event
from shared.redis_url import sync_redis
from tests.stack import USER_KEY, Stack, ask, events_of, start_stack

pytestmark = pytest.mark.integration

TOKENS = 2000  # fast-model: 2,000 tokens at 20,000 tokens/s
WHOLE = "".join(f"tok{i} " for i in range(TOKENS))


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("coalescing"), tiny_gemma_dir, workers=0, only={"fast-model"}
    )
    try:
        stack.add_worker("fast-model")
        yield stack
    finally:
        stack.stop()


def test_the_sdk_reads_joined_chunks_with_exact_text_and_usage(fast: Stack) -> None:
    client = openai.OpenAI(base_url=f"{fast.base_url}/v1", api_key=USER_KEY, max_retries=0)
    stream = client.chat.completions.create(
        model="fast-model",
        messages=[{"role": "user", "content": "a long answer"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(parts) == WHOLE
    assert usage is not None and usage.completion_tokens == TOKENS  # counts tokens, not chunks
    assert len(parts) < TOKENS  # the worker joined tokens: fewer chunks than tokens


def test_a_resume_after_a_joined_event_continues_exactly(fast: Stack) -> None:
    seen: list[str] = []
    last_id = ""
    with fast.client() as c:
        with connect_sse(c, "POST", "/medgemma", json=ask("long", model="fast-model")) as src:
            job_id = src.response.headers["x-job-id"]
            for e in events_of(src):
                assert e.event == "token", e.data
                seen.append(json.loads(e.data)["text"])
                last_id = e.id
                if len(seen) == 5:
                    break  # the connection drops here
        with connect_sse(
            c, "GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": last_id}
        ) as src:
            rest = list(events_of(src))
    assert rest[-1].event == "done"
    assert json.loads(rest[-1].data)["usage"]["completion_tokens"] == TOKENS
    text = "".join(seen) + "".join(json.loads(e.data)["text"] for e in rest[:-1])
    assert text == WHOLE  # nothing lost, nothing repeated
    ids = [int(last_id)] + [int(e.id) for e in rest]
    assert ids == sorted(set(ids))  # a joined frame carries the id of its last event
    assert len(seen) + len(rest) - 1 < TOKENS


def _frames(raw: str) -> list[dict[str, str]]:
    """The SSE frames of a response body: each a dict of its fields."""
    frames = []
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        if fields:
            frames.append(fields)
    return frames


def test_a_client_that_falls_behind_gets_joined_frames_and_loses_nothing(fast: Stack) -> None:
    """The client reads nothing (a 4 KiB receive window) until the worker has written the
    whole answer, so the gateway's sends back up and the events pile up in its relay; then
    it reads everything: the exact text and usage, in frames that join several events (their
    ids skip), never more tokens per frame than the cap allows."""
    redis = sync_redis(fast.redis_url, decode_responses=True)
    small_window = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    with (
        httpx.Client(
            base_url=fast.base_url, headers=headers, transport=small_window, timeout=60
        ) as c,
        c.stream("POST", "/medgemma", json=ask("long", model="fast-model")) as resp,
    ):
        log = Keys().job_log(resp.headers["x-job-id"])

        def written() -> bool:
            return any(decode_event(f["e"]).type == "done" for _, f in redis.xrange(log))

        wait_for(written, 60, "the worker to write the whole answer")
        frames = _frames(resp.read().decode())
    assert frames[-1]["event"] == "done"
    assert json.loads(frames[-1]["data"])["usage"]["completion_tokens"] == TOKENS
    texts = [json.loads(f["data"])["text"] for f in frames if f["event"] == "token"]
    assert "".join(texts) == WHOLE  # nothing lost, nothing repeated
    ids = [int(f["id"]) for f in frames]
    assert ids == sorted(set(ids))
    logged = len(redis.xrange(log))
    assert len(frames) < logged  # the gateway joined events that waited for this client
