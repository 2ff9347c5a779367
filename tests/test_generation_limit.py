"""GATEWAY_MAX_GENERATION_S is enforced by the worker: an answer that would run past it ends
with finish_reason "length" (like max_tokens), is stored as the turn, and frees the
conversation for the next turn at once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, ask, slow_model_stack, sse_events, tokens

pytestmark = pytest.mark.integration

LIMIT_S = 1.5  # the slow-model would need 10 s (200 tokens at 20/s)


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    settings = {"GATEWAY_MAX_GENERATION_S": str(LIMIT_S)}
    with slow_model_stack(tmp_path_factory.mktemp("limit"), tiny_gemma_dir, settings=settings) as s:
        yield s


def test_an_answer_past_the_generation_limit_ends_with_length(bounded: Stack) -> None:
    with bounded.client() as c:
        started = time.monotonic()
        body = {**ask("tell me everything", model="slow-model"), "conversation_id": "c-limit-1"}
        response, events = sse_events(c, "/medgemma", body)
        elapsed = time.monotonic() - started
        assert response.status_code == 200
        done = json.loads(events[-1].data)
        assert events[-1].event == "done", events[-1]
        assert done["finish_reason"] == "length"
        n = done["usage"]["completion_tokens"]
        assert 0 < n < 200, n  # cut by time, not by max_new_tokens
        assert elapsed < 8
        text = tokens(events)
        # The turn is stored and the conversation is free: the next turn is accepted.
        turns = c.get("/conversations/c-limit-1").json()
        assert turns["messages"][-1]["content"] == text
        response, events = sse_events(
            c, "/medgemma", {**body, "user_message": ask("more")["user_message"]}
        )
        assert response.status_code == 200 and events[-1].event == "done"
