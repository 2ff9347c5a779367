"""Submits jobs to workers and follows their events.

``submit`` checks that a live worker serves the model (heartbeats; 503 at once if none),
subscribes to the job's channel, and only then sends the Celery task by name to the model's
queue — the gateway never imports the worker. ``follow`` yields the job's events while
:mod:`gateway.services.supervision` makes sure no client waits forever (deadlines, handover, fenced
ends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import anyio
from celery import Celery
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError, WatchError

from gateway.core.errors import APIError
from gateway.services.images import RawImage
from gateway.services.queue_book import QueueBook
from gateway.services.relay import Relay, Subscription
from gateway.services.supervision import REPORT_GRACE_S, StreamEvent, Supervisor
from shared.errors import ErrorCode
from shared.keys import Keys
from shared.protocol import GENERATE_TASK, Job, JobMeta, celery_queue

logger = logging.getLogger(__name__)


WATCHERS_TIMEOUT_S = 2.0  # longest a stream's end waits to uncount itself


def unavailable(message: str) -> APIError:
    return APIError(503, ErrorCode.REDIS_UNAVAILABLE, message, headers={"Retry-After": "5"})


class JobService:
    def __init__(
        self,
        redis: Redis,
        relay: Relay,
        celery: Celery,
        keys: Keys,
        *,
        heartbeat_ttl_s: float,
        idle_timeout_s: float,
        job_ttl_s: int,
        resume_grace_s: float,
        queues: dict[str, str] | None = None,
        book: QueueBook,
        outage_s: float = 15.0,
    ) -> None:
        self._redis = redis
        self._relay = relay
        self._celery = celery
        self._keys = keys
        self._heartbeat_ttl_s = heartbeat_ttl_s
        self._idle_timeout_s = idle_timeout_s
        self._job_ttl_s = job_ttl_s
        self.resume_grace_s = resume_grace_s
        self._pending: set[asyncio.Task[None]] = set()
        self._queues: dict[str, str] = dict(queues or {})
        self.book = book
        self.supervisor = Supervisor(
            self, idle_timeout_s=idle_timeout_s, job_ttl_s=job_ttl_s, outage_s=outage_s
        )

    @property
    def redis(self) -> Redis:
        return self._redis

    @property
    def relay(self) -> Relay:
        return self._relay

    @property
    def keys(self) -> Keys:
        return self._keys

    # -- job records, cancellation, watchers -------------------------------------------------

    async def meta(self, job_id: str) -> JobMeta | None:
        raw = await self._redis.get(self._keys.job_meta(job_id))
        return None if raw is None else JobMeta.model_validate_json(raw)

    async def cancel(self, job_id: str) -> None:
        """Stop the job. One that no worker has claimed is ended here, at once, by the fenced
        end script (its lock, slot and images are free now, and no worker will start it);
        otherwise the worker that holds it is asked to stop and ends it. Idempotent."""
        if await self.supervisor.cancel_unclaimed(job_id):
            return
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._keys.job_cancel(job_id), "1", ex=self._job_ttl_s)
        pipe.publish(self._keys.cancel_channel, job_id)
        await pipe.execute()
        logger.info("job %s cancelled", job_id)
        self._spawn(self.supervisor.see_cancelled_through(job_id))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, past the request that started it."""
        task = asyncio.create_task(work)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    @contextlib.asynccontextmanager
    async def watching(self, job_id: str) -> AsyncIterator[None]:
        """Count an open stream of the job, so an abandoned job can be told from a resumed one."""
        key = self._keys.job_watchers(job_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.incr(key)
        pipe.expire(key, self._job_ttl_s)
        counted = False
        # Shielded like the DECR below: a client that hangs up while the INCR is on the wire
        # would otherwise leave a count that nothing takes back (the job then looks watched
        # until its TTL, and is never cancelled as abandoned).
        with anyio.move_on_after(WATCHERS_TIMEOUT_S, shield=True):
            try:
                await pipe.execute()
                counted = True
            except (RedisError, OSError):
                # The stream goes on (the relay reports a real outage as an event);
                # uncounted, the job only looks abandoned sooner if this client leaves.
                pass
        try:
            yield
        finally:
            if counted:
                # Shielded: a client that hangs up cancels the stream's task, and an unshielded
                # DECR would be cancelled with it.
                with (
                    anyio.move_on_after(WATCHERS_TIMEOUT_S, shield=True),
                    contextlib.suppress(RedisError, OSError),
                ):
                    # With its TTL again: a DECR after the key was erased (the conversation
                    # deleted meanwhile) recreates it.
                    pipe = self._redis.pipeline(transaction=True)
                    pipe.decr(key)
                    pipe.expire(key, self._job_ttl_s)
                    await pipe.execute()

    def abandoned(self, job_id: str, *, grace_s: float | None = None) -> None:
        """The client left mid-stream: cancel the job unless a client resumes it within
        ``grace_s`` (default: the resume grace; 0: at once)."""
        grace = self.resume_grace_s if grace_s is None else grace_s
        self._spawn(self._cancel_if_abandoned(job_id, grace))

    async def _cancel_if_abandoned(self, job_id: str, grace_s: float) -> None:
        if grace_s > 0:
            await asyncio.sleep(grace_s)
        try:
            watchers = int(await self._redis.get(self._keys.job_watchers(job_id)) or 0)
            if watchers <= 0:
                await self.cancel(job_id)
        except (RedisError, OSError) as exc:
            logger.warning("could not cancel abandoned job %s: %s", job_id, type(exc).__name__)

    async def aclose(self) -> None:
        for task in list(self._pending):
            task.cancel()

    def _count_live(self, pipe: Pipeline, model: str) -> None:
        pipe.zcount(self._keys.workers(model), time.time() - self._heartbeat_ttl_s, "+inf")

    async def live_counts(self, models: Sequence[str]) -> dict[str, int]:
        """Workers with a fresh heartbeat for each of ``models``, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for model in models:
            self._count_live(pipe, model)
        return {m: int(n) for m, n in zip(models, await pipe.execute(), strict=True)}

    async def live_workers(self, model: str, *, besides: str | None = None) -> int:
        """Workers serving ``model`` with a fresh heartbeat (not counting ``besides``)."""
        key = self._keys.workers(model)
        ids = await self._redis.zrangebyscore(key, time.time() - self._heartbeat_ttl_s, "+inf")
        return sum(1 for i in ids if i != besides)

    def image_key(self, job_id: str, n: int) -> str:
        return self._keys.job_image(job_id, n)

    async def store_images(self, job_id: str, images: Sequence[RawImage], ttl_s: int) -> None:
        """Store each image's bytes once, with a TTL; the worker deletes them when done."""
        pipe = self._redis.pipeline(transaction=False)
        for n, image in enumerate(images):
            pipe.set(self.image_key(job_id, n), image.data, ex=ttl_s)
        await pipe.execute()

    async def discard_images(self, job_id: str, count: int) -> None:
        if count:
            await self._redis.delete(*(self.image_key(job_id, n) for n in range(count)))

    def _send(self, job: Job, queue: str) -> None:
        """Send ``job`` to the Celery queue of its line (``queue``: the model's queue)."""
        self._celery.send_task(
            GENERATE_TASK,
            args=[job.model_dump(mode="json")],
            queue=celery_queue(queue, job.line),
            task_id=job.job_id,
            # What Celery logs and shows (e.g. in Flower) instead of the prompt.
            argsrepr=f"<job {job.job_id}>",
            kwargsrepr="{}",
        )

    @contextlib.asynccontextmanager
    async def submit(
        self,
        job: Job,
        queue: str,
        *,
        max_queue: int,
        meta: JobMeta,
        also: Callable[[Pipeline], None] | None = None,
    ) -> AsyncIterator[Subscription]:
        """Enqueue ``job`` with its subscription already live; the subscription ends on exit.

        503 at once if no worker serves the model; 429 if its line is full. Two round trips
        before the Celery message: one pipeline counts live workers and the line; then one
        transaction writes the job's record (``meta``), payload, place in line and ``also``'s
        commands while the subscription is being confirmed."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            self._count_live(pipe, job.model)
            self.book.count(pipe, job.model, job.priority)
            live, _, depth = await pipe.execute()
            if int(live) == 0:
                raise APIError(
                    503,
                    ErrorCode.MODEL_UNAVAILABLE,
                    f"No worker is serving model {job.model!r} right now. Start a worker for "
                    "it or pick another model (GET /models shows which are available).",
                    headers={"Retry-After": "10"},
                )
            await self.book.refuse_if_full(job, int(depth), max_queue)
            async with contextlib.AsyncExitStack() as stack:
                txn = self._redis.pipeline(transaction=True)
                txn.set(self._keys.job_meta(job.job_id), meta.model_dump_json(), ex=self._job_ttl_s)
                txn.set(
                    self._keys.job_payload(job.job_id), job.model_dump_json(), ex=self._job_ttl_s
                )
                self.book.add(txn, job)
                if also is not None:
                    also(txn)
                sub, _ = await asyncio.gather(
                    stack.enter_async_context(self._relay.subscribe(job.job_id)), txn.execute()
                )
                try:
                    await anyio.to_thread.run_sync(self._send, job, queue)
                except BaseException:
                    await self.book.forget(job)
                    raise
                logger.info("job %s enqueued on %s", job.job_id, celery_queue(queue, job.line))
                yield sub
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("cannot submit job %s: %s", job.job_id, type(exc).__name__)
            raise unavailable(
                "Redis is unreachable; the service cannot take requests now."
            ) from None
        except Exception as exc:
            if type(exc).__module__.startswith("kombu"):
                logger.warning("cannot submit job %s: %s", job.job_id, type(exc).__name__)
                raise unavailable("The job queue is unreachable; try again shortly.") from None
            raise

    @property
    def resume_timeout_s(self) -> float:
        return self._idle_timeout_s

    def subscribe(self, job_id: str) -> contextlib.AbstractAsyncContextManager[Subscription]:
        return self._relay.subscribe(job_id)

    def first_timeout(self, job: Job) -> float:
        return max(0.0, job.start_deadline - time.time()) + REPORT_GRACE_S

    def follow(
        self, sub: Subscription, job_id: str, *, first_timeout_s: float, after_seq: int = 0
    ) -> AsyncIterator[StreamEvent]:
        """The job's events, supervised (see :mod:`gateway.services.supervision`)."""
        return self.supervisor.follow(
            sub, job_id, first_timeout_s=first_timeout_s, after_seq=after_seq
        )

    async def resend(self, job: Job) -> None:
        """Put a handed-over job (its payload updated) back in line and on its queue."""
        await self._redis.set(
            self._keys.job_payload(job.job_id), job.model_dump_json(), ex=self._job_ttl_s
        )
        await self.book.book(job)
        await anyio.to_thread.run_sync(self._send, job, self._queue_of(job))

    def _queue_of(self, job: Job) -> str:
        return self._queues.get(job.model, job.model)

    async def promote(self, job_id: str) -> bool:
        """Send a background job that waited past its ``yields_until`` again, on its model's
        promoted line: workers take it before any other work, into a background slot (never
        one kept for clinicians), so neither a steady interactive load nor a background flood
        starves it. Once per job (a guard key holds across gateways), and only while no
        worker holds it (under ``WATCH`` of its claim); the copy left in the background
        queue is skipped by the worker that takes it (the claim). True if this call sent it."""
        claim = self._keys.job_claim(job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(claim, self._keys.job_promoted(job_id))
            raw = await pipe.get(self._keys.job_payload(job_id))
            if raw is None or await pipe.exists(claim, self._keys.job_promoted(job_id)):
                return False
            job = Job.model_validate_json(raw)
            if job.line != "background":
                return False
            promoted = job.model_copy(update={"promoted": True})
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set(self._keys.job_promoted(job_id), "1", ex=self._job_ttl_s)
            pipe.set(self._keys.job_payload(job_id), promoted.model_dump_json(), ex=self._job_ttl_s)
            try:
                await pipe.execute()
            except WatchError:
                return False  # a worker took it, or another gateway promoted it, meanwhile
        await anyio.to_thread.run_sync(self._send, promoted, self._queue_of(promoted))
        logger.info("job %s: background work waited its share; sent on the promoted line", job_id)
        return True
