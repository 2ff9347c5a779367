"""Supervision of one job while a client follows it: a small state machine, and fenced ends.

A job the gateway follows is in one :class:`Phase`::

    QUEUED ──claim──▶ RUNNING ──terminal event──▶ FINISHED
      │                │   ▲
      │                │   └──────claim──────┐
      │    claim lapsed, no terminal event   │
      │                ▼                     │
      │           HANDED_OVER ───────────────┘
      │                │
      └─ deadline ─────┴──────▶ ended by the gateway (FINISHED, with an error event)

* **QUEUED**: in line, no worker holds its claim. Bounded by the start deadline (plus a grace
  for the worker to report); a ``queued`` event goes out whenever its place in line changes.
  Background work still waiting at its ``yields_until`` is sent again on its model's promoted
  line (:meth:`JobService.promote`), which workers read first into their background slots, so
  a steady interactive load cannot starve it.
* **RUNNING**: a worker holds the claim. Bounded by the idle timeout between events (and,
  before the first token, by the start deadline or the idle timeout from the claim, whichever
  is later: prefill may be long).
* **HANDED_OVER**: the claim lapsed without a terminal event (the worker died). The job was
  re-enqueued once for this handover (a guard key makes that hold across gateway processes)
  and waits in line like a queued job until a worker claims it and continues from the text
  already sent.
* **FINISHED**: a terminal event was relayed, the worker's or the gateway's own.

Events drive the machine (any event: RUNNING; a terminal one: FINISHED); after
``LEASE_CHECK_S`` of silence it looks at the claim once.

**The gateway's own end is fenced** like a worker's write. One script (:data:`_END`) writes
the error event to the job's log and channel with the *next real sequence number* only if the
claim is still what the gateway saw (absent, or held by the worker it gave up on); in the same
step it takes the claim (``done:gateway``: no worker writes to the job or starts it after
that), sets the cancel flag, and releases the conversation lock, the stream slot, the payload
and the images. If the claim moved meanwhile (a worker picked the job up just then, or
finished it), nothing is written and supervision goes on.

**Redis outages are bridged**: when the relay or a look at the claim fails, supervision keeps
retrying (the relay reconnects and re-subscribes; every retry reads the job's log from the
last event relayed, so nothing published meanwhile is lost) for up to the outage allowance.
Past it the stream ends with ``redis_unavailable``: an end that could not be logged, so it
carries no sequence number (:class:`Interrupted`) and a client that resumes later continues
after the last real event.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.services.queue_book import QueueBook
from gateway.services.relay import Event, Relay, RelayUnavailable, Subscription
from shared.errors import ErrorCode, ErrorInfo
from shared.keys import DONE_PREFIX, MAX_HANDOVERS, Keys
from shared.protocol import TERMINAL_TYPES, DoneEvent, ErrorEvent, Job, JobMeta, QueuedEvent, Usage


class SupervisedJobs(Protocol):
    """What supervision needs of the job service (:class:`gateway.services.jobs.JobService`),
    so that it depends on this and not on the service that runs it."""

    @property
    def redis(self) -> Redis: ...
    @property
    def keys(self) -> Keys: ...
    @property
    def relay(self) -> Relay: ...
    @property
    def book(self) -> QueueBook: ...
    async def meta(self, job_id: str) -> JobMeta | None: ...
    async def live_workers(self, model: str, *, besides: str | None = None) -> int: ...
    async def promote(self, job_id: str) -> bool: ...
    async def resend(self, job: Job) -> None: ...


logger = logging.getLogger(__name__)

REPORT_GRACE_S = 5.0
LEASE_CHECK_S = 1.0  # how often a silent job's claim is looked at
OUTAGE_RETRY_S = 0.5  # pause between two tries during a Redis outage
GATEWAY_CLAIM = f"{DONE_PREFIX}gateway"  # the claim of a job the gateway ended


class Phase(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    HANDED_OVER = "handed_over"
    FINISHED = "finished"


@dataclass(frozen=True)
class Interrupted:
    """The stream's end when Redis stayed unreachable: not in the job's log (it could not be
    written), so it carries no sequence number; a client resumes after the last real event."""

    job_id: str
    error: ErrorInfo
    type: Literal["interrupted"] = "interrupted"


Relayed = Event | QueuedEvent  # what a client's stream carries as frames
StreamEvent = Relayed | Interrupted  # ... and how it may end without a frame of the log


# KEYS: claim, log, channel, cancel flag, payload, conversation lock, slot set, images...
# ARGV: the claim the gateway saw ('' = none), the event's JSON without its opening brace and
# its seq, the TTL, the job id, the slot member ('' = none), the cancel channel.
# Returns {1, seq} once written, {0, claim} if the claim is not what the gateway saw.
_END = (
    """
local claim = redis.call('GET', KEYS[1]) or ''
if claim ~= ARGV[1] then return {0, claim} end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local seq = 1
if #last > 0 then seq = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end
local payload = '{"seq":' .. seq .. ',' .. ARGV[2]
redis.call('XADD', KEYS[2], seq .. '-0', 'e', payload)
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], payload)
redis.call('SET', KEYS[1], '"""
    + GATEWAY_CLAIM
    + """', 'EX', ARGV[3])
redis.call('SET', KEYS[4], '1', 'EX', ARGV[3])
redis.call('PUBLISH', ARGV[6], ARGV[4])
redis.call('DEL', KEYS[5])
if redis.call('GET', KEYS[6]) == ARGV[4] then redis.call('DEL', KEYS[6]) end
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[7], ARGV[5]) end
for i = 8, #KEYS do redis.call('DEL', KEYS[i]) end
return {1, seq}
"""
)


@dataclass
class _Watch:
    """What supervision knows about one job."""

    job_id: str
    phase: Phase
    last: int  # the last sequence number relayed
    deadline: float  # monotonic: when a job that no worker runs (or has begun) is given up
    last_event_at: float
    owner: str = ""  # the worker last seen holding the claim
    progressing: bool = False  # tokens flow: silence is bounded by the idle timeout
    place: tuple[int, float] | None = None
    outage_since: float | None = None
    promoted: bool = False  # background work sent again, promoted (or found running)
    sent_at: float = 0.0  # wall time the gateway last handed the job over (0: never)


class Supervisor:
    def __init__(
        self, jobs: SupervisedJobs, *, idle_timeout_s: float, job_ttl_s: int, outage_s: float
    ) -> None:
        self._jobs = jobs
        self._redis = jobs.redis
        self._keys = jobs.keys
        self._idle_timeout_s = idle_timeout_s
        self._job_ttl_s = job_ttl_s
        self._outage_s = outage_s
        self._end_script = jobs.redis.register_script(_END)

    async def follow(
        self, sub: Subscription, job_id: str, *, first_timeout_s: float, after_seq: int = 0
    ) -> AsyncIterator[StreamEvent]:
        """The job's events after ``after_seq``, supervising the job while waiting for them.
        Always ends with a terminal event (or :class:`Interrupted`)."""
        now = time.monotonic()
        resumed = after_seq > 0
        w = _Watch(
            job_id=job_id,
            phase=Phase.RUNNING if resumed else Phase.QUEUED,
            last=after_seq,
            deadline=now + (self._idle_timeout_s if resumed else first_timeout_s),
            last_event_at=now,
            progressing=resumed,
        )
        relay = self._jobs.relay
        while True:
            try:
                async for event in relay.events(
                    sub,
                    after_seq=w.last,
                    first_timeout_s=LEASE_CHECK_S,
                    idle_timeout_s=LEASE_CHECK_S,
                ):
                    self._saw(w, event)
                    yield event
                return  # events() ends after a terminal event
            except TimeoutError:
                pass
            except RelayUnavailable:  # the relay was stopped: this gateway is going away
                yield _interrupted(job_id)
                return
            except (RedisError, OSError) as exc:
                if await self._ride_out(w, exc):
                    yield _interrupted(job_id)
                    return
                continue
            try:
                claim = await self._redis.get(self._keys.job_claim(job_id))
                update = await self._on_silence(w, None if claim is None else str(claim))
            except (RedisError, OSError) as exc:
                if await self._ride_out(w, exc):
                    yield _interrupted(job_id)
                    return
                continue
            w.outage_since = None
            if update is not None:
                yield update
                if isinstance(update, ErrorEvent):
                    return

    def _saw(self, w: _Watch, event: Event) -> None:
        w.last, w.last_event_at, w.outage_since = event.seq, time.monotonic(), None
        w.progressing = True
        w.phase = Phase.FINISHED if event.type in TERMINAL_TYPES else Phase.RUNNING

    async def _ride_out(self, w: _Watch, exc: BaseException) -> bool:
        """Note a failed read and wait a moment before the next; True (at once) once the
        outage has lasted longer than allowed."""
        now = time.monotonic()
        if w.outage_since is None:
            w.outage_since = now
            logger.warning("job %s: Redis unreachable (%s); retrying", w.job_id, type(exc).__name__)
        if now - w.outage_since < self._outage_s:
            await asyncio.sleep(OUTAGE_RETRY_S)
            return False
        logger.warning("job %s: stream ended after %.0fs without Redis", w.job_id, self._outage_s)
        return True

    async def _on_silence(self, w: _Watch, claim: str | None) -> QueuedEvent | ErrorEvent | None:
        """One step of the machine after a silence; returns an event to send, if any."""
        now = time.monotonic()
        if claim is not None:  # (a ``done:`` claim: its terminal event is read next; if a
            # worker marked it done without one, the idle timeout below still ends it)
            if w.phase is not Phase.RUNNING:
                w.phase = Phase.RUNNING
                w.deadline = max(w.deadline, now + self._idle_timeout_s)  # prefill may be long
            w.owner = claim
            if (w.progressing and now - w.last_event_at > self._idle_timeout_s) or (
                not w.progressing and now > w.deadline
            ):
                return await self._end(
                    w,
                    claim,
                    ErrorCode.WORKER_TIMEOUT,
                    "The worker stopped responding in the middle of this answer.",
                )
            return None
        if w.phase is Phase.RUNNING:  # the claim lapsed without a terminal event
            return await self._lapsed(w, now)
        if now > w.deadline:
            return await self._end(
                w,
                "",
                ErrorCode.WORKER_TIMEOUT,
                "No worker started this request in time. Try again later.",
            )
        return await self._waiting(w, now)

    async def _lapsed(self, w: _Watch, now: float) -> ErrorEvent | None:
        """The job's claim lapsed without a terminal event: hand it over, or end it."""
        sent_at = time.time()
        outcome = await self._hand_over(w.job_id, w.owner)
        w.sent_at = sent_at
        if isinstance(outcome, str):
            return await self._end(w, "", ErrorCode.WORKER_LOST, outcome)
        w.phase, w.progressing, w.place = Phase.HANDED_OVER, False, None
        w.deadline = now + outcome
        return None

    async def _waiting(self, w: _Watch, now: float) -> QueuedEvent | ErrorEvent | None:
        """A job with no claim: its place in line when it changed. Out of line, a worker may
        have taken it and lost it between two looks (a lease lost under overload, say): its
        start record (``record_start``) since it was last sent says so, a lapsed claim."""
        taken = None
        try:
            meta = await self._jobs.meta(w.job_id)
            if meta and meta.yields_until is not None and not w.promoted:
                if time.time() >= meta.yields_until:  # waited its share: no starvation
                    await self._jobs.promote(w.job_id)
                    w.promoted = True
            where = await self._jobs.book.position(meta.model, w.job_id) if meta else None
            if meta is not None and where is None:
                starts = self._keys.queue_starts(meta.model)
                taken = await self._redis.zscore(starts, w.job_id)
        except (RedisError, OSError):
            return None  # only the place in line is unknown; the wait goes on
        if taken is not None and float(taken) >= w.sent_at:
            return await self._lapsed(w, now)
        if where is None or where == w.place:
            return None
        w.place = where
        return QueuedEvent(job_id=w.job_id, position=where[0], eta_s=where[1])

    async def _end(self, w: _Watch, seen: str, code: ErrorCode, message: str) -> ErrorEvent | None:
        """End the job with an error event through the fenced script (see the module's
        docstring). None if the claim is no longer ``seen``: the job lives on."""
        info = ErrorInfo(message=message, type="server_error", code=code.value)
        body = ErrorEvent(job_id=w.job_id, seq=1, error=info).model_dump_json(exclude={"seq"})
        seq = await self._write_end(w.job_id, seen, body)
        if seq is None:
            logger.info("job %s: not ended, its claim moved on", w.job_id)
            return None
        logger.warning("job %s ended by the gateway: %s", w.job_id, code.value)
        w.phase = Phase.FINISHED
        w.last = seq
        return ErrorEvent(job_id=w.job_id, seq=seq, error=info)

    async def cancel_unclaimed(self, job_id: str) -> bool:
        """End a job that no worker has claimed with a ``cancelled`` done event, through the
        fenced script: its lock, slot and images are free now, not when a worker gets to it
        (or, if none ever does, when their TTLs run out). False if a worker holds it."""
        none = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        done = DoneEvent(job_id=job_id, seq=1, finish_reason="cancelled", usage=none)
        seq = await self._write_end(job_id, "", done.model_dump_json(exclude={"seq"}))
        if seq is not None:
            logger.info("job %s: cancelled before any worker took it", job_id)
        return seq is not None

    async def see_cancelled_through(self, job_id: str) -> None:
        """Make sure a cancelled job that a worker holds ends, when no client follows it.

        Its worker normally stops it within a token and writes the ``cancelled`` end. If the
        worker is lost meanwhile (killed, stopped, cut off: its claim lapses without a
        terminal event), or keeps the job past the idle timeout, the fenced script ends it
        here, so its lock, slot and images are free now and not when their TTLs run out."""
        claim_key = self._keys.job_claim(job_id)
        give_up_at = time.monotonic() + self._idle_timeout_s
        stop_at = give_up_at + self._outage_s
        none = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        done = DoneEvent(job_id=job_id, seq=1, finish_reason="cancelled", usage=none)
        body = done.model_dump_json(exclude={"seq"})
        while time.monotonic() < stop_at:
            await asyncio.sleep(LEASE_CHECK_S)
            try:
                raw = await self._redis.get(claim_key)
                claim = "" if raw is None else str(raw)
                if claim.startswith(DONE_PREFIX):
                    return  # ended: by its worker, or by a gateway
                if claim and time.monotonic() < give_up_at:
                    continue  # its worker holds it and will stop it
                if await self._write_end(job_id, claim, body) is not None:
                    logger.warning("job %s: cancelled, and ended by the gateway", job_id)
                    return
            except (RedisError, OSError) as exc:
                logger.warning(
                    "job %s: cannot see the cancel through yet: %s", job_id, type(exc).__name__
                )
        logger.warning("job %s: cancelled, its end not seen", job_id)

    async def _write_end(self, job_id: str, seen: str, body: str) -> int | None:
        """Run the fenced end script; the event's seq, or None if the claim is not ``seen``."""
        raw = await self._redis.get(self._keys.job_payload(job_id))
        job = Job.model_validate_json(raw) if raw is not None else None
        lock = self._keys.job_claim(job_id)  # a stand-in key when there is nothing to free
        slot_key, member = lock, ""
        if job is not None and job.conversation is not None:
            ref = job.conversation
            lock = self._keys.conversation_lock(ref.user_id, ref.conversation_id)
        if job is not None and job.slot is not None:
            slot_key, member = job.slot.key, job.slot.member
        images = [p.key for m in job.messages for p in m.images] if job is not None else []
        keys = self._keys
        written, value = await self._end_script(
            keys=[
                keys.job_claim(job_id),
                keys.job_log(job_id),
                keys.job_channel(job_id),
                keys.job_cancel(job_id),
                keys.job_payload(job_id),
                lock,
                slot_key,
                *images,
            ],
            args=[seen, body[1:], self._job_ttl_s, job_id, member, keys.cancel_channel],
        )
        return int(value) if int(written) else None

    async def _hand_over(self, job_id: str, lost: str) -> str | float:
        """Re-enqueue a job whose worker was lost. Returns why it cannot go on, or how long
        it may wait in line for a worker (its queue timeout, from now)."""
        raw = await self._redis.get(self._keys.job_payload(job_id))
        if raw is None:
            return "The worker running this answer was lost and the job has expired."
        job = Job.model_validate_json(raw)
        n = job.handover + 1
        if n > MAX_HANDOVERS:
            return "The answer failed on several workers in a row; try again later."
        if await self._jobs.live_workers(job.model, besides=lost or None) == 0:
            return "The worker running this answer was lost and no other worker serves this model."
        guard = self._keys.job_handover(job_id, n)
        wait = job.start_deadline - job.enqueued_at
        if not await self._redis.set(guard, "1", nx=True, ex=self._job_ttl_s):
            return wait  # another gateway process already handed it over
        moved = job.model_copy(update={"handover": n, "start_deadline": time.time() + wait})
        await self._jobs.resend(moved)
        logger.warning("job %s: worker lost; handed over (attempt %d)", job_id, n)
        return wait


def _interrupted(job_id: str) -> Interrupted:
    info = ErrorInfo(
        message="The connection to the job queue was lost. Resume the answer later with "
        f"GET /jobs/{job_id}/events and the Last-Event-ID you received.",
        type="server_error",
        code=ErrorCode.REDIS_UNAVAILABLE.value,
    )
    return Interrupted(job_id=job_id, error=info)
