"""Per-API-key limits, counted in Redis so they hold across all gateway processes.

Two limits per user id (0 disables either):

* requests per minute, a sliding window: ``{prefix}:rl:{owner}:rpm`` is a sorted set of the
  accepted requests' timestamps. One Lua script prunes what left the window, counts, and adds
  the new request only if there is room, atomically, so concurrent gateways cannot both take
  the last slot. A refused request is not counted (hammering does not prolong the wait), and
  its ``retry_after_s`` is when the oldest request that must leave the window does so.
* concurrent streams: ``{prefix}:rl:{owner}:streams`` is a sorted set of slot tokens scored by
  their expiry (start + ``stream_ttl_s``). A request holds its slot in one scope,
  ``async with limiter.admitted(...) as slot``: the slot is given back when that block ends —
  an early return, a refused body, an exception or a cancellation included — unless the block
  handed it to the stream that now owns it (:meth:`Slot.hand_over`), which gives it back when the
  stream ends. The release is shielded from anyio's level-triggered cancellation, which would
  otherwise cancel it too. A release that fails (Redis restarting) is retried in the background
  (:mod:`gateway.services.giveback`), and so is the give-back of a slot whose take may have
  run although its reply was lost: an outage does not cost the user a slot for
  ``stream_ttl_s``. A gateway that dies mid-stream cannot leak a slot forever: the script
  prunes expired tokens. ``stream_ttl_s`` must therefore bound one stream (queue wait plus
  generation); a longer stream stops counting once it expires. A stream ends when its
  generation does, which no one can predict, so its ``retry_after_s`` is the earliest
  guaranteed expiry capped at ``STREAM_RETRY_HINT_S``.

``owner`` is ``shared.keys.owner_tag(user_id)``: user ids never appear in key names. Every key
gets a TTL that covers its newest member, so an idle user leaves nothing behind. Timestamps
come from the gateway's wall clock (``time.time``; injectable for tests); gateways that share a
Redis are assumed NTP-synchronised, a skew of a few ms only shifts a window edge.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

from redis.asyncio import Redis

from gateway.services.giveback import GiveBack
from shared.keys import owner_tag
from shared.protocol import SlotRef

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
STREAM_RETRY_HINT_S = 5

Limit = Literal["requests_per_minute", "concurrent_streams"]

# One script takes both limits in one round trip, atomically. KEYS: the requests-per-minute
# set, the streams set. ARGV: now, rpm limit, rpm member, streams limit, stream token, a
# stream's lifetime, the rpm window; a limit of 0 skips that set. A member is gone once
# now >= its score + lifetime (score: the request's time; a stream token's expiry). Returns
# {1, ""} when everything asked was taken, else {0 (rpm) or 2 (streams), "<time at which a
# slot frees>"} with nothing taken (a string: Lua numbers would be truncated to integers on
# the way out).
_TAKE = """
local now = tonumber(ARGV[1])
local function take(key, score, limit, member, lifetime)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - lifetime)
  local count = redis.call('ZCARD', key)
  if count >= limit then
    local blocker = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')
    return tostring(tonumber(blocker[2]) + lifetime)
  end
  redis.call('ZADD', key, score, member)
  local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  local ttl_ms = math.ceil((tonumber(newest[2]) + lifetime - now) * 1000)
  redis.call('PEXPIRE', key, math.max(ttl_ms, 1000))
  return nil
end
local rpm = tonumber(ARGV[2])
local streams = tonumber(ARGV[4])
if rpm > 0 then
  local frees = take(KEYS[1], now, rpm, ARGV[3], tonumber(ARGV[7]))
  if frees then return {0, frees} end
end
if streams > 0 then
  local lifetime = tonumber(ARGV[6])
  local frees = take(KEYS[2], now + lifetime, streams, ARGV[5], 0)
  if frees then
    if rpm > 0 then redis.call('ZREM', KEYS[1], ARGV[3]) end
    return {2, frees}
  end
end
return {1, ""}
"""


class RateLimited(Exception):
    def __init__(self, limit: Limit, retry_after_s: int, message: str) -> None:
        super().__init__(message)
        self.limit: Limit = limit
        self.retry_after_s = retry_after_s
        self.message = message


class Slot:
    """What one admission took: nothing, or a stream slot. Released once, by its last owner."""

    def __init__(
        self,
        redis: Redis | None = None,
        key: str = "",
        token: str = "",
        *,
        give_back: GiveBack | None = None,
    ) -> None:
        self._redis, self._key, self._token = redis, key, token
        self._give_back = give_back if give_back is not None else GiveBack()
        self._released = redis is None
        self.handed_over = False

    @property
    def ref(self) -> SlotRef | None:
        """The slot as a job carries it (None when nothing was taken), so the terminal step
        of the job, on either side, can release it."""
        return None if self._redis is None else SlotRef(key=self._key, member=self._token)

    def hand_over(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Pass the slot to a longer-lived owner (the stream): the admission scope no longer
        releases it; the returned context does, when its block ends."""
        self.handed_over = True
        return self._held()

    @contextlib.asynccontextmanager
    async def _held(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await self.release()

    async def release(self) -> None:
        if self._released or self._redis is None:
            return
        self._released = True
        redis, key, token = self._redis, self._key, self._token
        await self._give_back.now_or_later("stream slot", lambda: redis.zrem(key, token))

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class RateLimiter:
    def __init__(
        self,
        redis: Redis,
        prefix: str,
        *,
        requests_per_minute: int,
        concurrent_streams: int,
        stream_ttl_s: int,
        clock: Callable[[], float] = time.time,
        give_back: GiveBack | None = None,
    ) -> None:
        if requests_per_minute < 0 or concurrent_streams < 0 or stream_ttl_s < 1:
            raise ValueError("limits must be >= 0 and stream_ttl_s >= 1")
        self._redis = redis
        self._prefix = prefix
        self._rpm = requests_per_minute
        self._streams = concurrent_streams
        self._stream_ttl_s = stream_ttl_s
        self._clock = clock
        self._take = redis.register_script(_TAKE)
        self._give_back = give_back if give_back is not None else GiveBack()

    def _key(self, user_id: str, kind: str) -> str:
        return f"{self._prefix}:rl:{owner_tag(user_id)}:{kind}"

    async def admit(self, user_id: str, *, stream: bool) -> Slot:
        """Count one request of ``user_id`` and, for a stream, take one of their stream slots,
        in one round trip. RateLimited if either limit is reached (then nothing is taken).
        The caller owns the returned slot: prefer :meth:`admitted`, which cannot leak it."""
        rpm, streams = self._rpm, self._streams if stream else 0
        if not rpm and not streams:
            return Slot()
        now = self._clock()
        token = secrets.token_hex(12)
        slots = self._key(user_id, "streams")
        try:
            status, frees_at = await self._take(
                keys=[self._key(user_id, "rpm"), slots],
                args=[
                    repr(now),
                    rpm,
                    f"{now!r}:{secrets.token_hex(6)}",
                    streams,
                    token,
                    self._stream_ttl_s,
                    repr(WINDOW_S),
                ],
            )
        except BaseException:
            # The script may have run with its reply lost (Redis went away, the client was
            # cancelled): give back the slot it may hold. (Removing a token never taken is
            # a no-op.)
            if streams:
                self._give_back.later("stream slot", lambda: self._redis.zrem(slots, token))
            raise
        if int(status) == 0:
            retry = max(1, math.ceil(float(frees_at) - now))
            raise RateLimited(
                "requests_per_minute",
                retry,
                f"Rate limit: {self._rpm} requests per minute. Retry in {retry} s.",
            )
        if int(status) == 2:
            retry = min(STREAM_RETRY_HINT_S, max(1, math.ceil(float(frees_at) - now)))
            raise RateLimited(
                "concurrent_streams",
                retry,
                f"Rate limit: {self._streams} concurrent streams. Retry in {retry} s, or when "
                "one of your streams ends.",
            )
        if not streams:
            return Slot()
        return Slot(self._redis, slots, token, give_back=self._give_back)

    @contextlib.asynccontextmanager
    async def admitted(self, user_id: str, *, stream: bool) -> AsyncIterator[Slot]:
        """:meth:`admit` as one scope: the slot is given back when the block ends, however it
        ends, unless it was handed over (:meth:`Slot.hand_over`)."""
        slot = await self.admit(user_id, stream=stream)
        try:
            yield slot
        finally:
            if not slot.handed_over:
                await slot.release()
