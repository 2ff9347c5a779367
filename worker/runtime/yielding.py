"""How background work gives way to interactive work inside one worker.

The runner's threads (one per Celery slot) share one :class:`WorkClasses`:

* **Intake** (:meth:`accepts_background` and :meth:`accepts_promoted`, read by the consumer
  every few ms, see :mod:`worker.runtime.celery_app`): the worker reads its background queue
  only while it runs no interactive job and has a background slot free, and its promoted line
  (background work that waited its share) whenever a background slot is free. Background work
  of either line never holds more than the background slots, so interactive work always finds
  room. The consumer may still take a few messages between two looks: :meth:`try_start`
  refuses those, and the task sends them back to their queue.
* **Pause** (:meth:`must_yield`): a running background job stops after its current token
  while interactive work runs here, and :meth:`wait_for_room` holds it (claim and text kept)
  until no interactive job is left — or until it has paused for its share
  (:attr:`Job.share_s`) in all: then it no longer gives way, so nothing starves. The share is
  counted from its pauses, not from when it was sent: under a long background flood a job
  waits in line mostly behind other background work, which is not giving way to anyone, and
  once the time since sending was the measure, such work ran beside clinicians and their first
  token waited for the batch's step (docs/BENCHMARKS.md §11).

* **Ahead of the batch** (:meth:`others_yield`): an interactive job that finds only pausing
  background work here decodes alone, on the fast single-stream path, instead of joining the
  batch they are leaving: its prefill waits at most for the batch's step in flight (the model
  takes one forward pass at a time), and the batch's thread stops as soon as they are out
  (docs/BENCHMARKS.md §11).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from shared.protocol import Job

PAUSE_CHECK_S = 0.2  # a paused job looks at its cancel flag and lease this often


class WorkClasses:
    def __init__(self, background_slots: int, clock: Callable[[], float] = time.time) -> None:
        self._background_slots = background_slots
        self._clock = clock
        self.running = 0
        self.interactive = 0
        self._background_jobs: dict[str, Job] = {}  # running background jobs, by id
        self._paused_s: dict[str, float] = {}  # how long each of them has paused so far
        self._changed = threading.Condition()  # notified whenever a count changes

    @property
    def background(self) -> int:
        return len(self._background_jobs)

    def accepts_background(self) -> bool:
        return self.interactive == 0 and self.accepts_promoted()

    def accepts_promoted(self) -> bool:
        return self.background < self._background_slots

    def try_start(self, job: Job) -> bool:
        """Count ``job`` as running, unless it is background work this worker must not take
        now: every background slot is busy, or an interactive job runs here and it has not
        been promoted. Celery can deliver a few messages between two looks of the intake, so
        the rule is held here."""
        with self._changed:
            if job.priority == "background" and not (
                self.accepts_promoted() if job.promoted else self.accepts_background()
            ):
                return False
            self._count(job, +1)
            return True

    def ended(self, job: Job) -> None:
        self._count(job, -1)

    def _count(self, job: Job, step: int) -> None:
        with self._changed:  # (re-entrant use from try_start: Condition's default RLock)
            self.running += step
            if job.priority == "background":
                if step > 0:
                    self._background_jobs[job.job_id] = job
                else:
                    self._background_jobs.pop(job.job_id, None)
                    self._paused_s.pop(job.job_id, None)
            else:
                self.interactive += step
            self._changed.notify_all()

    def _yields(self, job: Job, pausing_s: float = 0.0) -> bool:
        """Whether ``job`` still gives way: background work that has paused for less than its
        share (``pausing_s``: the pause in progress, not yet counted)."""
        share = job.share_s
        return (
            job.priority == "background"
            and share is not None
            and self._paused_s.get(job.job_id, 0.0) + pausing_s < share
        )

    def must_yield(self, job: Job) -> bool:
        """Whether ``job`` must pause now: background work while interactive work runs."""
        return self.interactive > 0 and self._yields(job)

    def others_yield(self, job: Job) -> bool:
        """Whether ``job`` is the one interactive job here and every other running job is
        background work pausing for it: then it need not join their batch."""
        with self._changed:
            others = list(self._background_jobs.values())
            return (
                job.priority != "background"
                and self.interactive == 1
                and bool(others)
                and all(self._yields(other) for other in others)
            )

    def wait_for_room(self, job: Job, stopped: Callable[[], bool]) -> None:
        """Hold a paused job until it need not give way any more, or must stop; the time
        held counts towards its share."""
        began = self._clock()
        with self._changed:
            try:
                while (
                    self.interactive > 0
                    and self._yields(job, self._clock() - began)
                    and not stopped()
                ):
                    self._changed.wait(PAUSE_CHECK_S)
            finally:
                if job.job_id in self._background_jobs:  # (still running here)
                    spent = self._paused_s.get(job.job_id, 0.0) + self._clock() - began
                    self._paused_s[job.job_id] = spent
