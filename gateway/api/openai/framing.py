"""OpenAI's answer format: ``chat.completion.chunk`` frames and ``data: [DONE]``, or one
``chat.completion`` body."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from sse_starlette import ServerSentEvent

from gateway.api.openai.protocol import ChatCompletion, Choice, CompletionUsage, ResponseMessage
from gateway.api.sse import Frame, json_frame
from gateway.services.supervision import Relayed
from shared.errors import ErrorBody, ErrorInfo
from shared.protocol import DoneEvent, QueuedEvent, TokenEvent


def _usage(done: DoneEvent) -> dict[str, int]:
    u = done.usage
    return CompletionUsage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        total_tokens=u.total_tokens,
    ).model_dump()


def _finish_reason(done: DoneEvent) -> str:
    return "length" if done.finish_reason == "length" else "stop"


DONE_FRAME = json_frame("[DONE]")


def openai_farewell(info: ErrorInfo) -> list[Frame]:
    return [json_frame(json.dumps(ErrorBody(error=info).model_dump())), DONE_FRAME]


class ChunkFraming:
    """:class:`gateway.api.answer.Framing` of ``/v1/chat/completions``: events as
    ``chat.completion.chunk`` frames, the answer as one ``chat.completion``.

    Chunks carry SSE ``id:`` lines (the job's sequence numbers) so a client can resume.
    The official SDKs keep the last id and turn *any* later blank-line-terminated frame
    without data (a keep-alive comment, say) into an event with empty data, which they
    fail to parse as JSON. So once an id has been sent, this stream sends data frames
    only: no pings and no queue comments. ``opening``: send the role chunk first (a resume
    after some events has had it already)."""

    ping_s: float | None = 0.0  # keep-alive comments break the SDKs after an id (see above)

    def __init__(
        self,
        completion_id: str,
        model: str,
        created: int,
        include_usage: bool,
        *,
        opening: bool = True,
    ) -> None:
        self._id, self._model, self._created = completion_id, model, created
        self._base = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
        }
        self._include_usage = include_usage
        self._opening = opening
        self._sent_id = False

    def _chunk(self, delta: dict[str, str], finish: str | None, seq: int | None) -> bytes:
        body: dict[str, object] = {
            **self._base,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if self._include_usage:
            body["usage"] = None
        self._sent_id = self._sent_id or seq is not None
        return json_frame(json.dumps(body), id=seq)

    def first(self) -> Iterable[Frame]:
        if not self._opening:
            return ()
        return (self._chunk({"role": "assistant", "content": ""}, None, None),)

    def frames(self, event: Relayed) -> Iterable[Frame]:
        if isinstance(event, TokenEvent):  # (most frames)
            return (self._chunk({"content": event.text}, None, event.seq),)
        if isinstance(event, QueuedEvent):  # an SSE comment: OpenAI clients skip it...
            if self._sent_id:  # ...unless an id was sent before (see the class docstring)
                return []
            return [
                ServerSentEvent(comment=f"queued position={event.position} eta_s={event.eta_s}")
            ]
        if isinstance(event, DoneEvent):
            out: list[Frame] = [self._chunk({}, _finish_reason(event), event.seq)]
            if self._include_usage:
                usage = {**self._base, "choices": [], "usage": _usage(event)}
                out.append(json_frame(json.dumps(usage)))
            return out
        body = ErrorBody(error=event.error).model_dump()
        return [json_frame(json.dumps(body), id=event.seq)]

    def last(self) -> Iterable[Frame]:
        return (DONE_FRAME,)

    def farewell(self, info: ErrorInfo) -> Iterable[Frame]:
        return openai_farewell(info)

    def body(self, text: str, done: DoneEvent, job_id: str) -> dict[str, Any]:
        return ChatCompletion(
            id=self._id,
            created=self._created,
            model=self._model,
            choices=[
                Choice(message=ResponseMessage(content=text), finish_reason=_finish_reason(done))
            ],
            usage=CompletionUsage(**_usage(done)),
        ).model_dump(mode="json")
