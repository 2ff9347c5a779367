"""How a followed job goes back to its client: one SSE stream, or one JSON body.

Each API exposes one :class:`Framing` (``gateway/api/medgemma/framing.py``,
``gateway/api/openai/framing.py``): how an event becomes frames, what opens and closes its
stream, how the gateway's own end is said, and the body of a non-stream answer. The new turn
of either API (:func:`answer`) and the resume route (:func:`sse_response`) use it, so each
API's format is written once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Protocol

import anyio
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.background import BackgroundTask

from gateway.api.errors import error_response
from gateway.api.sse import Frame, StreamResponse
from gateway.core.errors import status_for
from gateway.core.settings import GatewaySettings
from gateway.services.audit import AuditInfo
from gateway.services.following import JobStream, Waiter, shutdown_info
from gateway.services.ratelimit import Slot
from gateway.services.state import AppState
from gateway.services.supervision import Interrupted, Relayed
from gateway.services.turns import TurnRequest
from shared.errors import ErrorInfo
from shared.protocol import TERMINAL_TYPES, DoneEvent

SHUTDOWN_GRACE_S = 2.0  # below uvicorn's graceful-shutdown timeout (gateway/__main__.py)
SHUTDOWN_POLL_S = 0.5


class Framing(Protocol):
    """One API's answer format."""

    #: Seconds between keep-alive comments; None: ``GATEWAY_PING_S``; 0: none.
    ping_s: float | None

    def first(self) -> Iterable[Frame]:
        """Frames that open the stream, before any event."""
        ...

    def frames(self, event: Relayed) -> Iterable[Frame]: ...

    def last(self) -> Iterable[Frame]:
        """Frames after the terminal event's."""
        ...

    def farewell(self, info: ErrorInfo) -> Iterable[Frame]:
        """An end the job's log does not hold (the gateway shuts down, Redis stayed away):
        no event id, so a client that resumes continues after the last real event."""
        ...

    def body(self, text: str, done: DoneEvent, job_id: str) -> dict[str, Any]:
        """A non-stream answer."""
        ...


async def shutdown_started() -> None:
    """Returns once uvicorn has been told to shut down (sse-starlette's flag, which it sets
    from uvicorn's signal handler)."""
    while not AppStatus.should_exit:  # noqa: ASYNC110 - a flag set by a signal handler
        await asyncio.sleep(SHUTDOWN_POLL_S)


def sse_response(
    stream: JobStream, framing: Framing, *, headers: Mapping[str, str], ping_s: float
) -> EventSourceResponse:
    """The job's events as SSE in ``framing``'s format (``ping_s`` unless the framing sets
    its own)."""
    bye = anyio.Event()  # set by sse-starlette when uvicorn starts shutting down

    async def frames() -> AsyncIterator[Frame]:
        finished = False
        try:
            if stream.observer is not None:
                stream.observer.opened()
            async with stream.watching():
                for frame in framing.first():
                    yield frame
                async for event in stream.events_until(bye):
                    if event is None:
                        for frame in framing.farewell(shutdown_info(stream.job_id)):
                            yield frame
                        return
                    if isinstance(event, Interrupted):  # not logged: no event id
                        finished = True
                        for frame in framing.farewell(event.error):
                            yield frame
                        return
                    finished = event.type in TERMINAL_TYPES
                    for frame in framing.frames(event):
                        yield frame
                for frame in framing.last():
                    yield frame
        finally:
            stream.stop_waiting()
            if not finished:
                stream.client_left()
            if stream.observer is not None:
                stream.observer.closed()
            await stream.close()

    return StreamResponse(
        frames(),
        ping=ping_s if framing.ping_s is None else framing.ping_s,
        headers=dict(headers),
        background=BackgroundTask(stream.close),
        shutdown_event=bye,
        shutdown_grace_period=SHUTDOWN_GRACE_S,
    )


async def open_turn(
    state: AppState, turn: TurnRequest, *, slot: Slot, audit: AuditInfo
) -> JobStream:
    """Submit a new turn and follow it, timed for the metrics."""
    observer = state.metrics.stream(turn.entry.model_name, audit.started, priority=turn.priority)
    return await JobStream.start_turn(state.turns, turn, slot=slot, audit=audit, observer=observer)


async def answer(
    stream: JobStream,
    framing: Framing,
    *,
    as_stream: bool,
    headers: Mapping[str, str],
    settings: GatewaySettings,
    client_gone: Waiter | None,
) -> Response:
    """A new turn's answer. A stream waits up to ``GATEWAY_FIRST_EVENT_WAIT_S`` for its first
    event, so a job that fails at once gets an HTTP error status rather than a 200 stream; a
    non-stream answer is collected (and abandoned if its client leaves first)."""
    if as_stream:
        failed = await stream.early_error(settings.gateway_first_event_wait_s)
        if failed is not None:
            return error_response(status_for(failed.code), failed, headers)
        return sse_response(stream, framing, headers=headers, ping_s=settings.gateway_ping_s)
    text, end = await stream.collect(client_gone, shutdown_started)
    if isinstance(end, ErrorInfo):
        return error_response(status_for(end.code), end, headers)
    return JSONResponse(framing.body(text, end, stream.job_id), headers=dict(headers))
