"""A Redis with a password (``requirepass``), as on a shared or remote Redis: the password in
``REDIS_URL`` reaches every client (gateway, Celery, pub/sub, heartbeats), is never logged, and
a worker given the wrong one stops at once with one clear line instead of retrying for minutes."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.processes import Proc, free_port, start_redis, start_worker
from tests.stack import Stack, ask, sse_events, start_stack

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-pw-4711"
WRONG = "wrong-pw-0815"


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("locked")
    port = free_port()
    redis: Proc = start_redis(port, workdir / "redis", workdir / "redis.log", password=PASSWORD)
    try:
        stack = start_stack(
            workdir,
            tiny_gemma_dir,
            only={"tiny-gemma"},
            redis_url=f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
        )
        try:
            yield stack
        finally:
            stack.stop()
    finally:
        redis.stop()


def test_a_chat_completes_through_a_password_protected_redis(locked: Stack) -> None:
    with locked.client() as c:
        resp, events = sse_events(c, "/medgemma", ask("What is anaemia?"))
        assert resp.status_code == 200
        assert events[-1].event == "done", events[-1].data
        r = c.post("/medgemma", json={**ask("And its causes?"), "stream": False})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    assert PASSWORD not in locked.logs()


def test_a_worker_with_the_wrong_password_exits_with_one_clear_line(
    locked: Stack, tmp_path: Path
) -> None:
    url = locked.redis_url.replace(PASSWORD, WRONG)
    log = tmp_path / "worker.log"
    proc = start_worker({**locked.env, "REDIS_URL": url, "WORKER_MODEL": "tiny-gemma"}, log)
    try:
        code = proc.popen.wait(timeout=60)
    finally:
        proc.stop()
    text = log.read_text()
    assert code == 2, text
    errors = [line for line in text.splitlines() if "refused the credentials" in line]
    assert len(errors) == 1, text
    assert "127.0.0.1" in errors[0] and "REDIS_URL" in errors[0]
    assert "Traceback" not in text and "Trying again" not in text
    assert WRONG not in text and PASSWORD not in text
    # and the stack it failed to join keeps serving
    with locked.client() as c:
        r = c.get("/readyz")
    assert r.status_code == 200 and json.loads(r.text)["models"]["tiny-gemma"] == 1


def test_a_gateway_with_the_wrong_password_exits_with_one_clear_line(
    locked: Stack, tmp_path: Path
) -> None:
    from devstack.processes import spawn

    url = locked.redis_url.replace(PASSWORD, WRONG)
    log = tmp_path / "gateway.log"
    env = {**locked.env, "REDIS_URL": url, "GATEWAY_PORT": str(free_port())}
    proc = spawn("gateway", [sys.executable, "-m", "gateway"], env, log)
    try:
        code = proc.popen.wait(timeout=60)
    finally:
        proc.stop()
    text = log.read_text()
    assert code == 2, text
    assert "refused the credentials" in text and "Traceback" not in text
    assert WRONG not in text and PASSWORD not in text
