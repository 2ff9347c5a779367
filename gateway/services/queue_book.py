"""Backpressure: a bounded line per model, with positions and honest waiting times.

The gateway books each job in ``{p}:queue:{model}`` (a sorted set by enqueue time; background
work in ``{p}:queue:{model}@background``, which workers take after it) and the worker that
takes it removes it and records the start in ``{p}:starts:{model}``. From these:

* **depth** — jobs booked and not yet taken (entries older than the queue timeout are
  dropped: those jobs are answered with ``queue_timeout`` by whichever worker takes them);
* **drain rate** — jobs started per second over the last minute, measured, not assumed;
* **position** — a job's rank in line (a background job's counts every interactive job
  waiting, even once it is promoted and goes before them: an upper bound), and its ETA =
  position / drain rate.

Our own book is used rather than Celery's lists because it gives a job's position cheaply, and
it is not fooled by the extra lists Celery's Redis transport keeps per priority.
A request past the model's ``serving.max_queue`` (per class: a flood of background work never
fills the clinicians' line) gets 429 with ``Retry-After`` = the time the measured drain rate
needs to make room.
"""

from __future__ import annotations

import math
import time
from typing import cast

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from gateway.core.errors import APIError
from shared.errors import ErrorCode
from shared.keys import Keys
from shared.protocol import PRIORITIES, QUEUE_WINDOW_S, Job, Priority

MIN_SPAN_S = 5.0


class QueueBook:
    def __init__(self, redis: Redis, keys: Keys, *, queue_timeout_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._queue_timeout_s = queue_timeout_s

    async def drain_rate(self, model: str) -> float:
        """Jobs per second started for ``model``: the starts of the last minute over the time
        they span (at least 5 s, so one early start does not promise a flood)."""
        now = time.time()
        rows: list[tuple[str, float]] = await self._redis.zrangebyscore(  # type: ignore[assignment]
            self._keys.queue_starts(model), now - QUEUE_WINDOW_S, "+inf", withscores=True
        )
        if not rows:
            return 1 / QUEUE_WINDOW_S
        oldest = min(float(score) for _job, score in rows)
        return len(rows) / min(QUEUE_WINDOW_S, max(MIN_SPAN_S, now - oldest))

    def count(self, pipe: Pipeline, model: str, priority: Priority = "interactive") -> None:
        """Queue the commands that count ``model``'s line of ``priority`` (two results; the
        second is the depth), so callers can batch them with their own."""
        key = self._keys.queue_book(model, priority)
        pipe.zremrangebyscore(key, "-inf", time.time() - self._queue_timeout_s)
        pipe.zcard(key)

    async def depth(self, model: str) -> int:
        """Jobs of every class waiting for ``model``."""
        pipe = self._redis.pipeline(transaction=False)  # one round trip
        for priority in PRIORITIES:
            self.count(pipe, model, priority)
        return sum(int(n) for n in (await pipe.execute())[1::2])

    async def refuse_if_full(self, job: Job, depth: int, bound: int) -> None:
        """429 if ``depth`` jobs already wait and the line holds ``bound``."""
        if depth < bound:
            return
        rate = await self.drain_rate(job.model)
        wait = max(1, math.ceil((depth - bound + 1) / rate))
        raise APIError(
            429,
            ErrorCode.QUEUE_FULL,
            f"{depth} requests are already waiting for {job.model!r}; at the current pace "
            f"there is room in about {wait} s.",
            headers={"Retry-After": str(wait)},
        )

    def add(self, pipe: Pipeline, job: Job) -> None:
        """Queue the commands that book ``job`` in its model's line."""
        key = self._keys.queue_book(job.model, job.priority)
        pipe.zadd(key, {job.job_id: job.enqueued_at})
        pipe.expire(key, int(self._queue_timeout_s * 2) + 60)

    async def book(self, job: Job) -> None:
        pipe = self._redis.pipeline(transaction=True)
        self.add(pipe, job)
        await pipe.execute()

    async def forget(self, job: Job) -> None:
        await self._redis.zrem(self._keys.queue_book(job.model, job.priority), job.job_id)

    async def position(self, model: str, job_id: str) -> tuple[int, float] | None:
        """(place in line starting at 1, estimated seconds to start), or None if not waiting.
        Interactive jobs go first, so a background job's place counts all of them."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zrank(self._keys.queue_book(model), job_id)
        pipe.zcard(self._keys.queue_book(model))
        pipe.zrank(self._keys.queue_book(model, "background"), job_id)
        rank, ahead, bg_rank = await pipe.execute()
        if rank is not None:
            place = int(cast(int, rank)) + 1
        elif bg_rank is not None:
            place = int(ahead) + int(cast(int, bg_rank)) + 1
        else:
            return None
        return place, round(place / await self.drain_rate(model), 1)
