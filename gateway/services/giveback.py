"""Giving back what a request held, through a Redis outage.

A request that ends while Redis is unreachable cannot release its stream slot or its
conversation lock at once, and a take whose reply was lost (the command ran, the connection
dropped before the answer) leaves something held that the gateway does not know it has. Both
would otherwise stay held until their TTL (the turn's lifetime: minutes), so one outage of a
second would lock a clinician out of a conversation, or out of a stream slot, for that long.

:class:`GiveBack` retries such releases in the background for ``GIVE_BACK_RETRY_S`` with a
short backoff; each release must be idempotent (removing a member that is not there, a
compare-and-delete of a lock). Past the allowance, or when the gateway stops, the TTL is the
backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import anyio
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

RELEASE_TIMEOUT_S = 2.0  # the first try, shielded from the request's cancellation
GIVE_BACK_RETRY_S = 30.0  # how long a release that failed is retried
GIVE_BACK_DELAYS_S = (0.25, 0.5, 1.0, 2.0)  # between tries; the last one repeats

Release = Callable[[], Awaitable[object]]


class GiveBack:
    def __init__(self, *, retry_s: float = GIVE_BACK_RETRY_S) -> None:
        self._retry_s = retry_s
        self._tasks: set[asyncio.Task[None]] = set()

    async def now_or_later(self, what: str, release: Release) -> None:
        """Release now; if Redis does not answer, in the background (:meth:`later`). The
        first try is shielded: a client that hangs up cancels its request's task, and
        anyio's level-triggered cancellation would cancel an unshielded release too."""
        with anyio.move_on_after(RELEASE_TIMEOUT_S, shield=True):
            try:
                await release()
                return
            except (RedisError, OSError) as exc:
                logger.warning("could not give back a %s: %s", what, type(exc).__name__)
        self.later(what, release)

    def later(self, what: str, release: Release) -> None:
        """Retry ``release`` (idempotent) until it succeeds or the allowance runs out.
        ``what`` names the kind of thing in log lines (never a user's data)."""
        task = asyncio.create_task(self._retry(what, release))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retry(self, what: str, release: Release) -> None:
        deadline = time.monotonic() + self._retry_s
        tries = 0
        while True:
            delay = GIVE_BACK_DELAYS_S[min(tries, len(GIVE_BACK_DELAYS_S) - 1)]
            if time.monotonic() + delay > deadline:
                logger.warning("gave up giving back a %s; it expires by itself", what)
                return
            await asyncio.sleep(delay)
            tries += 1
            with contextlib.suppress(RedisError, OSError):
                await release()
                logger.info("%s given back after %d tries", what, tries)
                return

    async def aclose(self) -> None:
        """Stop the retries (what they hold then expires by itself)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
