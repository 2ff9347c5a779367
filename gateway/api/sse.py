"""SSE on the hot path: every relayed token is one frame and one ASGI send.

* :func:`json_frame` writes a frame whose data is one JSON document. sse-starlette's
  ``ServerSentEvent.encode`` builds each frame through a ``StringIO`` and three regular
  expressions, for data of any shape; JSON never holds a raw line break (``json.dumps``
  escapes them), so a frame needs none of that. Only comments (the OpenAI stream's place in
  line) stay ``ServerSentEvent``.
* :class:`StreamResponse` is sse-starlette's response without a cancel scope around each
  send when no send timeout is set: anyio's ``move_on_after(None)`` still enters and leaves a
  scope (and asks sniffio which event loop runs) for every frame, about 7% of the gateway's
  CPU per relayed token.
"""

from __future__ import annotations

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Send

SEP = EventSourceResponse.DEFAULT_SEPARATOR  # the separator sse-starlette writes

#: What a framing yields: a ready frame, or an event sse-starlette encodes.
Frame = bytes | ServerSentEvent


def json_frame(data: str, *, event: str | None = None, id: int | None = None) -> bytes:
    """One frame carrying ``data``, a JSON document (one line; see the module docstring)."""
    head = "" if id is None else f"id: {id}{SEP}"
    if event is not None:
        head += f"event: {event}{SEP}"
    return f"{head}data: {data}{SEP}{SEP}".encode()


class StreamResponse(EventSourceResponse):
    """:class:`EventSourceResponse`, each send awaited directly when there is no timeout."""

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        if self.send_timeout is not None:
            await super()._send_with_timeout(send, message)
            return
        try:
            await send(message)
        except BaseException:
            self._send_interrupted = True  # (as the base class marks an interrupted send)
            raise
