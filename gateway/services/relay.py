"""The multiplexed relay: one pub/sub connection carries every job stream of this process.

A reader task owns the connection and routes each message to the subscription of its channel
(a bounded queue per request); subscribing and unsubscribing are commands on the same
connection. A request subscribes and waits for Redis's confirmation *before* it enqueues its
job, and then reads the job's replay log, so no event can be missed (pub/sub alone delivers
at most once).

**Coalescing when behind**: when a stream's reader comes back for its next event and finds
several token events already waiting (its client, or this process, fell behind the worker),
it joins them into one token event carrying their text and the last one's sequence number (at
most ``coalesce`` events; 0: never), so a loaded gateway sends fewer, bigger frames while a
stream that keeps up still gets one frame per event. A client that resumes with that
``Last-Event-ID`` continues exactly after the joined text.

Events are de-duplicated and gap-checked by sequence number: if a subscriber's queue
overflows (a slow client) or the connection drops, the subscription falls back to the replay
log (``XRANGE log {seq+1}-0 +``), so memory stays bounded and nothing is lost. If Redis goes
away, the reader keeps reconnecting (redis-py re-subscribes every channel on reconnect) and
marks every subscription as having missed messages; their readers fail while Redis is down
(:mod:`gateway.services.supervision` bridges that, up to its outage allowance) and read the log from
their last event once it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from shared.keys import Keys
from shared.protocol import TERMINAL_TYPES, DoneEvent, ErrorEvent, TokenEvent, decode_event

logger = logging.getLogger(__name__)

Event = TokenEvent | DoneEvent | ErrorEvent
QUEUE_BOUND = 1024
PING_CHECK_S = 1.0  # how often the subscription connection's health check is looked at


class RelayUnavailable(ConnectionError):
    """The relay has stopped (the gateway is going away); the stream cannot go on."""


class StreamInterrupted(Exception):
    """The stream's reader was asked to stop (the gateway is shutting down)."""


_WAKE = ""  # never an event's payload: wakes a waiting reader to look at its flags


@dataclass(eq=False)
class Subscription:
    job_id: str
    channel: str
    queue: asyncio.Queue[str | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_BOUND))
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)
    overflowed: bool = False
    broken: bool = False
    interrupted: bool = False
    # The reader's timeout: one timer per stream, not one per event. While events flow it
    # fires once per timeout and moves itself to the current wait's deadline.
    timed_out: bool = False  # the reader waited longer than its timeout
    waiting_since: float | None = None  # loop time the reader began its current wait
    timeout: float = 0.0
    timer: asyncio.TimerHandle | None = None

    def deliver(self, data: str) -> None:
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.overflowed = True  # the reader backfills from the log

    def missed(self) -> None:
        """Messages may have been lost (the connection dropped): read the log next."""
        self.overflowed = True
        with contextlib.suppress(asyncio.QueueFull):  # a full queue is read from at once
            self.queue.put_nowait(_WAKE)

    def break_(self) -> None:
        self.broken = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)

    def wait_from(self, now: float, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        """The reader starts waiting for its next event, for at most ``timeout`` seconds."""
        self.timed_out = False
        self.waiting_since, self.timeout = now, timeout
        if self.timer is not None and self.timer.when() > now + timeout:
            self.stop_timer()  # (set for a longer timeout than this wait's)
        if self.timer is None:
            self.timer = loop.call_at(now + timeout, self._timer_fired, loop)

    def _timer_fired(self, loop: asyncio.AbstractEventLoop) -> None:
        self.timer = None
        if self.waiting_since is None:  # not waiting: the next wait sets a timer again
            return
        deadline = self.waiting_since + self.timeout
        if loop.time() >= deadline:
            self.time_out()
        else:  # events came since it was set: move it to this wait's deadline
            self.timer = loop.call_at(deadline, self._timer_fired, loop)

    def stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def time_out(self) -> None:
        """The reader waited longer than its timeout: wake it to give up."""
        self.waiting_since = None
        self.timed_out = True
        with contextlib.suppress(asyncio.QueueFull):  # a full queue is read from at once
            self.queue.put_nowait(_WAKE)

    def interrupt(self) -> None:
        """Make :meth:`Relay.events` raise :class:`StreamInterrupted` at its next step."""
        self.interrupted = True
        with contextlib.suppress(asyncio.QueueFull):  # a full queue is read from at once
            self.queue.put_nowait(_WAKE)


def coalesce(events: list[Event], limit: int) -> list[Event]:
    """``events`` (in order, no gaps) with each run of consecutive token events joined into
    one carrying their text and the last sequence number, ``limit`` events at most per join
    (0 or 1: unchanged)."""
    if limit <= 1 or len(events) < 2:
        return events
    out: list[Event] = []
    run: list[TokenEvent] = []

    def close_run() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            text = "".join(e.text for e in run)
            out.append(run[-1].model_copy(update={"text": text}))
        run.clear()

    for event in events:
        if isinstance(event, TokenEvent):
            if len(run) == limit:
                close_run()
            run.append(event)
        else:
            close_run()
            out.append(event)
    close_run()
    return out


class Relay:
    def __init__(
        self, redis: Redis, keys: Keys, *, coalesce: int = 0, listen: Redis | None = None
    ) -> None:
        """``listen``: the client whose connection carries the subscriptions (default
        ``redis``); logs are read through ``redis``."""
        self._redis = redis
        self._keys = keys
        self._coalesce = coalesce  # most waiting token events joined into one (0: never)
        self._pubsub: PubSub = (listen or redis).pubsub()
        self._subs: dict[str, set[Subscription]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._home = f"{keys.prefix}:relay:home"  # keeps the connection subscribed

    @property
    def active(self) -> int:
        return sum(len(s) for s in self._subs.values())

    async def start(self) -> None:
        await self._pubsub.subscribe(self._home)
        self._tasks = [
            asyncio.create_task(self._read(), name="relay-reader"),
            asyncio.create_task(self._keep_checked(), name="relay-health-check"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for subs in self._subs.values():
            for sub in subs:
                sub.break_()
        with contextlib.suppress(RedisError):
            await self._pubsub.aclose()

    async def _read(self) -> None:
        recovering = False
        while True:
            try:
                if recovering:  # redis-py reconnects and subscribes every channel again
                    msg = await self._pubsub.get_message(timeout=1.0)
                    recovering = False
                    if msg is not None:
                        self._route_confirmation(msg)
                    continue
                reply = await self._next_reply()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                logger.warning("relay lost Redis (%s); reconnecting", type(exc).__name__)
                for subs in list(self._subs.values()):
                    for sub in subs:
                        sub.missed()
                recovering = True
                await asyncio.sleep(0.5)
                continue
            if reply is None:
                continue
            if reply[0] == "message":  # (the hot path: no dict per message; replies are str)
                targets = self._subs.get(reply[1])
                if targets:
                    for sub in targets:
                        sub.deliver(reply[2])
                continue
            # (Un)subscribe confirmations go through redis-py, which keeps its own books.
            msg = await self._pubsub.handle_message(reply)  # type: ignore[no-untyped-call]
            if msg is not None:
                self._route_confirmation(msg)

    async def _next_reply(self) -> list[Any] | None:
        """The next message on the pub/sub connection, read from the connection itself:
        ``PubSub.get_message`` wraps each read in a retry loop, a timeout and a health check
        (a fifth of this process's CPU per relayed token); a failed read is handed to it
        (``recovering`` above) to reconnect."""
        conn = self._pubsub.connection
        if conn is None or not conn.is_connected:
            raise ConnectionError("the relay's pub/sub connection is closed")
        reply = await conn.read_response(timeout=math.inf, push_request=True)
        return reply if isinstance(reply, list) and len(reply) >= 3 else None

    def _route_confirmation(self, msg: dict[str, object]) -> None:
        targets = self._subs.get(cast(str, msg["channel"]))
        if not targets:
            return
        if msg["type"] == "subscribe":
            for sub in targets:
                sub.confirmed.set()
        elif msg["type"] == "message":
            for sub in targets:
                sub.deliver(cast(str, msg["data"]))

    async def _keep_checked(self) -> None:
        """Ping the subscription connection once per health-check interval: the reader
        blocks on it, so redis-py's own check (made before a read) would never run."""
        loop = asyncio.get_running_loop()
        pinged = loop.time()
        while True:
            await asyncio.sleep(PING_CHECK_S)
            conn = self._pubsub.connection
            if conn is None or not conn.is_connected or not conn.health_check_interval:
                continue
            now = loop.time()
            if now > max(conn.next_health_check, pinged + conn.health_check_interval):
                pinged = now  # its reply is read as a message (and ignored)
                with contextlib.suppress(RedisError, OSError):  # the reader sees it too
                    await self._pubsub.check_health()

    @contextlib.asynccontextmanager
    async def subscribe(
        self, job_id: str, *, timeout_s: float = 5.0
    ) -> AsyncIterator[Subscription]:
        """Subscribe to a job's channel; yields once Redis has confirmed the subscription."""
        channel = self._keys.job_channel(job_id)
        sub = Subscription(job_id=job_id, channel=channel)
        first = channel not in self._subs
        self._subs.setdefault(channel, set()).add(sub)
        try:
            if first:
                await self._pubsub.subscribe(channel)
                await asyncio.wait_for(sub.confirmed.wait(), timeout_s)
            else:
                sub.confirmed.set()
            yield sub
        finally:
            sub.stop_timer()
            remaining = self._subs.get(channel)
            if remaining is not None:
                remaining.discard(sub)
                if not remaining:
                    del self._subs[channel]
                    with contextlib.suppress(RedisError, OSError):
                        await self._pubsub.unsubscribe(channel)

    async def backfill(self, job_id: str, after_seq: int) -> list[Event]:
        rows = cast(
            list[tuple[str, dict[str, str]]],
            await self._redis.xrange(self._keys.job_log(job_id), min=f"{after_seq + 1}-0"),
        )
        return [decode_event(fields["e"]) for _id, fields in rows]

    async def events(
        self,
        sub: Subscription,
        *,
        after_seq: int = 0,
        first_timeout_s: float,
        idle_timeout_s: float,
    ) -> AsyncIterator[Event]:
        """The job's events after ``after_seq``, in order, without gaps or duplicates.

        Ends after a terminal event. Raises :class:`TimeoutError` when no event comes in time,
        :class:`RelayUnavailable` when Redis is lost and :class:`StreamInterrupted` once
        ``sub`` is interrupted.
        """
        loop = asyncio.get_running_loop()
        last = after_seq
        pending = await self.backfill(sub.job_id, last)
        timeout = first_timeout_s if last == 0 else idle_timeout_s
        while True:
            for event in coalesce(pending, self._coalesce):  # (all after ``last``)
                last = event.seq
                yield event
                if event.type in TERMINAL_TYPES:
                    return
                timeout = idle_timeout_s
            pending = []
            if sub.interrupted:
                raise StreamInterrupted
            if sub.broken:
                raise RelayUnavailable("the relay has stopped")
            if sub.overflowed:  # messages were dropped (a full queue, a lost connection)
                sub.overflowed = False
                pending = await self.backfill(sub.job_id, last)
                if pending:
                    continue
            if sub.queue.empty():
                # (asyncio.timeout per wait cost ~7% of the CPU per relayed token; one timer
                # task for every stream fired a whole tick's timeouts at once, and their log
                # reads emptied the Redis pool.)
                sub.wait_from(loop.time(), timeout, loop)
                data = await sub.queue.get()
                sub.waiting_since = None
            else:
                data = sub.queue.get_nowait()
            if data is None:
                raise RelayUnavailable("the relay has stopped")
            if data == _WAKE:
                if sub.timed_out and sub.queue.empty():
                    sub.timed_out = False
                    # One last look at the log before giving up (a dropped subscription).
                    pending = await self.backfill(sub.job_id, last)
                    if pending:
                        continue
                    raise TimeoutError
                continue
            waiting = [decode_event(data)]
            if self._coalesce > 1:  # behind? take what else is already there
                waiting += _drain(sub.queue, self._coalesce - 1)
            # Pub/sub keeps a publisher's order: drop what was relayed already (the log read
            # before it), then the rest follows ``last`` without a gap, or the log has it.
            waiting = [e for e in waiting if e.seq > last]
            if waiting and waiting[-1].seq - last != len(waiting):
                pending = await self.backfill(sub.job_id, last)
            else:
                pending = waiting


def _drain(queue: asyncio.Queue[str | None], most: int) -> list[Event]:
    """Up to ``most`` events already waiting in ``queue``, without waiting. Sentinels are
    skipped: the flags they wake the reader for are set before they are queued and are
    looked at after these events."""
    out: list[Event] = []
    while len(out) < most and not queue.empty():
        data = queue.get_nowait()
        if data:  # not None (broken) nor _WAKE
            out.append(decode_event(data))
    return out
