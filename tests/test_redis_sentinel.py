"""Redis behind Sentinel: with ``REDIS_URL=sentinel://host:port/0?master=NAME`` the gateway,
the workers and Celery ask the sentinel for the master, and a chat completes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.processes import Proc, free_port, redis_server_binary, spawn, start_redis, wait_for
from shared.redis_url import celery_broker, parse_sentinel
from tests.stack import Stack, ask, sse_events, start_stack

pytestmark = pytest.mark.integration


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def sentinel_stack(
    tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("sentinel")
    master_port, sentinel_port = free_port(), free_port()
    master: Proc = start_redis(master_port, workdir / "master", workdir / "master.log")
    conf = workdir / "sentinel.conf"  # sentinel rewrites its config: it must be writable
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\n"
        f"sentinel monitor medgemma 127.0.0.1 {master_port} 1\n"
        "sentinel down-after-milliseconds medgemma 2000\n"
    )
    sentinel = spawn(
        "sentinel", [redis_server_binary(), str(conf), "--sentinel"], {}, workdir / "sentinel.log"
    )
    try:
        wait_for(lambda: _listening(sentinel_port), 10, "starting the sentinel", sentinel)
        url = f"sentinel://127.0.0.1:{sentinel_port}/0?master=medgemma"
        stack = start_stack(workdir, tiny_gemma_dir, only={"tiny-gemma"}, redis_url=url)
        try:
            yield stack
        finally:
            stack.stop()
    finally:
        sentinel.stop()
        master.stop()


def test_a_chat_completes_through_sentinel(sentinel_stack: Stack) -> None:
    with sentinel_stack.client() as c:
        resp, events = sse_events(c, "/medgemma", ask("What is a pulmonary embolism?"))
        assert resp.status_code == 200
        assert events[-1].event == "done", events[-1].data
        assert c.get("/readyz").json()["models"]["tiny-gemma"] >= 1


def test_sentinel_urls_are_parsed_for_every_client() -> None:
    t = parse_sentinel("sentinel://:pw@h1:26379,h2:26380/2?master=mg&sentinel_password=sp")
    assert t is not None and t.sentinels == [("h1", 26379), ("h2", 26380)]
    assert (t.master, t.db, t.password, t.sentinel_password) == ("mg", 2, "pw", "sp")
    broker, options = celery_broker("sentinel://:pw@h1:26379,h2:26380/2?master=mg")
    assert broker == "sentinel://:pw@h1:26379/2;sentinel://:pw@h2:26380/2"
    assert options == {"master_name": "mg"}
    assert parse_sentinel("redis://localhost:6379/0") is None
    with pytest.raises(ValueError, match="master"):
        parse_sentinel("sentinel://h1:26379/0")
