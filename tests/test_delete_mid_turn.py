"""DELETE /conversations/{id} while a turn runs: the turn is cancelled and not stored, the
conversation id is free at once (no 409 for the turn TTL), and no key is left without a TTL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

from tests.stack import Stack, ask, slow_model_stack, sse_events, stream_in_background

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    with slow_model_stack(tmp_path_factory.mktemp("delete"), tiny_gemma_dir) as s:
        yield s


def test_delete_during_a_turn_cancels_it_and_frees_the_conversation(slow: Stack) -> None:
    body = {**ask("a long answer", model="slow-model"), "conversation_id": "c-del-1"}
    bg = stream_in_background(slow, body)
    assert bg.wait_for_events(3, 20), bg.events
    with slow.client() as c:
        assert c.delete("/conversations/c-del-1").status_code == 204
        bg.join(15)
        assert not bg.is_alive(), "the stream did not end"
        kind, data = bg.events[-1]
        assert kind == "done" and json.loads(data)["finish_reason"] == "cancelled", bg.events[-1]
        assert c.get("/conversations/c-del-1").status_code == 404  # nothing stored
        again = {**body, "user_message": ask("short")["user_message"]}
        response, events = sse_events(c, "/medgemma", again)
        assert response.status_code == 200, response.text  # not 409: the lock went too
        assert events[-1].event == "done"
        assert len(c.get("/conversations/c-del-1").json()["messages"]) == 2
    redis = Redis.from_url(slow.redis_url, decode_responses=True)
    try:
        forever = [k for k in redis.scan_iter("mg:*") if redis.ttl(k) == -1]
    finally:
        redis.close()
    assert forever == [], forever
