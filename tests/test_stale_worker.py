"""A worker paused past its lease (SIGSTOP), whose job another worker took over, and then
resumed (SIGCONT): its writes are fenced by the claim, so the client's answer comes from one
worker at a time — every token once, in order — and the stored turn is exactly that answer."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from tests.stack import Stack, ask, slow_model_stack, stream_in_background

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    with slow_model_stack(tmp_path_factory.mktemp("stale"), tiny_gemma_dir, workers=2) as s:
        yield s


def test_a_resumed_stale_worker_publishes_nothing(pair: Stack) -> None:
    body = {**ask("count for me", model="slow-model"), "conversation_id": "c-stale"}
    bg = stream_in_background(pair, body)
    assert bg.wait_for_events(3, 20), bg.events
    redis = Redis.from_url(pair.redis_url, decode_responses=True)
    try:
        holder = str(redis.get(f"mg:job:{bg.job_id}:claim"))
        workers = [p for p in pair.procs if p.name == "worker"]
        stale = next(p for p in workers if holder.endswith(f"-{p.popen.pid}"))
        os.kill(stale.popen.pid, signal.SIGSTOP)
        try:
            # The lease lapses, the job is handed over and goes on on the other worker.
            n = len(bg.events)
            assert bg.wait_for_events(n + 10, 30), "the answer did not go on elsewhere"
        finally:
            os.kill(stale.popen.pid, signal.SIGCONT)  # it wakes up mid-generation
        bg.join(40)
        assert not bg.is_alive()
    finally:
        redis.close()
    assert bg.events[-1][0] == "done", bg.events[-3:]
    words = "".join(json.loads(d)["text"] for k, d in bg.events if k == "token").split()
    assert words == [f"tok{i}" for i in range(len(words))], words  # once each, in order
    assert json.loads(bg.events[-1][1])["usage"]["completion_tokens"] == len(words)
    with pair.client() as c:
        stored = c.get("/conversations/c-stale").json()["messages"][-1]["content"]
    assert stored.split() == words
