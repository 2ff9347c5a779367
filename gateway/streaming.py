"""A submitted turn, answered either as an SSE stream or as one collected result.

Both front doors use :class:`OpenTurn`. When streaming, the turn (its subscription) outlives
the route function: it is closed when the stream ends, and also by the response's background
task if the client left before the stream started, so no subscription is leaked.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from gateway.chat import ChatService, Turn
from gateway.relay import Event
from shared.protocol import DoneEvent, ErrorEvent, TokenEvent

Frames = Callable[[Event], Iterable[ServerSentEvent]]


class OpenTurn:
    def __init__(self, chat: ChatService, turn: Turn, stack: contextlib.AsyncExitStack) -> None:
        self._chat = chat
        self.turn = turn
        self._stack = stack

    @classmethod
    async def open(cls, chat: ChatService, **start: Any) -> OpenTurn:
        stack = contextlib.AsyncExitStack()
        turn = await stack.enter_async_context(chat.start(**start))
        return cls(chat, turn, stack)

    @property
    def job_id(self) -> str:
        return self.turn.job.job_id

    async def close(self) -> None:
        await self._stack.aclose()

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
            try:
                for frame in first:
                    yield frame
                async for event in self._chat.jobs.follow(self.turn.sub, self.turn.job):
                    for frame in frames(event):
                        yield frame
                for frame in last:
                    yield frame
            finally:
                await self.close()

        return EventSourceResponse(
            stream(), ping=int(ping_s), headers=headers, background=BackgroundTask(self.close)
        )

    async def collect(self) -> tuple[str, DoneEvent | ErrorEvent]:
        """Wait for the whole answer: its text and the terminal event."""
        parts: list[str] = []
        try:
            async for event in self._chat.jobs.follow(self.turn.sub, self.turn.job):
                if isinstance(event, TokenEvent):
                    parts.append(event.text)
                else:
                    return "".join(parts), event
        finally:
            await self.close()
        raise RuntimeError(
            "the event stream ended without a terminal event"
        )  # follow() ends on one
