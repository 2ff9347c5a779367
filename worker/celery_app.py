"""The worker's Celery app: one thin task that hands a typed :class:`Job` to the runner.

The app is built by :func:`create_celery` with the runner it calls, so nothing is created at
import time and the model is loaded once per process before the first task (see
``worker/__main__.py``). The task takes the job as a pydantic model (``pydantic=True``):
Celery validates the JSON into :class:`shared.protocol.Job`.

A job that fails validation is logged by its error count only (pydantic's messages would
quote the prompt).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps
from pydantic import ValidationError

from shared.celery_config import celery_options
from shared.protocol import GENERATE_TASK, Job
from worker.runner import JobRunner

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


def create_celery(redis_url: str, runner: JobRunner, *, shutdown_grace_s: float) -> Celery:
    app = Celery("medgemma-worker")
    app.conf.update(celery_options(redis_url))
    # SIGTERM: stop taking jobs, let running ones finish for up to this long (Celery 5.5+).
    app.conf.worker_soft_shutdown_timeout = shutdown_grace_s
    app.steps["consumer"].add(_SlotWatch)

    @app.task(name=GENERATE_TASK, ignore_result=True)  # type: ignore[untyped-decorator]
    def generate(payload: dict[str, Any]) -> None:
        try:
            job = Job.model_validate(payload)
        except ValidationError as exc:
            logger.error("rejected a malformed job: %d validation errors", exc.error_count())
            return
        runner.run(job)

    return app
