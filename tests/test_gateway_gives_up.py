"""Workers that fail mid-answer, on the real stack.

* When the gateway ends a job itself (its only worker stopped mid-answer: worker_lost, or
  worker_timeout), it also cancels the job and frees the conversation: the user's next turn is
  accepted at once instead of 409 "conversation busy" for the turn TTL, and the stale worker,
  once it runs again, stores nothing of the abandoned answer.
* An answer handed over while every other worker is busy waits in line for one, then
  continues (it used to be handed over again each second and then failed)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpx_sse import connect_sse
from redis import Redis

from devstack.processes import wait_for, wait_ready
from tests.stack import (
    Stack,
    ask,
    events_of,
    slow_model_stack,
    sse_events,
    stream_in_background,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    """No worker yet: each test starts the ones it needs."""
    with slow_model_stack(tmp_path_factory.mktemp("gives-up"), tiny_gemma_dir, workers=0) as s:
        yield s


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
        # The gateway's error is in the job's log with the next real id, like a worker's: a
        # client resuming after the last token gets exactly it.
        last_token = int(bg.ids[-2])
        assert bg.ids[-1] == str(last_token + 1)
        with single.client() as c:
            headers = {"Last-Event-ID": str(last_token)}
            with connect_sse(c, "GET", f"/jobs/{bg.job_id}/events", headers=headers) as src:
                again = [(e.event, e.id, e.data) for e in events_of(src)]
        assert again == [("error", bg.ids[-1], data)]
        assert _claim(single, bg.job_id) == "done:gateway"  # no worker may write or start it
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_ready(single.port, "slow-model", 20)  # the resumed worker beats again
    assert _log_ids(single, bg.job_id)[-1] == int(bg.ids[-1])  # and wrote nothing more
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
    worker.stop()  # the next test counts its own workers


def _log_ids(stack: Stack, job_id: str) -> list[int]:
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        return [int(i.split("-")[0]) for i, _ in redis.xrange(f"mg:job:{job_id}:log")]
    finally:
        redis.close()


def _claim(stack: Stack, job_id: str) -> str | None:
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        value = redis.get(f"mg:job:{job_id}:claim")
        return None if value is None else str(value)
    finally:
        redis.close()


def test_a_handed_over_answer_waits_for_the_busy_worker(single: Stack) -> None:
    """Two workers, each running one answer; one is killed. Its answer is handed over, waits
    in line (queued events) while the other worker finishes its own answer, then continues
    there and completes, instead of failing after repeated handovers."""
    first = single.add_worker("slow-model")
    second = single.add_worker("slow-model")
    a = stream_in_background(single, ask("answer A", model="slow-model"))
    assert a.wait_for_events(3, 20), a.events
    b = stream_in_background(single, ask("answer B", model="slow-model"))
    assert b.wait_for_events(3, 20), b.events
    holder = _claim(single, b.job_id)
    assert holder is not None
    victim = next(p for p in (first, second) if holder.endswith(f"-{p.popen.pid}"))
    os.kill(victim.popen.pid, signal.SIGKILL)
    a.join(40)
    b.join(60)
    assert a.events[-1][0] == "done", a.events[-1]
    kinds = [kind for kind, _ in b.events]
    assert kinds[-1] == "done", b.events[-3:]
    assert "queued" in kinds[kinds.index("token") :], kinds  # it waited in line after the kill
    done = json.loads(b.events[-1][1])
    assert done["finish_reason"] == "length"
    for proc in (first, second):
        proc.stop()  # the next test counts its own workers


def test_an_abandoned_turn_still_in_line_frees_its_conversation_at_once(single: Stack) -> None:
    """The only worker is busy; a turn waits in line and its client leaves. After the resume
    grace the gateway ends the unclaimed job itself (`cancelled`, fenced): the conversation is
    free while the worker is still busy, and the worker never runs the job."""
    worker = single.add_worker("slow-model")
    busy = stream_in_background(single, ask("keep the worker busy", model="slow-model"))
    assert busy.wait_for_events(2, 20), busy.events
    body = {**ask("then this", model="slow-model"), "conversation_id": "c-left-in-line"}
    with single.client() as c, connect_sse(c, "POST", "/medgemma", json=body) as src:
        job_id = src.response.headers["x-job-id"]
    # The client is gone. Within the grace (1 s) plus a check, the lock is released.
    redis = Redis.from_url(single.redis_url, decode_responses=True)
    try:
        wait_for(
            lambda: redis.get(f"mg:job:{job_id}:claim") == "done:gateway",
            10,
            "the gateway to end the abandoned job",
        )
    finally:
        redis.close()
    assert busy.is_alive(), "the worker must still be busy, or the test shows nothing"
    with single.client() as c:
        again = {**body, "user_message": ask("next")["user_message"], "stream": False}
        response = c.post("/medgemma", json=again)
    assert response.status_code == 200, response.text  # not 409 conversation_busy
    busy.join(30)
    worker.stop()


def test_an_abandoned_answer_whose_worker_is_lost_frees_its_conversation(single: Stack) -> None:
    """The client leaves mid-answer; before its worker sees the cancel, the worker stops
    (SIGSTOP: its lease lapses) and no client follows the job to notice. The gateway that
    cancelled it sees the cancel through: it ends the job (`cancelled`, fenced) once the claim
    lapses, so the conversation is free at once; the worker, once it runs again, writes
    nothing more to the job and serves the next turn."""
    worker = single.add_worker("slow-model")
    pid = worker.popen.pid
    body = {**ask("a long answer", model="slow-model"), "conversation_id": "c-left-lost"}
    with single.client() as c, connect_sse(c, "POST", "/medgemma", json=body) as src:
        job_id = src.response.headers["x-job-id"]
        for n, _ in enumerate(events_of(src), 1):
            if n == 3:  # tokens flow
                break
    os.kill(pid, signal.SIGSTOP)  # the client is gone; the worker stops before the cancel
    redis = Redis.from_url(single.redis_url, decode_responses=True)
    try:
        wait_for(
            lambda: redis.get(f"mg:job:{job_id}:claim") == "done:gateway",
            20,
            "the gateway to end the cancelled job its worker lost",
        )
        # The worker is still stopped, and the turn lock is already free.
        assert list(redis.scan_iter("mg:conv:*:c-left-lost:lock")) == []
        last = json.loads(redis.xrevrange(f"mg:job:{job_id}:log", count=1)[0][1]["e"])
        assert (last["type"], last["finish_reason"]) == ("done", "cancelled")
        os.kill(pid, signal.SIGCONT)
        wait_ready(single.port, "slow-model", 20)  # the resumed worker beats again
        with single.client() as c:
            again = {**body, "user_message": ask("short please")["user_message"]}
            response = c.post("/medgemma", json={**again, "stream": False})
        assert response.status_code == 200, response.text  # not 409 conversation_busy
        assert _log_ids(single, job_id)[-1] == int(last["seq"])  # it wrote nothing more
    finally:
        os.kill(pid, signal.SIGCONT)
        redis.close()
    worker.stop()
