"""The worker's Celery app: one thin task that hands a typed :class:`Job` to the runner.

The app is built by :func:`create_celery` with the runner it calls, so nothing is created at
import time and the model is loaded once per process before the first task (see
``worker/__main__.py``). The task takes the job as a pydantic model (``pydantic=True``):
Celery validates the JSON into :class:`shared.protocol.Job`.

A job that fails validation is logged by its error count only (pydantic's messages would
quote the prompt).

**Intakes**: the worker consumes its model's lines in the order of ``shared.protocol.LINES``
(``shared.celery_config.LineOrder``): promoted background work, interactive work, background
work. An :class:`_Intake` per background line stops reading it while the runner says no (the
background slots are full; for the background queue, also while an interactive job runs here)
and reads it again when it says yes, with Celery's own ``cancel_task_queue`` /
``add_task_queue`` (the remote-control mechanism, made safe against a message read while
cancelling, celery #1773), from the consumer's own event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, ClassVar

from celery import Celery, bootsteps
from pydantic import ValidationError

from shared.celery_config import celery_options
from shared.protocol import GENERATE_TASK, Job
from worker.runtime.runner import Deferred, JobRunner

logger = logging.getLogger(__name__)

#: How often the consumer's event loop looks for a free slot (see :class:`_SlotWatch`).
SLOT_CHECK_S = 0.02


class _SlotWatch(bootsteps.StartStopStep):  # type: ignore[misc]
    """With ``worker_disable_prefetch`` a worker whose slots are all busy stops reading the
    queue; it reads again only when its event loop next wakes up, which nothing prompts when
    a job thread finishes, so a freed slot stayed idle for up to a second (measured: 563 ms
    mean time to first token instead of 17 ms at 8 streams on 8 slots). A timer every
    ``SLOT_CHECK_S`` wakes the loop, which then re-checks the slots: a freed slot takes the
    next job within a few ms. Costs one no-op callback per tick."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        hub = getattr(c.controller, "hub", None)
        if hub is not None and c.app.conf.worker_disable_prefetch:
            hub.call_repeatedly(SLOT_CHECK_S, _noop)


def _noop() -> None:
    pass


class _Intake(bootsteps.StartStopStep):  # type: ignore[misc]
    """Reads a queue only while ``accepts()`` (looked at every ``SLOT_CHECK_S`` on the
    consumer's loop). Subclassed per queue with its name and test."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    queue: ClassVar[str]
    accepts: ClassVar[Callable[[], bool]]

    def start(self, c: Any) -> None:
        hub = getattr(c.controller, "hub", None)
        if hub is None:
            return
        queue, accepts = self.queue, type(self).accepts
        reading = True  # the worker starts on all its queues

        def look() -> None:
            nonlocal reading
            if accepts() == reading:
                return
            reading = not reading
            if reading:
                c.add_task_queue(queue)
            else:
                c.cancel_task_queue(queue)
            logger.debug("intake of %s %s", queue, "open" if reading else "closed")

        hub.call_repeatedly(SLOT_CHECK_S, look)


class _QuietToggles(logging.Filter):
    """Celery logs every queue it starts or stops reading at INFO; the intakes toggle with
    every interactive or background job, so those lines are dropped (they log at DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in ("Canceling queue %s", "Started consuming from %s")


def create_celery(
    redis_url: str,
    runner: JobRunner,
    *,
    shutdown_grace_s: float,
    intakes: dict[str, Callable[[], bool]] | None = None,
) -> Celery:
    """``intakes``: the queues read only while their test says yes (see :class:`_Intake`)."""
    app = Celery("medgemma-worker")
    app.conf.update(celery_options(redis_url))
    # SIGTERM: stop taking jobs, let running ones finish for up to this long (Celery 5.5+).
    app.conf.worker_soft_shutdown_timeout = shutdown_grace_s
    app.steps["consumer"].add(_SlotWatch)
    for n, (queue, accepts) in enumerate((intakes or {}).items()):
        intake = type(f"Intake{n}", (_Intake,), {"queue": queue, "accepts": staticmethod(accepts)})
        app.steps["consumer"].add(intake)
    if intakes:
        logging.getLogger("celery.worker.consumer.consumer").addFilter(_QuietToggles())

    @app.task(name=GENERATE_TASK, ignore_result=True, bind=True)  # type: ignore[untyped-decorator]
    def generate(task: Any, payload: dict[str, Any]) -> None:
        try:
            job = Job.model_validate(payload)
        except ValidationError as exc:
            logger.error("rejected a malformed job: %d validation errors", exc.error_count())
            return
        try:
            runner.run(job)
        except Deferred:
            # Taken between two looks of the intake: back to its queue (the end of its line;
            # the worker reads that queue again once it may), unclaimed and untouched.
            logger.debug("job %s: background work deferred", job.job_id)
            raise task.retry(
                countdown=0, max_retries=None, argsrepr=f"<job {job.job_id}>", kwargsrepr="{}"
            ) from None

    return app
