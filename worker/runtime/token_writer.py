"""One writer thread for every running job's tokens: one pipelined round trip per flush.

A job's thread hands each text delta to :meth:`TokenWriter.put` and goes back to decoding. The
writer takes everything that is waiting, for all jobs, and sends it in one pipeline of fenced
writes (``worker/runtime/events.py``'s script: the claim must still name this worker). When
Redis keeps up, that is one delta per event, written right after its decoding step: a lone
stream stays token by token. When it does not (a busy Redis, a link 200 ms away, a batch of
many streams), the deltas a job produced during the last round trip go out as *one* token event
carrying their joined text, up to ``max_deltas`` deltas per event (0: never joined, each delta
its own event, still one round trip for all). The sequence number counts events, so a resume by
``Last-Event-ID`` stays exact; usage (in the ``done`` event) counts tokens.

A failed write is kept on the job's publisher and raised from its next call (``Fenced`` if the
claim moved, ``LogGap``, or the Redis error), exactly where a synchronous write would have
raised it; :meth:`flush` waits until a job's tokens are written, so its terminal event always
comes last. Nothing of that job is written after a failed write: the deltas it queued meanwhile
are dropped, never sent after the hole (after a Redis failover they would land on the new
master behind an event that is not there).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis import Redis

if TYPE_CHECKING:
    from redis.client import Pipeline

logger = logging.getLogger(__name__)

#: Longest :meth:`TokenWriter.flush` waits for a job's tokens, beyond the writer's own Redis
#: timeouts, before it gives up on a writer that stopped making progress.
FLUSH_TIMEOUT_S = 60.0


class WriterStopped(ConnectionError):
    """The writer thread is not running: the job's tokens cannot be written."""


@dataclass(eq=False)
class Outbox:
    """One job's deltas waiting for the writer, and the outcome of its writes."""

    # Queues this job's events for the deltas (in order) on the writer's pipeline; returns
    # how many commands it queued.
    write: Callable[[Pipeline, list[str]], int]
    check: Callable[[object], None]  # raises for a write's result that says it failed
    pending: list[str] = field(default_factory=list)
    in_flight: int = 0  # deltas taken by the writer, not yet written
    failure: BaseException | None = None


class TokenWriter:
    def __init__(self, redis: Redis, *, max_deltas: int) -> None:
        self._redis = redis
        self.max_deltas = max_deltas
        self._cond = threading.Condition()
        self._dirty: list[Outbox] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self.flushes = 0  # round trips made (for tests and figures)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="token-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def put(self, box: Outbox, text: str) -> None:
        """Queue one delta of ``box``'s job; raises what its earlier writes ran into."""
        with self._cond:
            if box.failure is not None:
                raise box.failure
            if not self.alive():
                raise WriterStopped("the token writer is not running")
            if not box.pending:
                self._dirty.append(box)
            box.pending.append(text)
            self._cond.notify_all()

    def flush(self, box: Outbox, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until every delta of ``box`` is written; raise what the writes ran into."""
        with self._cond:
            done = self._cond.wait_for(
                lambda: (not box.pending and not box.in_flight) or not self.alive(), timeout_s
            )
            if box.failure is not None:
                raise box.failure
            if not done or box.pending or box.in_flight:
                raise WriterStopped("the token writer stopped before this job's tokens went out")

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._dirty) or self._stop)
                if self._stop and not self._dirty:
                    return
                taken = [(box, box.pending) for box in self._dirty if box.failure is None]
                for box in self._dirty:
                    box.pending = []  # (a failed job's are dropped: its thread raises)
                self._dirty = []
                for box, deltas in taken:
                    box.in_flight = len(deltas)
                if not taken:
                    self._cond.notify_all()  # flush() of a failed job sees nothing pending
                    continue
            try:
                self._write(taken)
            finally:
                with self._cond:
                    for box, _ in taken:
                        box.in_flight = 0
                    self._cond.notify_all()

    def _write(self, taken: list[tuple[Outbox, list[str]]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        counts = []
        for box, deltas in taken:
            counts.append(box.write(pipe, deltas))
        try:
            results = pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - every job of this flush fails with it
            for box, _ in taken:
                box.failure = exc
            return
        finally:
            self.flushes += 1
        at = 0
        for (box, _), n in zip(taken, counts, strict=True):
            for result in results[at : at + n]:
                try:
                    box.check(result)
                except Exception as exc:  # noqa: BLE001 - kept for the job's thread
                    box.failure = box.failure or exc
            at += n
