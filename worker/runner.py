"""Runs one job: claim it, generate with the engine, publish events, store the turn.

This is everything a Celery task does, without Celery, so it can be tested directly.

* **Exactly one runner per job.** The worker claims ``{p}:job:{id}:claim`` with ``SET NX``
  before it starts; a second delivery of the same job (a broker redelivery) finds the claim
  and is skipped.
* **Never run late for nobody.** A job picked up after its ``start_deadline`` is answered with
  a ``queue_timeout`` error event instead of being generated.
* **Every job ends with a terminal event** (``done`` or ``error``), whatever fails, so no
  client waits forever. Error messages never contain the prompt or the answer, and neither
  does any log line: logs name the job id, counts and exception types only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis

from shared.errors import ErrorCode
from shared.keys import Keys
from shared.protocol import Job, Usage
from shared.registry import ModelEntry
from worker.conversation import ConversationWriter
from worker.engine import Engine, PromptTooLong
from worker.events import EventPublisher

logger = logging.getLogger(__name__)


@dataclass
class RunnerConfig:
    worker_id: str
    job_ttl_s: int
    conversation_ttl_s: int
    claim_ttl_s: int


class JobRunner:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        engine: Engine,
        entry: ModelEntry,
        config: RunnerConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._engine = engine
        self._entry = entry
        self._config = config
        self._clock = clock
        self._conversations = ConversationWriter(redis, keys, ttl_s=config.conversation_ttl_s)
        self.jobs_running = 0

    def run(self, job: Job) -> None:
        claimed = self._redis.set(
            self._keys.job_claim(job.job_id),
            self._config.worker_id,
            nx=True,
            ex=self._config.claim_ttl_s,
        )
        if not claimed:
            logger.warning("job %s already claimed by another run; skipped", job.job_id)
            return
        pub = EventPublisher(self._redis, self._keys, job.job_id, ttl_s=self._config.job_ttl_s)
        self.jobs_running += 1
        try:
            self._run_claimed(job, pub)
        finally:
            self.jobs_running -= 1
            if job.conversation is not None:
                self._conversations.release(job.conversation, job.job_id)

    def _run_claimed(self, job: Job, pub: EventPublisher) -> None:
        waited = self._clock() - job.enqueued_at
        if self._clock() > job.start_deadline:
            logger.info("job %s dropped: waited %.1fs, past its start deadline", job.job_id, waited)
            pub.error(
                ErrorCode.QUEUE_TIMEOUT,
                "The request waited in the queue past its deadline and was not run. "
                "Try again when the service is less busy.",
            )
            return
        logger.info("job %s started after %.3fs in queue", job.job_id, waited)
        try:
            result = self._engine.generate(job.messages, job.sampling, on_text=pub.token)
        except PromptTooLong as exc:
            pub.error(ErrorCode.PROMPT_TOO_LONG, str(exc), type_="invalid_request_error")
            return
        except Exception as exc:  # noqa: BLE001 - any engine failure must end the stream
            logger.error("job %s failed in the engine: %s", job.job_id, type(exc).__name__)
            pub.error(
                ErrorCode.GENERATION_FAILED,
                "The model failed while generating this answer. Try again; if it keeps "
                "failing, tell the operators the job id.",
            )
            return
        usage = Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
            cost=self._entry.cost(result.prompt_tokens, result.completion_tokens),
        )
        conv = job.conversation
        store = conv is not None and result.finish_reason != "cancelled"

        def append(pipe):  # type: ignore[no-untyped-def]
            assert conv is not None
            self._conversations.append_turn(pipe, conv, job.messages[-1], result.text)

        pub.done(
            result.finish_reason,
            usage,
            disclaimer=self._entry.disclaimer,
            also=append if store else None,
        )
        logger.info(
            "job %s finished: %s, %d prompt + %d completion tokens, first token %.3fs",
            job.job_id,
            result.finish_reason,
            result.prompt_tokens,
            result.completion_tokens,
            result.first_token_s or 0.0,
        )
