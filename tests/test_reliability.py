"""Streams that survive: cancellation frees the worker, a dropped stream resumes exactly.

A worker with the load-test engine (20 tokens/s, 200 tokens, no model) gives generations long
and regular enough to cancel or interrupt at a known point.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from httpx_sse import connect_sse
from redis import Redis

from devstack.processes import Proc, wait_for
from shared.keys import Keys
from shared.protocol import DoneEvent, decode_event
from tests.stack import OTHER_KEY, Stack, ask, events_of, stream_in_background

pytestmark = pytest.mark.integration
SLOW = "slow-model"


@pytest.fixture(scope="module")
def slow_worker(stack: Stack) -> Iterator[Proc]:
    proc = stack.add_worker(SLOW)
    yield proc
    proc.stop()


def job_log(stack: Stack, job_id: str) -> list[object]:
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    return [decode_event(f["e"]) for _id, f in redis.xrange(Keys().job_log(job_id))]


def wait_for_done(stack: Stack, job_id: str, timeout_s: float) -> tuple[DoneEvent, float]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = job_log(stack, job_id)
        if events and isinstance(events[-1], DoneEvent):
            return events[-1], time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish within {timeout_s}s")


def test_cancel_endpoint_stops_generation_within_a_second(stack: Stack, slow_worker: Proc) -> None:
    reader = stream_in_background(stack, ask("long answer please", model=SLOW))
    assert reader.wait_for_events(5, 20)
    with stack.client() as c:
        t0 = time.monotonic()
        r = c.post(f"/jobs/{reader.job_id}/cancel")
    assert r.status_code == 202
    done, t_done = wait_for_done(stack, reader.job_id, 5)
    reader.join(10)
    got = [kind for kind, _ in reader.events]
    assert done.finish_reason == "cancelled"
    assert t_done - t0 < 1.0, f"worker kept generating {t_done - t0:.2f}s after the cancel"
    assert done.usage.completion_tokens < 40  # of 200
    assert got[-1] == "done"


def test_client_that_leaves_and_does_not_return_frees_the_worker(
    stack: Stack, slow_worker: Proc
) -> None:
    body = {**ask("tell me everything", model=SLOW), "conversation_id": "left-early"}
    with stack.client() as c, connect_sse(c, "POST", "/medgemma", json=body) as src:
        job_id = src.response.headers["x-job-id"]
        for n, _ in enumerate(events_of(src), 1):
            if n == 3:
                break  # the client goes away mid-stream
    left_at = time.monotonic()
    done, t_done = wait_for_done(stack, job_id, 10)
    grace = float(stack.env["GATEWAY_RESUME_GRACE_S"])
    assert done.finish_reason == "cancelled"
    assert t_done - left_at < grace + 1.0
    with stack.client() as c:  # a cancelled answer is not stored
        assert c.get("/conversations/left-early").status_code == 404


def _resume(stack: Stack, job_id: str, last_id: int, key: str | None = None) -> httpx.Response:
    with stack.client(key) if key else stack.client() as c:
        return c.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(last_id)})


def test_resume_returns_exactly_the_rest_then_live(stack: Stack, slow_worker: Proc) -> None:
    first: list[tuple[int, str]] = []
    with (
        stack.client() as c,
        connect_sse(c, "POST", "/medgemma", json=ask("resume me", model=SLOW, verbosity=0)) as src,
    ):
        job_id = src.response.headers["x-job-id"]
        for e in events_of(src):
            first.append((int(e.id), json.loads(e.data)["text"]))
            if len(first) == 6:
                break  # connection dropped after event 6
    with (
        stack.client() as c,
        connect_sse(c, "GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": "6"}) as src,
    ):
        rest = [(int(e.id), e.event, e.data) for e in events_of(src)]
    ids = [i for i, _ in first] + [i for i, _, _ in rest]
    # No duplicate; the text below proves no gap (a frame that joins token events waiting in
    # the log carries the last one's id, so ids may skip).
    assert ids == sorted(set(ids)), "no duplicate, in order"
    text = "".join(t for _, t in first) + "".join(
        json.loads(d)["text"] for _, ev, d in rest if ev == "token"
    )
    done = json.loads(rest[-1][2])
    assert rest[-1][1] == "done" and done["finish_reason"] == "length"
    n = done["usage"]["completion_tokens"]
    assert text == "".join(f"tok{i} " for i in range(n))


def test_resume_keeps_the_openai_format(stack: Stack, slow_worker: Proc) -> None:
    body = {
        "model": SLOW,
        "stream": True,
        "max_tokens": 12,
        "messages": [{"role": "user", "content": "hi"}],
    }
    seen = 0
    resumable = {"X-Resumable": "true"}  # OpenAI clients never resume unless they say so
    with (
        stack.client() as c,
        connect_sse(c, "POST", "/v1/chat/completions", json=body, headers=resumable) as src,
    ):
        job_id = src.response.headers["x-job-id"]
        for e in events_of(src):
            seen = int(e.id) if e.id else seen
            if seen == 4:
                break
    with (
        stack.client() as c,
        connect_sse(c, "GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": "4"}) as src,
    ):
        datas = [e.data for e in events_of(src)]
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert all(ch["id"] == f"chatcmpl-{job_id}" for ch in chunks)
    contents = [ch["choices"][0]["delta"].get("content") for ch in chunks[:-1]]
    assert contents == [f"tok{i} " for i in range(4, 12)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_dropped_openai_stream_is_cancelled_at_once(stack: Stack, slow_worker: Proc) -> None:
    """Open WebUI's Stop drops the connection and never resumes: the job stops at once
    instead of generating through the resume grace (1 s here: 20 more tokens) for nobody."""
    body = {"model": SLOW, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with stack.client() as c, connect_sse(c, "POST", "/v1/chat/completions", json=body) as src:
        job_id = src.response.headers["x-job-id"]
        for e in events_of(src):
            if e.id and int(e.id) >= 4:
                break  # Stop
    done, _ = wait_for_done(stack, job_id, timeout_s=10)
    assert done.finish_reason == "cancelled"
    assert done.usage.completion_tokens < 4 + 10  # within half the grace of the drop


def test_other_users_cannot_cancel_or_resume(stack: Stack, slow_worker: Proc) -> None:
    with stack.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": SLOW, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
        )
    job_id = r.headers["x-job-id"]
    with stack.client(OTHER_KEY) as bob:
        assert bob.post(f"/jobs/{job_id}/cancel").status_code == 404
        assert bob.get(f"/jobs/{job_id}/events").status_code == 404
    with stack.client() as c:
        assert c.get("/jobs/nonexistent-job-id/events").status_code == 404


def test_every_chat_response_carries_its_job_id(stack: Stack, slow_worker: Proc) -> None:
    with stack.client() as c:
        a = c.post("/medgemma", json={**ask("x", model=SLOW), "stream": False, "verbosity": 0})
        b = c.post(
            "/v1/chat/completions",
            json={"model": SLOW, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
        )
    assert a.headers["x-job-id"] and b.headers["x-job-id"]
    assert b.json()["id"] == f"chatcmpl-{b.headers['x-job-id']}"


def _worker_running(stack: Stack, job_id: str, workers: list[Proc]) -> Proc:
    """The worker process that holds the job's claim (worker ids end with the pid)."""
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        owner = redis.get(Keys().job_claim(job_id))
        for w in workers:
            if owner and owner.endswith(f"-{w.popen.pid}"):
                return w
        time.sleep(0.05)
    raise AssertionError("no worker claimed the job")


@pytest.mark.parametrize(
    ("model", "kill_after_tokens"), [("slow-model", 5), ("slow-start-model", 0)]
)
def test_sigkill_of_a_worker_hands_the_job_over(
    stack: Stack, model: str, kill_after_tokens: int
) -> None:
    """A worker killed mid-answer (or before its first token): a second worker continues
    and the client sees one continuous stream, no gap, no duplicate text."""
    workers = [stack.add_worker(model), stack.add_worker(model)]
    try:
        seen: list[tuple[int, str, str]] = []
        killed = False
        with (
            stack.client() as c,
            connect_sse(
                c, "POST", "/medgemma", json=ask("keep going", model=model, verbosity=0)
            ) as src,
        ):
            job_id = src.response.headers["x-job-id"]
            victim = _worker_running(stack, job_id, [p for p in stack.procs if p.alive])
            if kill_after_tokens == 0:
                victim.popen.kill()  # during the simulated prefill: no token was sent
                killed = True
            for e in events_of(src):
                seen.append((int(e.id), e.event, e.data))
                if not killed and len(seen) == kill_after_tokens:
                    victim.popen.kill()
                    killed = True
        assert killed
        ids = [i for i, _, _ in seen]
        assert ids == sorted(set(ids))  # (joined frames carry their last event's id)
        assert seen[-1][1] == "done", seen[-1]
        done = json.loads(seen[-1][2])
        n = done["usage"]["completion_tokens"]
        text = "".join(json.loads(d)["text"] for _, ev, d in seen if ev == "token")
        assert text == "".join(f"tok{i} " for i in range(n))
        assert done["finish_reason"] == "length"
    finally:
        for w in workers:
            w.stop()


def test_sigkill_with_no_other_worker_ends_in_an_error_within_10s(stack: Stack) -> None:
    worker = stack.add_worker("slow-start-model")
    with (
        stack.client() as c,
        connect_sse(
            c, "POST", "/medgemma", json=ask("anyone there?", model="slow-start-model")
        ) as src,
    ):
        job_id = src.response.headers["x-job-id"]
        _worker_running(stack, job_id, [worker]).popen.kill()
        killed_at = time.monotonic()
        events = list(events_of(src))
    assert events[-1].event == "error"
    assert json.loads(events[-1].data)["error"]["code"] == "worker_lost"
    assert time.monotonic() - killed_at < 10


def test_a_full_line_says_429_with_retry_after_and_waiters_see_their_place(
    stack: Stack,
) -> None:
    """queue-model: one worker, 3 s per answer, at most 2 waiting."""
    worker = stack.add_worker("queue-model")
    results: dict[str, list[tuple[str, str]]] = {}

    def stream(name: str) -> None:
        with (
            stack.client() as c,
            connect_sse(c, "POST", "/medgemma", json=ask(name, model="queue-model")) as src,
        ):
            for e in events_of(src):
                results[name].append((e.event, e.data))

    redis = Redis.from_url(stack.redis_url)
    try:
        threads = []
        # a is running (it has an event), then b and c wait in the model's queue (a worker
        # reads the queue only when it has a free slot, so they stay in the list).
        for name, ready in (
            ("a", lambda: bool(results["a"])),
            ("b", lambda: redis.llen("queue-model") == 1),
            ("c", lambda: redis.llen("queue-model") == 2),
        ):
            results[name] = []
            t = threading.Thread(target=stream, args=(name,))
            t.start()
            threads.append(t)
            wait_for(ready, 20, f"{name} to be running or in line")
        with stack.client() as c:
            full = c.post("/medgemma", json={**ask("d", model="queue-model"), "stream": False})
        for t in threads:
            t.join(30)
    finally:
        redis.close()
        worker.stop()
    assert full.status_code == 429
    assert full.json()["error"]["code"] == "queue_full"
    assert 1 <= int(full.headers["retry-after"]) <= 60
    for name in ("a", "b", "c"):
        assert results[name][-1][0] == "done", (name, results[name][-2:])
    places = [json.loads(d) for ev, d in results["c"] if ev == "queued"]
    assert places, "c waited and was told its place in line"
    assert places[0]["position"] == 2 and places[0]["eta_s"] > 0
    assert [p["position"] for p in places] == sorted((p["position"] for p in places), reverse=True)
    assert not any(ev == "queued" for ev, _ in results["a"])
