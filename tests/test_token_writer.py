"""worker.runtime.token_writer: one thread writes every job's tokens, joining a job's deltas into
one event when Redis falls behind, never losing, repeating or reordering text, and still fenced
by the claim, and never leaving a hole in the log when Redis fails over under it. Against a real
redis-server; "behind" is a link with 50 ms each way (``devstack.netbed.DelayProxy`` on
loopback)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from redis.backoff import ConstantBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from devstack.netbed import DelayProxy
from devstack.processes import free_port, start_redis, wait_for
from shared.keys import Keys
from shared.protocol import Usage
from worker.runtime.events import EventPublisher, Fenced
from worker.runtime.token_writer import TokenWriter, WriterStopped

KEYS = Keys()
USAGE = Usage(prompt_tokens=1, completion_tokens=40, total_tokens=41)
DELTAS = [f"t{i} " for i in range(40)]


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("writer-redis"))
    yield port
    proc.stop()


@pytest.fixture
def near(redis_port: int) -> Iterator[Redis]:
    client = Redis(port=redis_port, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def far(redis_port: int, near: Redis) -> Iterator[Redis]:
    """A client whose every packet to and from Redis takes 50 ms more."""
    proxy = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", redis_port), delay_s=0.05)
    client = Redis(*proxy.address, decode_responses=True)
    yield client
    client.close()
    proxy.close()


def _publisher(redis: Redis, writer: TokenWriter, job: str) -> EventPublisher:
    redis.set(KEYS.job_claim(job), "w1", px=30_000)
    return EventPublisher(redis, KEYS, job, ttl_s=60, owner="w1", writer=writer)


def _log(redis: Redis, job: str) -> list[dict[str, object]]:
    rows = redis.xrange(KEYS.job_log(job))
    return [json.loads(fields["e"]) for _id, fields in rows]  # type: ignore[index,union-attr]


def _started(redis: Redis, max_deltas: int) -> TokenWriter:
    writer = TokenWriter(redis, max_deltas=max_deltas)
    writer.start()
    return writer


def _assert_exact(events: list[dict[str, object]], deltas: list[str]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events[:-1]] == ["token"] * (len(events) - 1)
    assert events[-1]["type"] == "done"  # the terminal event comes after every token
    assert "".join(str(e["text"]) for e in events[:-1]) == "".join(deltas)


def test_a_writer_that_keeps_up_sends_one_event_per_token(near: Redis) -> None:
    writer = _started(near, max_deltas=16)
    try:
        pub = _publisher(near, writer, "job-near")
        for delta in DELTAS[:10]:
            pub.token(delta)
            writer.flush(pub._outbox)  # the next decoding step comes after this one is out
        pub.done("stop", USAGE, disclaimer=None)
    finally:
        writer.stop()
    events = _log(near, "job-near")
    _assert_exact(events, DELTAS[:10])
    assert len(events) == 11  # ten tokens, ten events


def test_a_writer_behind_joins_a_jobs_tokens_and_loses_nothing(far: Redis, near: Redis) -> None:
    writer = _started(far, max_deltas=16)
    try:
        pubs = [_publisher(near, writer, f"job-far-{n}") for n in range(3)]
        for pub in pubs:
            pub._redis = far  # its terminal transaction goes over the slow link too
        for delta in DELTAS:  # three streams decode faster than the link's round trip
            for pub in pubs:
                pub.token(delta)
        for pub in pubs:
            pub.done("length", USAGE, disclaimer=None)
    finally:
        writer.stop()
    for n in range(3):
        events = _log(near, f"job-far-{n}")
        _assert_exact(events, DELTAS)
        assert len(events) - 1 < len(DELTAS)  # fewer, bigger events
        assert all(len(str(e["text"]).split()) <= 16 for e in events[:-1])  # the cap holds
    # Every job's waiting tokens went out together: far fewer round trips than tokens.
    assert writer.flushes < len(DELTAS)


def test_a_cap_of_zero_never_joins_tokens(far: Redis, near: Redis) -> None:
    writer = _started(far, max_deltas=0)
    try:
        pub = _publisher(near, writer, "job-zero")
        for delta in DELTAS:
            pub.token(delta)
        pub.done("length", USAGE, disclaimer=None)
    finally:
        writer.stop()
    events = _log(near, "job-zero")
    _assert_exact(events, DELTAS)
    assert len(events) == len(DELTAS) + 1
    assert writer.flushes < len(DELTAS)  # still pipelined


def test_a_fenced_job_learns_it_at_its_next_token_and_writes_nothing_more(near: Redis) -> None:
    writer = _started(near, max_deltas=16)
    try:
        pub = _publisher(near, writer, "job-fenced")
        pub.token("mine ")
        writer.flush(pub._outbox)
        near.set(KEYS.job_claim("job-fenced"), "w2", px=30_000)  # handed over to w2
        pub.token("stale ")  # queued; the writer's fenced write refuses it
        with pytest.raises(Fenced):
            writer.flush(pub._outbox)
        with pytest.raises(Fenced):
            pub.token("more ")
        with pytest.raises(Fenced):
            pub.done("stop", USAGE, disclaimer=None)
    finally:
        writer.stop()
    assert [e["text"] for e in _log(near, "job-fenced")] == ["mine "]


def test_a_stopped_writer_fails_the_job_instead_of_hanging(near: Redis) -> None:
    writer = _started(near, max_deltas=16)
    writer.stop()
    pub = _publisher(near, writer, "job-stopped")
    with pytest.raises(WriterStopped):
        pub.token("lost? ")
    assert _log(near, "job-stopped") == []


def test_a_redis_error_reaches_the_jobs_thread(tmp_path: Path) -> None:
    port = free_port()
    proc = start_redis(port, tmp_path / "redis")
    client = Redis(port=port, decode_responses=True, socket_timeout=1)
    writer = _started(client, max_deltas=16)
    try:
        pub = _publisher(client, writer, "job-outage")
        pub.token("before ")
        writer.flush(pub._outbox)
        proc.stop()
        pub.token("during ")
        with pytest.raises(RedisError):
            writer.flush(pub._outbox)
    finally:
        writer.stop()
        client.close()
        proc.stop()


def test_a_failover_mid_write_leaves_no_hole_in_the_log(tmp_path: Path) -> None:
    """Redis fails over while a token is on its way. The master dies with it; the writer's
    client retries, but until Sentinel names the promoted replica there is no master, and the
    token's write fails. The job produced more tokens meanwhile, and by their round trip the
    new master is there. They must not land after the hole: whatever the new master's log
    holds is the job's text from the start, one event after another, and the job's thread is
    told that its tokens did not all go out (its job is handed over, continued from the log)."""
    old_port, new_port = free_port(), free_port()
    old = start_redis(old_port, tmp_path / "old")
    new = start_redis(new_port, tmp_path / "new", extra=["--replicaof", "127.0.0.1", str(old_port)])
    proxy = DelayProxy(("127.0.0.1", 0), ("127.0.0.1", old_port), delay_s=0.5)
    retries = Retry(ConstantBackoff(0.3), 3)  # ~1 s, shorter than a failover (as in CI)
    client = Redis(*proxy.address, decode_responses=True, retry=retries)
    replica = Redis(port=new_port, decode_responses=True)
    writer = _started(client, max_deltas=16)
    try:
        pub = _publisher(client, writer, "job-failover")
        pub.token("t0 ")
        writer.flush(pub._outbox)
        assert Redis(port=old_port).wait(1, 10_000) == 1  # the replica has the claim and t0
        pub.token("t1 ")
        wait_for(lambda: pub._outbox.in_flight == 1, 5, "t1 to be on its way")
        for text in ("t2 ", "t3 ", "t4 "):
            pub.token(text)  # queued behind t1
        proxy.redirect(("127.0.0.1", old_port))  # t1 is cut off on its way (0.5 s) ...
        old.stop()  # ... and no master answers
        wait_for(lambda: pub._outbox.failure is not None, 10, "t1's write to fail")
        replica.replicaof("NO", "ONE")
        proxy.redirect(("127.0.0.1", new_port))  # the sentinels name the new master
        with pytest.raises(RedisError):
            writer.flush(pub._outbox)  # (returns once the writer holds none of the job's)
        with pytest.raises(RedisError):
            pub.token("t5 ")
        events = _log(replica, "job-failover")
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # no hole
        # t0, or (on a machine so slow that t1 reached the old master before the cut, and
        # its replica) t0 t1: never anything that came after a token the log lacks.
        assert "".join(str(e["text"]) for e in events) in ("t0 ", "t0 t1 ")
    finally:
        writer.stop()
        client.close()
        replica.close()
        proxy.close()
        old.stop()
        new.stop()
