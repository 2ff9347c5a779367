"""One gateway process holds a fixed, small number of Redis connections, however many
streams it carries: past GATEWAY_REDIS_MAX_CONNECTIONS, requests wait for a free connection
instead of failing (redis-py's default pool raises "Too many connections")."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from tests.stack import Stack, ask, sse_events, start_stack

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 4
STREAMS = 24


@pytest.fixture(scope="module")
def small_pool_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path
) -> Iterator[Stack]:
    s = start_stack(
        tmp_path_factory.mktemp("pool"),
        tiny_gemma_dir,
        only={"tiny-gemma"},
        settings={"GATEWAY_REDIS_MAX_CONNECTIONS": str(MAX_CONNECTIONS)},
    )
    try:
        yield s
    finally:
        s.stop()


def _gateway_connections(client: redis.Redis) -> int:
    return sum(1 for c in client.client_list() if c.get("name") == "medgemma-gateway")


def test_many_streams_share_a_bounded_pool(small_pool_stack: Stack) -> None:
    stack = small_pool_stack
    seen: list[int] = []
    done = threading.Event()
    watcher = redis.Redis.from_url(stack.redis_url, decode_responses=True)

    def watch() -> None:
        while not done.is_set():
            seen.append(_gateway_connections(watcher))
            time.sleep(0.05)

    def one(i: int) -> tuple[int, list[str]]:
        with stack.client() as c:
            resp, events = sse_events(c, "/medgemma", ask(f"question {i}", stream=True))
            return resp.status_code, [e.event for e in events]

    thread = threading.Thread(target=watch)
    thread.start()
    try:
        with ThreadPoolExecutor(STREAMS) as pool:
            results = list(pool.map(one, range(STREAMS)))
    finally:
        done.set()
        thread.join()
        watcher.close()
    assert [status for status, _ in results] == [200] * STREAMS
    assert all(events[-1] == "done" and "error" not in events for _, events in results)
    assert seen and max(seen) <= MAX_CONNECTIONS
