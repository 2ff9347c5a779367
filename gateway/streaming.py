"""A job's events, answered either as an SSE stream or as one collected result.

Both front doors (and the resume route) use :class:`JobStream`. When streaming, the
subscription outlives the route function: it is closed when the stream ends, and also by the
response's background task if the client left before the stream started, so no subscription
is leaked. A client that leaves before the terminal event marks the job abandoned: unless a
client resumes it within the grace window, the job is cancelled and the GPU freed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from gateway.chat import ChatService
from gateway.jobs import JobService
from gateway.relay import Event, Subscription
from shared.protocol import TERMINAL_TYPES, DoneEvent, ErrorEvent, Job, TokenEvent

Frames = Callable[[Event], Iterable[ServerSentEvent]]


class JobStream:
    def __init__(
        self,
        jobs: JobService,
        job_id: str,
        sub: Subscription,
        stack: contextlib.AsyncExitStack,
        *,
        first_timeout_s: float,
        after_seq: int = 0,
        job: Job | None = None,
    ) -> None:
        self._jobs = jobs
        self.job_id = job_id
        self.job = job
        self._sub = sub
        self._stack = stack
        self._first_timeout_s = first_timeout_s
        self._after_seq = after_seq

    @classmethod
    async def start_turn(cls, chat: ChatService, **start: Any) -> JobStream:
        """Submit a new turn (see :meth:`ChatService.start`) and follow it."""
        stack = contextlib.AsyncExitStack()
        turn = await stack.enter_async_context(chat.start(**start))
        return cls(
            chat.jobs,
            turn.job.job_id,
            turn.sub,
            stack,
            first_timeout_s=chat.jobs.first_timeout(turn.job),
            job=turn.job,
        )

    @classmethod
    async def resume(cls, jobs: JobService, job_id: str, after_seq: int) -> JobStream:
        """Follow an existing job from after ``after_seq``: the log first, then live."""
        stack = contextlib.AsyncExitStack()
        sub = await stack.enter_async_context(jobs.subscribe(job_id))
        return cls(
            jobs, job_id, sub, stack, first_timeout_s=jobs.resume_timeout_s, after_seq=after_seq
        )

    async def close(self) -> None:
        await self._stack.aclose()

    def _events(self) -> AsyncIterator[Event]:
        return self._jobs.follow(
            self._sub, self.job_id, first_timeout_s=self._first_timeout_s, after_seq=self._after_seq
        )

    def sse(
        self,
        frames: Frames,
        *,
        headers: dict[str, str],
        ping_s: float,
        first: Iterable[ServerSentEvent] = (),
        last: Iterable[ServerSentEvent] = (),
    ) -> EventSourceResponse:
        async def stream() -> AsyncIterator[ServerSentEvent]:
            finished = False
            try:
                async with self._jobs.watching(self.job_id):
                    for frame in first:
                        yield frame
                    async for event in self._events():
                        finished = event.type in TERMINAL_TYPES
                        for frame in frames(event):
                            yield frame
                    for frame in last:
                        yield frame
            finally:
                if not finished:
                    self._jobs.abandoned(self.job_id)
                await self.close()

        return EventSourceResponse(
            stream(), ping=int(ping_s), headers=headers, background=BackgroundTask(self.close)
        )

    async def collect(self) -> tuple[str, DoneEvent | ErrorEvent]:
        """Wait for the whole answer: its text and the terminal event."""
        parts: list[str] = []
        try:
            async for event in self._events():
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                else:
                    return "".join(parts), event
        finally:
            await self.close()
        # follow() always ends with a terminal event; this is unreachable.
        raise RuntimeError("the event stream ended without a terminal event")
