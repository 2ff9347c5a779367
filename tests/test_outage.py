"""Redis stopped and restarted under a running stack; SIGTERM to a busy worker and to the
gateway. Its own stack, since these tests stop its processes."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devstack.processes import start_redis, wait_for
from tests.stack import Stack, ask, start_stack, stream_in_background

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("outage"), tiny_gemma_dir)
    yield s
    s.stop()


def _ready(stack: Stack) -> bool:
    try:
        return httpx.get(f"{stack.base_url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_redis_outage_fails_fast_and_recovers_by_itself(own_stack: Stack) -> None:
    stack = own_stack
    stack.add_worker("slow-model")
    redis_proc = stack.procs[0]
    assert redis_proc.name == "redis"
    port = int(stack.redis_url.rsplit(":", 1)[1].split("/")[0])
    reader = stream_in_background(stack, ask("long", model="slow-model"))
    events = reader.events
    assert reader.wait_for_events(1, 20)
    redis_proc.stop()  # Redis goes away mid-stream
    stopped_at = time.monotonic()
    reader.join(15)
    assert not reader.is_alive(), "the open stream must end, not hang"
    assert events[-1][0] == "error"
    assert json.loads(events[-1][1])["error"]["code"] == "redis_unavailable"
    assert time.monotonic() - stopped_at < 10

    with stack.client() as c:
        t0 = time.monotonic()
        r = c.post("/medgemma", json={**ask("hello"), "stream": False})
        assert r.status_code == 503 and time.monotonic() - t0 < 5
        assert r.json()["error"]["code"] == "redis_unavailable"
        assert c.get("/models").status_code == 503
    assert not _ready(stack)

    stack.procs[0] = start_redis(port, stack.workdir / "redis", stack.workdir / "redis.log")
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
