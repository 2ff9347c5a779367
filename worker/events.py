"""Publishes a job's events: to its replay log (a Redis Stream) and its live channel.

Each event goes out in one MULTI/EXEC round trip: ``XADD`` to ``{p}:job:{id}:log`` with the
stream id ``{seq}-0`` (so a reader resumes with ``XRANGE log {seq+1}-0 +``), ``EXPIRE`` on the
log with the first and the terminal event (a TTL, never MAXLEN: trimming would break resume
cursors), then ``PUBLISH`` on the live channel. Because the log is written before the
publish, a reader that subscribes first and then reads the log can never miss an event.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from redis import Redis

from shared.errors import ErrorCode, ErrorInfo
from shared.keys import Keys
from shared.protocol import DoneEvent, ErrorEvent, TokenEvent, Usage, encode_event

if TYPE_CHECKING:
    from redis.client import Pipeline

Event = TokenEvent | DoneEvent | ErrorEvent
PipelineHook = Callable[["Pipeline"], None]


class EventPublisher:
    """Numbers and publishes the events of one job."""

    def __init__(
        self, redis: Redis, keys: Keys, job_id: str, *, ttl_s: int, start_seq: int = 0
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.job_id = job_id
        self._ttl_s = ttl_s
        self.seq = start_seq  # a handed-over job continues the numbering
        self.terminal_sent = False
        self._ttl_set = False
        self.on_terminal: list[PipelineHook] = []  # run inside the done/error transaction

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def emit(self, event: Event, *, also: PipelineHook | None = None) -> None:
        """Log and publish ``event``; ``also`` adds commands to the same transaction."""
        payload = encode_event(event)
        log = self._keys.job_log(self.job_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.xadd(log, {"e": payload}, id=f"{event.seq}-0")
        # The TTL (far longer than any generation) is set with this publisher's first event
        # and renewed with the last, not on every token: one command less per token.
        if not self._ttl_set or event.type != "token":
            pipe.expire(log, self._ttl_s)
            self._ttl_set = True
        if also is not None:
            also(pipe)
        if event.type != "token":
            for hook in self.on_terminal:
                hook(pipe)
        pipe.publish(self._keys.job_channel(self.job_id), payload)
        pipe.execute()
        if event.type != "token":
            self.terminal_sent = True

    def token(self, text: str) -> None:
        self.emit(TokenEvent(job_id=self.job_id, seq=self._next(), text=text))

    def done(
        self,
        finish_reason: Literal["stop", "length", "cancelled"],
        usage: Usage,
        *,
        disclaimer: str | None,
        also: PipelineHook | None = None,
    ) -> None:
        event = DoneEvent(
            job_id=self.job_id,
            seq=self._next(),
            finish_reason=finish_reason,
            usage=usage,
            disclaimer=disclaimer,
        )
        self.emit(event, also=also)

    def error(self, code: ErrorCode, message: str, *, type_: str = "server_error") -> None:
        info = ErrorInfo(message=message, type=type_, code=code.value)
        self.emit(ErrorEvent(job_id=self.job_id, seq=self._next(), error=info))
