"""The seed API's answer format: SSE events ``token`` / ``done`` / ``error`` (``queued`` while
waiting, without an id), or one :class:`MedGemmaResponse` body."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from gateway.api.medgemma.protocol import MedGemmaResponse
from gateway.api.sse import Frame, json_frame
from gateway.services.supervision import Relayed
from shared.errors import ErrorBody, ErrorInfo
from shared.protocol import DoneEvent, QueuedEvent, TokenEvent


def seed_farewell(info: ErrorInfo) -> list[Frame]:
    return [json_frame(json.dumps(ErrorBody(error=info).model_dump()), event="error")]


def seed_frame(event: Relayed, model: str, cid: str | None) -> Frame:
    """One event in the seed API's SSE format: ``event:`` type, ``id:`` sequence number.

    ``queued`` events (place in line while waiting for a worker) carry no id: they are not
    part of the job's log and are not replayed on resume."""
    if isinstance(event, QueuedEvent):
        place = {"position": event.position, "eta_s": event.eta_s}
        return json_frame(json.dumps(place), event="queued")
    if isinstance(event, TokenEvent):  # (most frames)
        return json_frame(json.dumps({"text": event.text}), event="token", id=event.seq)
    if isinstance(event, DoneEvent):
        data: dict[str, object] = {
            "conversation_id": cid,
            "model": model,
            "finish_reason": event.finish_reason,
            "usage": event.usage.model_dump(),
            "disclaimer": event.disclaimer,
        }
    else:
        data = ErrorBody(error=event.error).model_dump()
    return json_frame(json.dumps(data), event=event.type, id=event.seq)


class SeedFraming:
    """:class:`gateway.api.answer.Framing` of ``/medgemma``."""

    ping_s: float | None = None  # GATEWAY_PING_S: keep-alive comments are safe here

    def __init__(self, model: str, conversation_id: str | None) -> None:
        self._model = model
        self._cid = conversation_id

    def first(self) -> Iterable[Frame]:
        return ()

    def frames(self, event: Relayed) -> Iterable[Frame]:
        return (seed_frame(event, self._model, self._cid),)

    def last(self) -> Iterable[Frame]:
        return ()

    def farewell(self, info: ErrorInfo) -> Iterable[Frame]:
        return seed_farewell(info)

    def body(self, text: str, done: DoneEvent, job_id: str) -> dict[str, Any]:
        return MedGemmaResponse(
            conversation_id=self._cid or "",
            model=self._model,
            content=text,
            usage=done.usage,
            finish_reason=done.finish_reason,
            job_id=job_id,
            disclaimer=done.disclaimer,
        ).model_dump(mode="json")
