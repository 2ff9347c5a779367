"""worker.runtime.events: every write of a job's events is fenced by its claim. A worker whose claim
another worker holds now writes nothing — no token, no terminal event, nothing that the
terminal transaction would store — to the log or the live channel. Nor does a worker whose log
lost its last events in a Redis failover: nothing is written after a hole."""

from __future__ import annotations

import fakeredis
import pytest

from shared.keys import Keys
from shared.protocol import Usage
from worker.runtime.events import EventPublisher, Fenced, LogGap

KEYS = Keys()
JOB = "job-fenced-0001"
USAGE = Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4)


SERVER = fakeredis.FakeServer()


def _setup() -> tuple[fakeredis.FakeRedis, EventPublisher, object]:
    redis = fakeredis.FakeRedis(server=SERVER, decode_responses=True)
    redis.flushall()
    redis.set(KEYS.job_claim(JOB), "w1", px=3000)
    pubsub = redis.pubsub()
    pubsub.subscribe(KEYS.job_channel(JOB))
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    return redis, EventPublisher(redis, KEYS, JOB, ttl_s=60, owner="w1"), pubsub


def _published(pubsub: object) -> list[str]:
    out = []
    while (msg := pubsub.get_message(timeout=0.05)) is not None:  # type: ignore[attr-defined]
        out.append(msg["data"])
    return out


def test_the_holder_writes_and_a_stale_worker_writes_nothing() -> None:
    redis, pub, pubsub = _setup()
    pub.token("one ")
    assert len(redis.xrange(KEYS.job_log(JOB))) == 1
    assert len(_published(pubsub)) == 1
    assert redis.ttl(KEYS.job_log(JOB)) > 0

    redis.set(KEYS.job_claim(JOB), "w2", px=3000)  # the job was handed over to w2
    with pytest.raises(Fenced):
        pub.token("two ")
    stored = []
    with pytest.raises(Fenced):
        pub.done(
            "stop",
            Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
            disclaimer=None,
            also=lambda pipe: stored.append(pipe.rpush("mg:conv:x", "turn")),
        )
    assert len(redis.xrange(KEYS.job_log(JOB))) == 1  # nothing more in the log
    assert _published(pubsub) == []  # nor on the channel
    assert redis.exists("mg:conv:x") == 0  # the turn was not stored
    assert not pub.terminal_sent


def test_a_lapsed_claim_fences_too() -> None:
    redis, pub, _ = _setup()
    redis.delete(KEYS.job_claim(JOB))
    with pytest.raises(Fenced):
        pub.token("late ")
    assert redis.exists(KEYS.job_log(JOB)) == 0


def test_a_lease_renewal_during_the_terminal_transaction_is_not_a_fence() -> None:
    """The lease keeper renews the claim (same value) while the terminal event's transaction
    watches it: the transaction is retried and the event written once."""
    redis, pub, pubsub = _setup()
    renewer = fakeredis.FakeRedis(server=SERVER)
    renewals = []

    def renew_once(pipe: object) -> None:
        if not renewals:
            renewals.append(renewer.set(KEYS.job_claim(JOB), "w1", px=3000))

    pub.done(
        "stop",
        Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1),
        disclaimer=None,
        also=renew_once,
    )
    assert renewals == [True]
    assert [e for _id, e in redis.xrange(KEYS.job_log(JOB))] and len(
        redis.xrange(KEYS.job_log(JOB))
    ) == 1
    assert len(_published(pubsub)) == 1
    assert pub.terminal_sent


def test_nothing_is_written_after_a_hole_in_the_log() -> None:
    """A master acknowledged the worker's last token and died before its replica had it: the
    promoted replica's log ends one event short. A token or a terminal event written there
    would leave a hole that a resume, or the worker continuing the job, reads as a whole
    answer; the worker is told instead, and writes nothing."""
    redis, pub, pubsub = _setup()
    pub.token("one ")
    pub.token("two ")
    redis.xdel(KEYS.job_log(JOB), "2-0")  # acknowledged, then lost with the old master
    _published(pubsub)
    with pytest.raises(LogGap):
        pub.token("three ")
    with pytest.raises(LogGap):
        pub.done("stop", USAGE, disclaimer=None)
    assert [i for i, _ in redis.xrange(KEYS.job_log(JOB))] == ["1-0"]
    assert _published(pubsub) == []
    assert not pub.terminal_sent


def test_a_handed_over_job_writes_on_from_the_end_of_its_log() -> None:
    """The worker that continues a job numbers on from the log's last event; a write that
    ran but whose reply was lost, sent again, is in the log once."""
    redis, first, _ = _setup()
    first.token("one ")
    first.token("two ")
    redis.set(KEYS.job_claim(JOB), "w2", px=3000)
    second = EventPublisher(redis, KEYS, JOB, ttl_s=60, start_seq=2, owner="w2")
    second.token("three ")
    second.seq -= 1  # the same event again, as a retry of a lost reply sends it
    second.token("three ")
    second.done("stop", USAGE, disclaimer=None)
    rows = redis.xrange(KEYS.job_log(JOB))
    assert [i for i, _ in rows] == ["1-0", "2-0", "3-0", "4-0"]
    assert second.terminal_sent


def test_a_cancelled_jobs_erased_log_is_not_a_hole() -> None:
    """Erasing a conversation deletes its running job's log and cancels the job: the worker
    ends it with what it writes next and a cancelled event, as before the hole check."""
    redis, pub, _ = _setup()
    pub.token("one ")
    pub.token("two ")
    redis.delete(KEYS.job_log(JOB))
    redis.set(KEYS.job_cancel(JOB), "1")
    pub.token("three ")
    pub.done("cancelled", USAGE, disclaimer=None)
    assert [i for i, _ in redis.xrange(KEYS.job_log(JOB))] == ["3-0", "4-0"]
    assert pub.terminal_sent
