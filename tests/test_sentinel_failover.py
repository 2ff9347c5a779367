"""Redis behind Sentinel on separate hosts: the master is killed mid-stream and fails over.

Hosts (``tests.multihost``): ``redis-a`` (the master), ``redis-b`` (its replica), three
sentinels ``s1``-``s3`` (quorum 2, down after 1.5 s), the gateway and two workers, every one
on its own network namespace. The gateway, the workers and Celery find the master through the
sentinels (``REDIS_URL=sentinel://...``). What the client sees is asserted: the answer arrives
whole (continued on the new master, or, if the stream ends with an error event, completed by
a resume with ``Last-Event-ID``), nothing lost or repeated; a conversation written before the
failover is still there; new requests succeed on the new master.

Redis replication is asynchronous: a write acknowledged by the master but not yet copied to
the replica when the master dies is lost (docs/RELIABILITY.md). The test waits until the
replica has caught up before it kills the master, so the conversation's turn must survive;
what the job writes after that point is the stack's to recover.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from httpx_sse import connect_sse
from redis import Redis

from devstack.processes import wait_for
from tests.multihost import (
    MASTER_NAME,
    SENTINEL_PORT,
    MultiHost,
    longest_stall_s,
    multihost_stack,
    needs_netbed,
)
from tests.stack import ask, events_of, stream_in_background

pytestmark = [pytest.mark.integration, pytest.mark.slow, needs_netbed]

ANSWER_TOKENS = 200  # slow-model: 200 tokens at 20 tokens/s
WHOLE = "".join(f"tok{i} " for i in range(ANSWER_TOKENS))


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[MultiHost]:
    workdir = tmp_path_factory.mktemp("failover")
    with multihost_stack(workdir, tiny_gemma_dir, sentinel=True) as stack:
        yield stack


def _master_seen_by(stack: MultiHost, sentinel: str) -> str | None:
    """The master's address as ``sentinel`` reports it (None if it cannot be asked)."""
    address = stack.bed.hosts[sentinel].address()
    client = Redis(host=address, port=SENTINEL_PORT, decode_responses=True, socket_timeout=2)
    try:
        found = client.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        return str(found[0]) if found else None
    except OSError:
        return None
    finally:
        client.close()


def _replica_caught_up(stack: MultiHost) -> bool:
    master, replica = stack.redis_at("redis-a"), stack.redis_at("redis-b")
    try:
        offset = int(master.info("replication")["master_repl_offset"])
        return int(replica.info("replication").get("slave_repl_offset", -1)) >= offset
    finally:
        master.close()
        replica.close()


def _text(events: list[tuple[str, str]]) -> str:
    return "".join(json.loads(data)["text"] for kind, data in events if kind == "token")


def _resume(stack: MultiHost, job_id: str, last_id: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The rest of a job's stream after ``last_id``, as a client that resumes reads it."""
    events: list[tuple[str, str]] = []
    ids: list[str] = []
    headers = {"Last-Event-ID": last_id}
    with (
        stack.client(timeout=90) as c,
        connect_sse(c, "GET", f"/jobs/{job_id}/events", headers=headers) as src,
    ):
        assert src.response.status_code == 200, src.response.read()
        for e in events_of(src):
            events.append((e.event, e.data))
            ids.append(e.id or "")
    return events, ids


def test_the_redis_master_killed_mid_stream(ha: MultiHost) -> None:
    conversation = {"X-Conversation-Id": "before-failover"}
    before: dict[str, Any] = {
        "model": "slow-model",
        "messages": [{"role": "user", "content": "written before the failover"}],
        "max_tokens": 5,
    }
    with ha.client() as c:
        first = c.post("/v1/chat/completions", json=before, headers=conversation)
    assert first.status_code == 200, first.text
    wait_for(lambda: _replica_caught_up(ha), 10, "the replica to catch up")

    bg = stream_in_background(ha, ask("a long answer", model="slow-model"))
    assert bg.wait_for_events(6, 30), bg.events
    old_master = ha.bed.hosts["redis-a"].address()
    ha.redis_servers["redis-a"].signal(signal.SIGKILL)
    killed_at = time.monotonic()

    bg.join(120)
    assert not bg.is_alive(), "the stream did not end"
    kinds = [kind for kind, _ in bg.events]
    events, ids = list(bg.events), list(bg.ids)
    resumed = False
    if kinds[-1] == "error":
        # The stream may end with an error event that names its cause; a resume completes it.
        error = json.loads(bg.events[-1][1])["error"]
        assert error["code"], error
        last_id = next(i for i in reversed(bg.ids) if i)
        more, more_ids = _resume(ha, bg.job_id, last_id)
        events, ids = events[:-1] + more, ids[:-1] + more_ids
        resumed = True
    assert events[-1][0] == "done", events[-3:]
    assert _text(events) == WHOLE  # nothing lost, nothing repeated
    assert json.loads(events[-1][1])["usage"]["completion_tokens"] == ANSWER_TOKENS
    # Logged events' ids increase, none repeated (a frame that joins waiting token events
    # carries the last one's id), up to the new master's last logged event; `queued` frames
    # repeat the last id (they are not in the log).
    logged = [int(i) for (kind, _), i in zip(events, ids, strict=True) if kind != "queued"]
    assert logged == sorted(set(logged)), "each logged event once, in order"
    new_master = ha.redis_at("redis-b")
    try:
        assert logged[-1] == new_master.xlen(f"mg:job:{bg.job_id}:log")
    finally:
        new_master.close()
    every = [int(i) for i in ids if i]
    assert every == sorted(every)
    recovered_s = max(t for t in bg.at) - killed_at if not resumed else time.monotonic() - killed_at

    # The failover happened: every sentinel names the replica's host as the master.
    new_master = ha.bed.hosts["redis-b"].address()
    for sentinel in ("s1", "s2", "s3"):
        wait_for(
            lambda s=sentinel: _master_seen_by(ha, s) == new_master,  # type: ignore[misc]
            30,
            f"{sentinel} to report the new master",
        )
    assert new_master != old_master

    with ha.client() as c:
        # The turn written before the failover is still there, and the conversation takes a
        # new turn (its lock was released on the new master).
        kept = c.get("/conversations/before-failover")
        assert kept.status_code == 200, kept.text
        assert kept.json()["messages"][0]["content"] == "written before the failover"
        again = c.post("/v1/chat/completions", json=before, headers=conversation)
        assert again.status_code == 200, again.text
        assert len(c.get("/conversations/before-failover").json()["messages"]) == 4
    print(  # noqa: T201 - the figures for docs/RELIABILITY.md
        f"master killed: longest stall {longest_stall_s(bg):.1f}s; stream "
        f"{'resumed' if resumed else 'continued'}; answer whole {recovered_s:.1f}s after the kill"
    )
