"""Publishes a job's events: to its replay log (a Redis Stream) and its live channel.

Each event goes out in one MULTI/EXEC round trip: ``XADD`` to ``{p}:job:{id}:log`` with the
stream id ``{seq}-0`` (so a reader resumes with ``XRANGE log {seq+1}-0 +``), ``EXPIRE`` on the
log with the first and the terminal event (a TTL, never MAXLEN: trimming would break resume
cursors), then ``PUBLISH`` on the live channel. Because the log is written before the
publish, a reader that subscribes first and then reads the log can never miss an event.

**Tokens go through the worker's writer** (:mod:`worker.runtime.token_writer`) when one is
given: the job's thread hands over each delta and decodes on; one thread writes every job's
waiting deltas in one pipelined round trip, joining a job's deltas into one event when Redis
falls behind. The terminal event waits for the job's tokens to be written first.

**Fenced by the claim** (``owner``): a token is written by one script that first checks that
the job's claim still names this worker, and the terminal event's transaction runs under
``WATCH`` of the claim. A worker that lost its lease (paused past it, say, while another worker
took the job over) therefore cannot put a single token into the log or the channel: the write
raises :class:`Fenced` and the worker stops.

**Never a gap in the log.** A write also checks that the log ends with this worker's previous
event. After a Redis failover it may not: the old master acknowledged an event and died before
its replica had it. Writing on would leave a hole that a resuming client, or the worker that
continues the job, reads as if nothing were missing (the continuation would repeat a token).
The write raises :class:`LogGap` instead; the worker stops and the job is handed over,
continuing from what the log holds. (A cancelled job is exempt: erasing its conversation
deleted its log, and its worker ends it as before.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

from redis import Redis
from redis.exceptions import WatchError

from shared.errors import ErrorCode, ErrorInfo
from shared.keys import Keys
from shared.protocol import DoneEvent, ErrorEvent, JobTiming, TokenEvent, Usage, encode_event
from worker.runtime.token_writer import Outbox, TokenWriter

if TYPE_CHECKING:
    from redis.client import Pipeline

Event = TokenEvent | DoneEvent | ErrorEvent
PipelineHook = Callable[["Pipeline"], None]


# KEYS: claim, log, channel, cancel flag. ARGV: owner, seq, payload, TTL (0: leave it).
# Returns 1 when the event is in the log, 0 when the claim names another worker (nothing
# written), 2 when the log does not end with event seq - 1 (nothing written: see LogGap),
# unless the job is cancelled (its conversation erased with its log: the worker ends it,
# cancelled, without a hole to mind). The log's length is its last seq: it holds events 1..n,
# never trimmed, and this check keeps it so (XLEN is O(1); reading the last entry copied its
# payload into Lua and cost Redis 72% more CPU per token). A retry of a call that ran but
# whose reply was lost (the connection dropped) finds its event there and writes nothing: the
# token is in the log once, and a reader that missed the PUBLISH reads it from the log.
_EMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local seq = tonumber(ARGV[2])
local at = redis.call('XLEN', KEYS[2])
if at >= seq then return 1 end
if at < seq - 1 and redis.call('EXISTS', KEYS[4]) == 0 then return 2 end
local added = redis.pcall('XADD', KEYS[2], ARGV[2] .. '-0', 'e', ARGV[3])
if type(added) == 'table' and added.err then return 1 end
if tonumber(ARGV[4]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
redis.call('PUBLISH', KEYS[3], ARGV[3])
return 1
"""
_WRITTEN, _GAP = 1, 2


#: Tries of a terminal transaction whose WATCHed claim was touched meanwhile.
WATCH_ATTEMPTS = 5


class Fenced(Exception):
    """This worker no longer holds the job's claim: it must publish nothing more."""


class LogGap(Exception):
    """The job's log lacks events this worker wrote (lost in a Redis failover): it must
    publish nothing more, and the job continues from the log on a handover."""


def _check_emitted(result: object, job_id: str) -> None:
    """Raise what a fenced token write's result says went wrong."""
    if result == _GAP:
        raise LogGap(job_id)
    if result != _WRITTEN:
        raise Fenced(job_id)


class EventPublisher:
    """Numbers and publishes the events of one job."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        job_id: str,
        *,
        ttl_s: int,
        start_seq: int = 0,
        owner: str | None = None,
        writer: TokenWriter | None = None,
    ) -> None:
        self._redis = redis
        self._owner = owner  # the worker id the claim must hold; None: unfenced (tests)
        self._emit_fenced = redis.register_script(_EMIT)
        self._keys = keys
        self.job_id = job_id
        self._ttl_s = ttl_s
        self.seq = start_seq  # a handed-over job continues the numbering
        self.terminal_sent = False
        self._ttl_set = False
        self.on_terminal: list[PipelineHook] = []  # run inside the done/error transaction
        self._writer = writer if owner is not None else None  # only fenced writes go there
        self._outbox = Outbox(write=self._queue_tokens, check=self._check_written)

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def emit(self, event: Event, *, also: PipelineHook | None = None) -> None:
        """Log and publish ``event``; ``also`` adds commands to the same transaction."""
        payload = encode_event(event)
        log = self._keys.job_log(self.job_id)
        channel = self._keys.job_channel(self.job_id)
        # The TTL (far longer than any generation) is set with this publisher's first event
        # and renewed with the last, not on every token: one command less per token.
        ttl = self._ttl_s if (not self._ttl_set or event.type != "token") else 0
        if event.type == "token" and self._owner is not None:
            claim = self._keys.job_claim(self.job_id)
            result = self._emit_fenced(
                keys=[claim, log, channel, self._keys.job_cancel(self.job_id)],
                args=[self._owner, event.seq, payload, ttl],
            )
            _check_emitted(result, self.job_id)
            self._ttl_set = True
            return
        for _attempt in range(WATCH_ATTEMPTS):
            try:
                self._transaction(event, payload, log, channel, ttl, also)
                break
            except WatchError:
                # The claim was touched between WATCH and EXEC: usually this worker's own lease
                # renewal, which leaves it ours. Look again (the next attempt re-checks it).
                continue
        else:
            raise Fenced(self.job_id)
        self._ttl_set = self._ttl_set or bool(ttl)
        if event.type != "token":
            self.terminal_sent = True

    def _transaction(
        self,
        event: Event,
        payload: str,
        log: str,
        channel: str,
        ttl: int,
        also: PipelineHook | None,
    ) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            if self._owner is not None:
                # The transaction runs only if the claim still holds and the log still ends
                # where this worker's last event went.
                claim = self._keys.job_claim(self.job_id)
                pipe.watch(claim, log)  # type: ignore[no-untyped-call]
                if pipe.get(claim) != self._owner:
                    raise Fenced(self.job_id)
                if self._hole_before(pipe, log, event.seq):
                    raise LogGap(self.job_id)
                pipe.multi()
            pipe.xadd(log, {"e": payload}, id=f"{event.seq}-0")
            if ttl:
                pipe.expire(log, ttl)
            if also is not None:
                also(pipe)
            if event.type != "token":
                for hook in self.on_terminal:
                    hook(pipe)
            pipe.publish(channel, payload)
            pipe.execute()

    def _hole_before(self, pipe: Pipeline, log: str, seq: int) -> bool:
        """Whether ``log`` does not end with event ``seq - 1`` (as the script checks)."""
        if int(pipe.xlen(log)) >= seq - 1:  # (events 1..n: the length is the last seq)
            return False
        return not pipe.exists(self._keys.job_cancel(self.job_id))  # (erased: not a hole)

    def token(self, text: str) -> None:
        if self._writer is not None:
            self._writer.put(self._outbox, text)  # raises what earlier writes ran into
            return
        self.emit(TokenEvent(job_id=self.job_id, seq=self._next(), text=text))

    def _queue_tokens(self, pipe: Pipeline, deltas: list[str]) -> int:
        """On the writer's thread: this job's waiting deltas as fenced token events on
        ``pipe``, at most ``max_deltas`` joined into one (0: one event each)."""
        assert self._writer is not None and self._owner is not None
        size = self._writer.max_deltas or 1
        claim = self._keys.job_claim(self.job_id)
        log, channel = self._keys.job_log(self.job_id), self._keys.job_channel(self.job_id)
        cancel = self._keys.job_cancel(self.job_id)
        groups = [deltas[i : i + size] for i in range(0, len(deltas), size)]
        for group in groups:
            event = TokenEvent(job_id=self.job_id, seq=self._next(), text="".join(group))
            ttl = 0 if self._ttl_set else self._ttl_s
            self._ttl_set = True
            self._emit_fenced(
                keys=[claim, log, channel, cancel],
                args=[self._owner, event.seq, encode_event(event), ttl],
                client=pipe,
            )
        return len(groups)

    def _check_written(self, result: object) -> None:
        if isinstance(result, BaseException):
            raise result
        _check_emitted(result, self.job_id)

    def _tokens_written(self) -> None:
        """Before a terminal event: every token of the job is out (so it comes last)."""
        if self._writer is not None:
            self._writer.flush(self._outbox)

    def done(
        self,
        finish_reason: Literal["stop", "length", "cancelled"],
        usage: Usage,
        *,
        disclaimer: str | None,
        also: PipelineHook | None = None,
        timing: JobTiming | None = None,
    ) -> None:
        self._tokens_written()
        event = DoneEvent(
            job_id=self.job_id,
            seq=self._next(),
            finish_reason=finish_reason,
            usage=usage,
            disclaimer=disclaimer,
            timing=timing,
        )
        self.emit(event, also=also)

    def error(self, code: ErrorCode, message: str, *, type_: str = "server_error") -> None:
        self._tokens_written()
        info = ErrorInfo(message=message, type=type_, code=code.value)
        self.emit(ErrorEvent(job_id=self.job_id, seq=self._next(), error=info))
