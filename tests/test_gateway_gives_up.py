"""When the gateway ends a job itself (its only worker stopped mid-answer: worker_lost, or
worker_timeout), it also cancels the job and frees the conversation: the user's next turn is
accepted at once instead of 409 "conversation busy" for the turn TTL, and the stale worker,
once it runs again, stores nothing of the abandoned answer."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.processes import wait_ready
from tests.stack import Stack, ask, sse_events, start_stack, stream_in_background

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("gives-up"), tiny_gemma_dir, workers=0, only={"slow-model"}
    )
    yield s
    s.stop()


def test_a_turn_the_gateway_gives_up_frees_the_conversation(single: Stack) -> None:
    worker = single.add_worker("slow-model")
    pid = worker.popen.pid
    body = {**ask("a long answer", model="slow-model"), "conversation_id": "c-gives-up"}
    bg = stream_in_background(single, body)
    assert bg.wait_for_events(3, 20), bg.events  # tokens flow
    os.kill(pid, signal.SIGSTOP)  # the only worker stops mid-answer, its lease lapses
    try:
        bg.join(30)
        assert not bg.is_alive(), "the stream did not end"
        kind, data = bg.events[-1]
        assert kind == "error", bg.events[-1]
        assert json.loads(data)["error"]["code"] in ("worker_lost", "worker_timeout")
    finally:
        os.kill(pid, signal.SIGCONT)
    with single.client() as c:
        history = c.get("/conversations/c-gives-up").json()
        assert history.get("messages", []) == []  # nothing stored of the lost answer
        second = {**body, "user_message": ask("short please")["user_message"]}
        wait_ready(single.port, "slow-model", 20)  # the resumed worker beats again
        response, events = sse_events(c, "/medgemma", second)
        assert response.status_code == 200, response.text
        assert events[-1].event == "done"
        history = c.get("/conversations/c-gives-up").json()
        assert len(history["messages"]) == 2  # only the second turn: question and answer
