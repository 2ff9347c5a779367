"""Redis stopped and restarted under a running stack; SIGTERM to a busy worker and to the
gateway. Its own stack, since these tests stop its processes."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack.processes import Proc, start_gateway, start_redis, wait_for, wait_ready
from shared.redis_url import sync_redis
from tests.stack import Stack, ask, start_stack, stream_in_background

pytestmark = pytest.mark.integration


OUTAGE_S = 4.0  # GATEWAY_REDIS_OUTAGE_S: how long an open stream rides out an outage


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("outage"),
        tiny_gemma_dir,
        settings={"GATEWAY_REDIS_OUTAGE_S": str(OUTAGE_S)},
        appendonly=True,
    )
    yield s
    s.stop()


def _redis_port(stack: Stack) -> int:
    return int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])


def _restart_redis(stack: Stack) -> Proc:
    """A new redis-server on the same port and data folder (it reloads its AOF)."""
    folder = stack.workdir / "redis"
    return start_redis(_redis_port(stack), folder, stack.workdir / "redis.log", appendonly=True)


def _texts(events: list[tuple[str, str]]) -> list[str]:
    return [json.loads(data)["text"] for kind, data in events if kind == "token"]


def test_a_redis_restart_inside_the_allowance_loses_no_text(own_stack: Stack) -> None:
    """Redis (with AOF) restarted mid-stream: the stream rides it out and the answer arrives
    whole, every token once, in order; the next turn of the conversation works."""
    stack = own_stack
    stack.add_worker("slow-model")
    body = ask("long", model="slow-model", verbosity=0)  # 50 tokens at 20/s
    reader = stream_in_background(stack, body)
    assert reader.wait_for_events(5, 20)
    stack.procs[0].stop()
    stack.procs[0] = _restart_redis(stack)
    reader.join(60)
    assert not reader.is_alive(), "the stream must end"
    kinds = [kind for kind, _ in reader.events]
    assert kinds[-1] == "done", reader.events[-3:]
    done = json.loads(reader.events[-1][1])
    n = done["usage"]["completion_tokens"]
    assert "".join(_texts(reader.events)) == "".join(f"tok{i} " for i in range(n))
    assert n == 50


def _ready(stack: Stack) -> bool:
    try:
        return httpx.get(f"{stack.base_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_an_outage_past_the_allowance_ends_streams_and_recovers_by_itself(own_stack: Stack) -> None:
    stack = own_stack
    stack.add_worker("slow-model")
    redis_proc = stack.procs[0]
    assert redis_proc.name == "redis"
    reader = stream_in_background(stack, ask("long", model="slow-model"))
    events = reader.events
    assert reader.wait_for_events(1, 20)
    redis_proc.stop()  # Redis goes away mid-stream, for longer than the allowance
    stopped_at = time.monotonic()
    reader.join(OUTAGE_S + 10)
    assert not reader.is_alive(), "the open stream must end, not hang"
    assert events[-1][0] == "error"
    assert json.loads(events[-1][1])["error"]["code"] == "redis_unavailable"
    assert OUTAGE_S - 1 < time.monotonic() - stopped_at < OUTAGE_S + 6

    with stack.client() as c:
        t0 = time.monotonic()
        r = c.post("/medgemma", json={**ask("hello"), "stream": False})
        assert r.status_code == 503 and time.monotonic() - t0 < 5
        assert r.json()["error"]["code"] == "redis_unavailable"
        assert c.get("/models").status_code == 503
    assert not _ready(stack)

    stack.procs[0] = _restart_redis(stack)
    wait_for(lambda: _ready(stack), 30, "the stack to recover after Redis came back")
    with stack.client() as c:
        r = c.post("/medgemma", json={**ask("back again"), "stream": False})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0


def test_sigterm_to_a_busy_worker_finishes_the_answer_and_exits_0(own_stack: Stack) -> None:
    stack = own_stack
    worker = stack.add_worker("slow-model")
    # Only this worker serves slow-model now: stop the earlier one first.
    for p in stack.procs:
        if p is not worker and p.name == "worker" and "slow-model" in str(p.log_path):
            p.stop()
    body = ask("finish me", model="slow-model", verbosity=0)  # 50 tokens, 2.5 s
    reader = stream_in_background(stack, body)
    assert reader.wait_for_events(1, 20)
    worker.signal(signal.SIGTERM)
    reader.join(30)
    got = [kind for kind, _ in reader.events]
    assert got[-1] == "done", got[-3:]
    assert worker.popen.wait(30) == 0


def test_sigterm_to_the_gateway_ends_open_streams_with_a_clean_event(own_stack: Stack) -> None:
    stack = own_stack
    stack.add_worker("slow-model")
    reader = stream_in_background(stack, ask("long", model="slow-model"))
    frames = reader.events
    assert reader.wait_for_events(1, 20)
    gateway = next(p for p in stack.procs if p.name == "gateway")
    gateway.signal(signal.SIGTERM)
    reader.join(15)
    assert not reader.is_alive()
    kind, data = frames[-1]
    assert kind == "error"
    err = json.loads(data)["error"]
    assert err["code"] == "gateway_shutdown" and "/events" in err["message"]
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says so (143).
    assert gateway.popen.wait(15) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in gateway.log_text()


def test_a_non_stream_answer_cut_by_a_gateway_restart_is_a_503_with_a_code(
    own_stack: Stack,
) -> None:
    """The previous test stopped the gateway: a new one takes its port. A `stream: false`
    request in flight when it gets SIGTERM is answered 503 `gateway_shutdown` (not uvicorn's
    bare 500 after its graceful timeout), and its job is cancelled."""
    stack = own_stack
    gateway = start_gateway(stack.env, stack.port, stack.workdir / "gateway-2.log")
    stack.procs.append(gateway)
    wait_ready(stack.port, "slow-model", 30)
    result: dict[str, httpx.Response] = {}

    def ask_and_wait() -> None:
        with stack.client() as c:
            body = {**ask("long", model="slow-model", verbosity=3), "stream": False}
            result["response"] = c.post("/medgemma", json=body)

    thread = threading.Thread(target=ask_and_wait)
    thread.start()
    wait_for(lambda: "enqueued" in gateway.log_text(), 20, "the job to be enqueued")
    gateway.signal(signal.SIGTERM)
    thread.join(15)
    assert not thread.is_alive()
    response = result["response"]
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "gateway_shutdown"
    job_id = response.headers["x-job-id"]
    redis = sync_redis(stack.redis_url, decode_responses=True)
    assert redis.get(f"mg:job:{job_id}:cancel") == "1"
