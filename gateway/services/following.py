"""Following one job: its events as they come (for an SSE stream, :mod:`gateway.api.answer`)
or collected into one result.

Both front doors (and the resume route) use :class:`JobStream`. When streaming, the
subscription outlives the route function: it is closed when the stream ends, and also by the
response's background task if the client left before the stream started, so no subscription
is leaked. A client that leaves before the terminal event marks the job abandoned: unless a
client resumes it within the grace window, the job is cancelled and the GPU freed. The audit
record learns the job and how it ended here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from redis.exceptions import RedisError

from gateway.core.errors import ClientLeft
from gateway.services.audit import AuditInfo, prompt_digest
from gateway.services.jobs import JobService
from gateway.services.metrics import StreamTimer
from gateway.services.ratelimit import Slot
from gateway.services.relay import StreamInterrupted, Subscription
from gateway.services.supervision import Interrupted, StreamEvent
from gateway.services.turns import TurnRequest, TurnService
from shared.errors import ErrorCode, ErrorInfo
from shared.protocol import TERMINAL_TYPES, DoneEvent, ErrorEvent, Job, TokenEvent

#: Waits until something happens (the client hangs up, the gateway shuts down).
Waiter = Callable[[], Awaitable[None]]


def shutdown_info(job_id: str) -> ErrorInfo:
    """The error a stream ends with when the gateway shuts down under it."""
    return ErrorInfo(
        message="The gateway is restarting. The answer goes on: resume it with "
        f"GET /jobs/{job_id}/events and the Last-Event-ID you received.",
        type="service_unavailable",
        code=ErrorCode.GATEWAY_SHUTDOWN.value,
    )


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
        audit: AuditInfo | None = None,
        observer: StreamTimer | None = None,
    ) -> None:
        self._jobs = jobs
        self.job_id = job_id
        self.job = job
        self._sub = sub
        self._stack = stack
        self._first_timeout_s = first_timeout_s
        self._after_seq = after_seq
        self._iter: AsyncIterator[StreamEvent] | None = None
        self._first: asyncio.Future[StreamEvent] | None = None
        self._audit = audit
        self._observer = observer  # metrics: sees every event with a monotonic timestamp
        self._ended = False  # a terminal event was seen
        self._left = False  # the job was marked abandoned
        # How long a client that left may take to resume before the job is cancelled (None:
        # GATEWAY_RESUME_GRACE_S; 0: cancelled at once, for clients that never resume).
        self.resume_grace_s: float | None = None

    @classmethod
    async def start_turn(
        cls,
        turns: TurnService,
        request: TurnRequest,
        *,
        slot: Slot,
        audit: AuditInfo,
        observer: StreamTimer | None = None,
    ) -> JobStream:
        """Submit a new turn (see :meth:`TurnService.start`) and follow it. ``slot`` (the
        admission's stream slot) is handed to the stream, released when it ends, and also
        carried by the job, whose terminal step releases it first."""
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(slot.hand_over())
            turn = await stack.enter_async_context(turns.start(request, slot=slot.ref))
        except BaseException:
            await stack.aclose()
            raise
        if observer is not None:
            observer.submitted(time.monotonic())
        audit.job(
            turn.job.job_id,
            model=turn.job.model,
            conversation_id=turn.conversation_id,
            prompt_sha256=prompt_digest([turn.job.messages[-1].text]),
        )
        return cls(
            turns.jobs,
            turn.job.job_id,
            turn.sub,
            stack,
            first_timeout_s=turns.jobs.first_timeout(turn.job),
            job=turn.job,
            audit=audit,
            observer=observer,
        )

    @classmethod
    async def resume(
        cls,
        jobs: JobService,
        job_id: str,
        after_seq: int,
        *,
        hold: contextlib.AbstractAsyncContextManager[None],
        audit: AuditInfo,
        observer: StreamTimer | None = None,
    ) -> JobStream:
        """Follow an existing job from after ``after_seq``: the log first, then live."""
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(hold)
            sub = await stack.enter_async_context(jobs.subscribe(job_id))
        except BaseException:
            await stack.aclose()
            raise
        return cls(
            jobs,
            job_id,
            sub,
            stack,
            first_timeout_s=jobs.resume_timeout_s,
            after_seq=after_seq,
            audit=audit,
            observer=observer,
        )

    async def close(self) -> None:
        """Release what the stream holds. A stream closed before its terminal event (its
        client hung up, even before the first byte of the response) leaves its job
        abandoned: cancelled unless a client resumes it within the grace."""
        if not self._ended:
            self.client_left()
        await self._stack.aclose()

    def client_left(self) -> None:
        """The client left before the terminal event: abandon the job (see the module)."""
        if self._ended or self._left:
            return
        self._left = True
        if self._audit is not None:
            self._audit.ended("client_left")
        self._jobs.abandoned(self.job_id, grace_s=self.resume_grace_s)

    def _events(self) -> AsyncIterator[StreamEvent]:
        if self._iter is None:
            self._iter = self._jobs.follow(
                self._sub,
                self.job_id,
                first_timeout_s=self._first_timeout_s,
                after_seq=self._after_seq,
            )
        return self._iter

    async def early_error(self, wait_s: float) -> ErrorInfo | None:
        """Wait up to ``wait_s`` for the first event; return it if the job already failed.

        Lets a stream that fails at once (a prompt over the context limit, say) answer with a
        proper HTTP error instead of a 200 whose first event is an error. Token events are
        not delayed: the stream starts as soon as the first event arrives."""
        it = self._events()
        self._first = asyncio.ensure_future(anext(it))
        done, _ = await asyncio.wait({self._first}, timeout=wait_s)
        if done and not self._first.cancelled() and self._first.exception() is None:
            event = self._first.result()
            if isinstance(event, ErrorEvent | Interrupted):
                self._note(event)
                await self.close()
                return event.error
        return None

    def _note(self, event: StreamEvent) -> None:
        if event.type in TERMINAL_TYPES or isinstance(event, Interrupted):
            self._ended = True
        if self._observer is not None:
            self._observer.event(event, time.monotonic())
        if self._audit is None:
            return
        if isinstance(event, DoneEvent):
            self._audit.ended(
                "ok" if event.finish_reason != "cancelled" else "cancelled",
                prompt_tokens=event.usage.prompt_tokens,
                completion_tokens=event.usage.completion_tokens,
            )
        elif isinstance(event, ErrorEvent | Interrupted):
            self._audit.ended(f"error:{event.error.code}")

    async def _all(self) -> AsyncIterator[StreamEvent]:
        if self._first is not None:
            event = await self._first
            self._note(event)
            yield event
        async for event in self._events():
            self._note(event)
            yield event

    def watching(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Count this stream as one that follows the job (abandonment detection)."""
        return self._jobs.watching(self.job_id)

    @property
    def observer(self) -> StreamTimer | None:
        return self._observer

    def stop_waiting(self) -> None:
        """Drop the first event awaited by :meth:`early_error` if it has not come."""
        if self._first is not None and not self._first.done():
            self._first.cancel()

    async def events_until(self, bye: anyio.Event) -> AsyncIterator[StreamEvent | None]:
        """The events, or None once ``bye`` is set (the gateway is shutting down).

        Shutdown interrupts the subscription (the relay then raises at its next step), so
        relaying an event costs no task or wait set of its own."""

        async def watch() -> None:
            await bye.wait()
            self._sub.interrupt()

        stop = asyncio.ensure_future(watch())
        try:
            async for event in self._all():
                yield event
        except StreamInterrupted:
            yield None
        finally:
            stop.cancel()

    async def collect(
        self, client_gone: Waiter | None = None, shutdown: Waiter | None = None
    ) -> tuple[str, DoneEvent | ErrorInfo]:
        """Wait for the whole answer: its text and the terminal event.

        With ``client_gone``: if the client closes its connection first, the job is treated
        like a stream whose client left (cancelled unless resumed within the grace) and
        :class:`ClientLeft` is raised (the handler's answer would reach no one).

        If the gateway starts shutting down first (``shutdown`` returns), the job is cancelled
        and the answer is a ``gateway_shutdown`` error (503, retry): uvicorn would otherwise cut
        the request after its graceful timeout with a bare 500."""
        answer = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(client_gone() if client_gone else asyncio.Event().wait())
        bye = asyncio.ensure_future(shutdown() if shutdown else asyncio.Event().wait())
        try:
            await asyncio.wait({answer, gone, bye}, return_when=asyncio.FIRST_COMPLETED)
            if answer.done():
                return answer.result()
            if bye.done():
                answer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await answer
                with contextlib.suppress(RedisError, OSError):  # the answer goes out anyway
                    await self._jobs.cancel(self.job_id)
                info = ErrorInfo(
                    message="The gateway is restarting; this answer was stopped. Send the "
                    "request again.",
                    type="service_unavailable",
                    code=ErrorCode.GATEWAY_SHUTDOWN.value,
                )
                if self._audit is not None:
                    self._audit.ended(f"error:{info.code}")
                return "", info
            self.client_left()
            answer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await answer
            raise ClientLeft(self.job_id)
        finally:
            gone.cancel()
            bye.cancel()
            if not answer.done():
                answer.cancel()

    async def _collect(self) -> tuple[str, DoneEvent | ErrorInfo]:
        parts: list[str] = []
        try:
            async for event in self._events():
                self._note(event)
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                elif isinstance(event, DoneEvent):
                    return "".join(parts), event
                elif isinstance(event, ErrorEvent | Interrupted):
                    return "".join(parts), event.error
        finally:
            await self.close()
        # follow() always ends with a terminal event; this is unreachable.
        raise RuntimeError("the event stream ended without a terminal event")
