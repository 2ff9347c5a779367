"""Runs one job: claim it, generate with the engine, publish events, store the turn.

This is everything a Celery task does, without Celery, so it can be tested directly.

* **Exactly one runner per job.** The worker claims ``{p}:job:{id}:claim`` with ``SET NX``
  before it starts; a second delivery of the same job (a broker redelivery) finds the claim
  and is skipped.
* **Never run late for nobody.** A job picked up after its ``start_deadline`` is answered with
  a ``queue_timeout`` error event instead of being generated.
* **Background work gives way** (:mod:`worker.runtime.yielding`): one that is running when
  interactive work arrives pauses after its current token — it leaves the engine, keeping
  its claim and its text — and continues from that text (the handover's continuation) once
  no interactive job runs here, or once it has paused for its share in all (``Job.share_s``),
  so a steady interactive load cannot starve it: vLLM's preemption by recompute, per job.
* **Every job ends with a terminal event** (``done`` or ``error``), whatever fails, so no
  client waits forever. Error messages never contain the prompt or the answer, and neither
  does any log line: logs name the job id, counts and exception types only.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image
from redis import Redis
from redis.exceptions import RedisError

from shared.errors import ErrorCode
from shared.keys import Keys
from shared.protocol import (
    TERMINAL_TYPES,
    Job,
    JobTiming,
    TokenEvent,
    Usage,
    decode_event,
    record_start,
)
from shared.registry import ModelEntry
from worker.engines.base import (
    GenerationEngine,
    GenerationResult,
    ImagesNotSupported,
    PromptTooLong,
)
from worker.runtime.cancel import CancelWatcher
from worker.runtime.conversation import ConversationWriter
from worker.runtime.events import EventPublisher, Fenced, LogGap
from worker.runtime.lease import LeaseKeeper
from worker.runtime.token_writer import TokenWriter
from worker.runtime.yielding import WorkClasses

if TYPE_CHECKING:
    from redis.client import Pipeline

logger = logging.getLogger(__name__)


class _ImageGone(LookupError):
    """An image of the job expired or does not match its digest."""


class Deferred(Exception):
    """Background work that this worker must not start now (see :meth:`JobRunner.run`)."""


@dataclass
class RunnerConfig:
    worker_id: str
    job_ttl_s: int
    conversation_ttl_s: int
    claim_ttl_s: int
    background_slots: int = 1  # most background jobs at once (WORKER_BACKGROUND_SLOTS)


class JobRunner:
    def __init__(
        self,
        redis: Redis,
        blobs: Redis,
        keys: Keys,
        engine: GenerationEngine,
        entry: ModelEntry,
        config: RunnerConfig,
        *,
        cancels: CancelWatcher | None = None,
        leases: LeaseKeeper | None = None,
        writer: TokenWriter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._blobs = blobs  # a client without decode_responses, for image bytes
        self._keys = keys
        self._engine = engine
        self._entry = entry
        self._config = config
        self._clock = clock
        self._cancels = cancels
        self._writer = writer  # None: each token written by its job's thread (unit tests)
        # Without a running keeper (unit tests) claims simply last claim_ttl_s.
        self._leases = leases or LeaseKeeper(
            redis,
            keys,
            config.worker_id,
            ttl_s=config.claim_ttl_s,
            done_ttl_s=config.job_ttl_s,
        )
        self._conversations = ConversationWriter(redis, keys, ttl_s=config.conversation_ttl_s)
        # Celery's threads run jobs at once: counted, by class (worker/runtime/yielding.py).
        self.classes = WorkClasses(config.background_slots, clock)

    @property
    def jobs_running(self) -> int:
        return self.classes.running

    def accepts_background(self) -> bool:
        """Whether this worker should take background work now (read by the consumer)."""
        return self.classes.accepts_background()

    def accepts_promoted(self) -> bool:
        """Whether this worker should take promoted background work now (the consumer)."""
        return self.classes.accepts_promoted()

    def run(self, job: Job) -> None:
        """Run ``job``; :class:`Deferred` if it is background work this worker must not take
        now (nothing was done: send it back to its queue)."""
        if not self.classes.try_start(job):
            raise Deferred(job.job_id)
        try:
            self._run(job)
        finally:
            self.classes.ended(job)

    def _run(self, job: Job) -> None:
        if not self._leases.acquire(job.job_id):
            logger.warning("job %s already claimed by another run; skipped", job.job_id)
            return
        try:
            pipe = self._redis.pipeline(transaction=False)
            record_start(pipe, self._keys, job.model, job.job_id, self._clock())
            pipe.execute()
            sent, last_seq, ended = self._already_sent(job)
        except BaseException:
            # Redis failed before the job started: stop renewing the claim (it lapses with its
            # lease and the gateway hands the job over) instead of renewing it forever.
            self._leases.release(job.job_id, finished=False)
            raise
        if ended:  # a duplicate of a job that finished: nothing to do
            self._leases.release(job.job_id, finished=True)
            return
        pub = EventPublisher(
            self._redis,
            self._keys,
            job.job_id,
            ttl_s=self._config.job_ttl_s,
            start_seq=last_seq,
            owner=self._config.worker_id,  # every write checks the claim (runtime/events.py)
            writer=self._writer,
        )
        ref = job.conversation
        if ref is not None:
            pub.on_terminal.append(lambda pipe: self._conversations.release(ref, job.job_id, pipe))
        pub.on_terminal.append(lambda pipe: self._release_held(job, pipe))
        if self._cancels is not None:
            self._cancels.begin(job.job_id)
        # Stopped unfinished with the claim still ours (Redis stayed away, or the log lost
        # events): the claim lapses and the gateway hands the job over.
        hand_over = False
        try:
            self._run_claimed(job, pub, sent)
        except Fenced:
            self._leases.forfeit(job.job_id)
            logger.info("job %s: its claim is another worker's now; stopped", job.job_id)
        except LogGap:
            hand_over = True  # a failover lost events this worker wrote: continue from the log
            logger.warning("job %s: stopped, its log lost events (a Redis failover)", job.job_id)
        except (RedisError, OSError) as exc:
            lost = self._leases.lost(job.job_id)
            hand_over = not lost  # (a lost lease: another worker holds the job already)
            # Either way the job is left to the gateway: its claim is no longer renewed, and
            # once it lapses the job is handed over and continues from its log.
            logger.warning(
                "job %s: stopped, %s (%s)",
                job.job_id,
                "its lease was lost" if lost else "Redis unreachable",
                type(exc).__name__,
            )
        finally:
            if self._cancels is not None:
                self._cancels.end(job.job_id)
            handed_over = (hand_over or self._leases.lost(job.job_id)) and not pub.terminal_sent
            self._leases.release(job.job_id, finished=not handed_over)
            if not handed_over:  # the next worker needs the images and the lock
                image_keys = self._image_keys(job)  # (gone already after a terminal event)
                if image_keys:
                    self._redis.delete(*image_keys)
                if ref is not None:  # a safety net if no terminal event could be sent
                    self._conversations.release(ref, job.job_id)

    def _release_held(self, job: Job, pipe: Pipeline) -> None:
        """In the terminal event's transaction: give back what the turn held besides its
        conversation lock — the client's stream slot (even if the gateway that took it is
        gone), the images and the payload kept for a handover."""
        if job.slot is not None:
            pipe.zrem(job.slot.key, job.slot.member)
        pipe.delete(self._keys.job_payload(job.job_id), *self._image_keys(job))

    @staticmethod
    def _image_keys(job: Job) -> list[str]:
        return [p.key for m in job.messages for p in m.images]

    def _already_sent(self, job: Job) -> tuple[str, int, bool]:
        """For a handed-over job: the text already streamed, the last sequence number, and
        whether the job already ended."""
        if job.handover == 0:
            return "", 0, False
        rows = self._redis.xrange(self._keys.job_log(job.job_id))
        events = [decode_event(fields["e"]) for _id, fields in rows]  # type: ignore[index,union-attr]
        text = "".join(e.text for e in events if isinstance(e, TokenEvent))
        ended = any(e.type in TERMINAL_TYPES for e in events)
        return text, (events[-1].seq if events else 0), ended

    def _run_claimed(self, job: Job, pub: EventPublisher, sent: str) -> None:
        waited = self._clock() - job.enqueued_at
        if self._clock() > job.start_deadline:
            logger.info("job %s dropped: waited %.1fs, past its start deadline", job.job_id, waited)
            pub.error(
                ErrorCode.QUEUE_TIMEOUT,
                "The request waited in the queue past its deadline and was not run. "
                "Try again when the service is less busy.",
            )
            return
        if self._is_cancelled(job.job_id):
            logger.info("job %s skipped: cancelled before it started", job.job_id)
            pub.done(
                "cancelled",
                Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
                disclaimer=None,
            )
            return
        logger.info(
            "job %s started after %.3fs in queue%s",
            job.job_id,
            waited,
            f" (handover {job.handover}, continuing after {len(sent)} chars)" if sent else "",
        )
        try:
            images = self._load_images(job)
        except _ImageGone:
            pub.error(
                ErrorCode.IMAGE_EXPIRED,
                "An image of this request is no longer available; send the request again.",
                type_="invalid_request_error",
            )
            return
        logger.info(
            "job %s prompt: %d messages, %d image(s)", job.job_id, len(job.messages), len(images)
        )
        started = self._clock()
        over_time = False
        pausing = False

        def on_text(text: str) -> None:
            if self._leases.lost(job.job_id):
                return  # another worker holds the job now: publish nothing more
            try:
                pub.token(text)
            except Fenced:  # found out by the write itself: the job counts as lost from now
                self._leases.forfeit(job.job_id)
                logger.info("job %s: claim taken over; its tokens are not published", job.job_id)

        def stopped() -> bool:  # a lost lease stops it too (_should_stop)
            nonlocal over_time
            limit = job.max_generation_s
            if limit is not None and self._clock() - started > limit:
                over_time = True
            return over_time or self._should_stop(job.job_id)

        def should_stop() -> bool:
            nonlocal pausing
            if pausing or stopped():  # (a pause, once begun, holds for the engine's last look)
                return True
            pausing = self.classes.must_yield(job)
            return pausing

        try:
            text, first_token_s = sent, None
            while True:
                pausing = False
                result = self._engine.generate(
                    job.messages,
                    job.sampling,
                    on_text=on_text,
                    should_stop=should_stop,
                    images=images,
                    continue_text=text,
                    others_leaving=self.classes.others_yield(job),
                )
                first_token_s = first_token_s or result.first_token_s
                result.first_token_s = first_token_s
                if not (pausing and result.finish_reason == "cancelled"):
                    break
                text = result.text
                logger.info("job %s pauses for interactive work", job.job_id)
                self.classes.wait_for_room(job, stopped)
                if stopped():
                    break  # ends as cancelled (or cut by the time limit) with what it has
                logger.info("job %s resumes after its pause", job.job_id)
        except PromptTooLong as exc:
            pub.error(ErrorCode.PROMPT_TOO_LONG, str(exc), type_="invalid_request_error")
            return
        except ImagesNotSupported as exc:
            pub.error(ErrorCode.UNSUPPORTED_CAPABILITY, str(exc), type_="invalid_request_error")
            return
        except (RedisError, OSError, LogGap):
            raise  # publishing failed: handled by run()
        except Exception as exc:  # noqa: BLE001 - any engine failure must end the stream
            if self._leases.lost(job.job_id):
                return
            logger.error("job %s failed in the engine: %s", job.job_id, type(exc).__name__)
            pub.error(
                ErrorCode.GENERATION_FAILED,
                "The model failed while generating this answer. Try again; if it keeps "
                "failing, tell the operators the job id.",
            )
            return
        if self._leases.lost(job.job_id):  # another worker owns the job now: publish nothing
            logger.info("job %s: stopped, its lease was lost", job.job_id)
            return
        if over_time and result.finish_reason == "cancelled" and not self._is_cancelled(job.job_id):
            logger.info("job %s reached its %.0fs limit", job.job_id, job.max_generation_s or 0)
            result.finish_reason = "length"  # ended by the limit, like max_tokens
        first = result.first_token_s
        timing = JobTiming(
            enqueued_at=job.enqueued_at,
            started_at=started,
            first_token_at=None if first is None else started + first,
        )
        self._finish(job, pub, result, timing)

    def _should_stop(self, job_id: str) -> bool:
        return self._is_cancelled(job_id) or self._leases.lost(job_id)

    def _is_cancelled(self, job_id: str) -> bool:
        return self._cancels is not None and self._cancels.is_cancelled(job_id)

    def _load_images(self, job: Job) -> dict[str, Image.Image]:
        images: dict[str, Image.Image] = {}
        for m in job.messages:
            for part in m.images:
                data = self._blobs.get(part.key)
                if not isinstance(data, bytes) or hashlib.sha256(data).hexdigest() != part.sha256:
                    raise _ImageGone()
                img = Image.open(io.BytesIO(data))
                img.load()
                images[part.key] = img.convert("RGB")
        return images

    def _finish(
        self, job: Job, pub: EventPublisher, result: GenerationResult, timing: JobTiming
    ) -> None:
        usage = Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
            cost=self._entry.cost(result.prompt_tokens, result.completion_tokens),
        )
        conv = job.conversation
        store = conv is not None and result.finish_reason != "cancelled"

        def append(pipe: Pipeline) -> None:
            assert conv is not None
            self._conversations.append_turn(pipe, conv, job.messages[-1], result.text)

        pub.done(
            result.finish_reason,
            usage,
            disclaimer=self._entry.disclaimer,
            also=append if store else None,
            timing=timing,
        )
        logger.info(
            "job %s finished: %s, %d prompt + %d completion tokens, first token %.3fs, "
            "%d old messages trimmed, decoded %s",
            job.job_id,
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
            result.first_token_s or 0.0,
            result.trimmed_messages,
            result.path,
        )
