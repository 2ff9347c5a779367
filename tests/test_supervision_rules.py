"""Supervision's rule for a claim it never saw, on a fake Redis: a job that a worker took and
lost between two of the gateway's looks (its lease lapsed under overload, say) is handed over
at once, not waited for until its queue timeout as if it were still in line; and it is handed
over once, not again for the same start."""

from __future__ import annotations

import time
from typing import Any, cast

import anyio
import fakeredis

from gateway.services.queue_book import QueueBook
from gateway.services.supervision import Phase, SupervisedJobs, Supervisor, _Watch
from shared.keys import Keys
from shared.protocol import (
    ChatMessage,
    Job,
    JobMeta,
    QueuedEvent,
    TextPart,
    record_start,
)

KEYS = Keys("t")


class Jobs:
    """The job service as supervision sees it; ``resend`` records what was handed over."""

    def __init__(self, redis: Any) -> None:
        self.redis, self.keys, self.relay = redis, KEYS, None
        self.book = QueueBook(redis, KEYS, queue_timeout_s=120)
        self.resent: list[Job] = []

    async def meta(self, job_id: str) -> JobMeta | None:
        raw = await self.redis.get(KEYS.job_meta(job_id))
        return None if raw is None else JobMeta.model_validate_json(raw)

    async def live_workers(self, model: str, *, besides: str | None = None) -> int:
        return 1

    async def promote(self, job_id: str) -> bool:
        return False

    async def resend(self, job: Job) -> None:
        self.resent.append(job)


async def _looks(taken: bool, looks: int) -> tuple[_Watch, Jobs, list[object]]:
    redis = fakeredis.aioredis.FakeRedis(decode_responses=True)
    jobs = Jobs(redis)
    sup = Supervisor(cast(SupervisedJobs, jobs), idle_timeout_s=30, job_ttl_s=600, outage_s=10)
    now = time.time()
    job = Job(
        job_id="job-taken-unseen",
        model="m",
        messages=[ChatMessage(role="user", content=[TextPart(text="q")])],
        enqueued_at=now,
        start_deadline=now + 120,
    )
    meta = JobMeta(job_id=job.job_id, owner="o", model="m", api="medgemma", created=int(now))
    await redis.set(KEYS.job_payload(job.job_id), job.model_dump_json())
    await redis.set(KEYS.job_meta(job.job_id), meta.model_dump_json())
    await jobs.book.book(job)
    if taken:  # a worker claimed it and left the line; its claim has lapsed since
        pipe = redis.pipeline(transaction=False)
        record_start(pipe, KEYS, "m", job.job_id, now)
        await pipe.execute()
    w = _Watch(
        job_id=job.job_id,
        phase=Phase.QUEUED,
        last=0,
        deadline=time.monotonic() + 120,
        last_event_at=time.monotonic(),
    )
    said = [await sup._on_silence(w, None) for _ in range(looks)]
    return w, jobs, said


def test_a_job_taken_and_lost_unseen_is_handed_over_once() -> None:
    w, jobs, said = anyio.run(_looks, True, 3)
    assert w.phase is Phase.HANDED_OVER
    assert [j.handover for j in jobs.resent] == [1]  # at the first look, and only then
    assert said == [None, None, None]


def test_a_job_still_in_line_is_left_there() -> None:
    w, jobs, said = anyio.run(_looks, False, 2)
    assert w.phase is Phase.QUEUED and jobs.resent == []
    assert isinstance(said[0], QueuedEvent) and said[0].position == 1
