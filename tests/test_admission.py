"""Admission and departure on the real stack: a request refused after its stream slot was
taken gives the slot back, on both APIs, so a user who sends bad bodies is never locked out
(six bad image requests used to hold the slots for the slot TTL, and every valid request got
429); and a non-stream client that hangs up has its job cancelled like a stream's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis import Redis

from tests.stack import Stack, ask, slow_model_stack, sse_events, tokens
from tests.test_reliability import wait_for_done

pytestmark = pytest.mark.integration

STREAMS = 2  # GATEWAY_MAX_CONCURRENT_STREAMS of this stack
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
    "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    settings = {"GATEWAY_MAX_CONCURRENT_STREAMS": str(STREAMS)}
    workdir = tmp_path_factory.mktemp("admission")
    only = {"smollm2-demo", "slow-model"}
    with slow_model_stack(workdir, tiny_gemma_dir, only=only, settings=settings) as s:
        yield s


def _slots_held(stack: Stack) -> int:
    redis = Redis.from_url(stack.redis_url)
    try:
        return sum(int(redis.zcard(k)) for k in redis.scan_iter("mg:rl:*:streams"))
    finally:
        redis.close()


def test_refused_bodies_give_their_stream_slot_back(limited: Stack) -> None:
    image_turn = {
        "model": "smollm2-demo",
        "temperature": 0,
        "user_message": [
            {"type": "image", "data_url": PNG},
            {"type": "text", "text": "What is on this image?"},
        ],
    }
    bad_openai = {
        "model": "slow-model",
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
                ],
            }
        ],
    }
    with limited.client() as c:
        for _ in range(3 * STREAMS):
            r = c.post("/medgemma", json=image_turn)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "unsupported_capability"
        for _ in range(3 * STREAMS):
            r = c.post("/v1/chat/completions", json=bad_openai)
            assert r.status_code == 400, r.text
        assert _slots_held(limited) == 0
        # No slot is held, and a valid stream is served at once.
        first, events = sse_events(c, "/medgemma", ask("hello", model="slow-model"))
        assert first.status_code == 200
        assert tokens(events)
        assert events[-1].event == "done"
    assert _slots_held(limited) == 0


def _job_ids(stack: Stack) -> set[str]:
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        return {k.split(":")[2] for k in redis.scan_iter("mg:job:*:meta")}
    finally:
        redis.close()


@pytest.mark.parametrize("api", ["medgemma", "openai"])
def test_non_stream_client_that_leaves_cancels_its_job(limited: Stack, api: str) -> None:
    """A `stream: false` request whose client hangs up is cancelled after the resume grace,
    like a stream, instead of keeping the worker busy for nobody."""
    before = _job_ids(limited)
    if api == "medgemma":
        path, body = "/medgemma", ask("a long answer please", model="slow-model", stream=False)
    else:
        path = "/v1/chat/completions"
        body = {"model": "slow-model", "messages": [{"role": "user", "content": "long"}]}
    with limited.client(timeout=1.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post(path, json=body)  # 200 tokens at 20/s: the client gives up after 1.5 s
    new = _job_ids(limited) - before
    assert len(new) == 1
    job_id = new.pop()
    done, _ = wait_for_done(limited, job_id, timeout_s=8)
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens < 200
    assert _slots_held(limited) == 0
