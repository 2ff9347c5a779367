"""The logic of ``POST /medgemma``: refuse what the model cannot do, map the seed's controls to
sampling, run the turn, and format its events as SSE or one JSON body.

How the seed's controls change generation:

* ``temperature``: 0 decodes greedily; above 0 samples at that temperature (top-p 0.95).
  Omitted: 0.7, the seed's example value.
* ``verbosity`` (0-3, default 2): sets the answer budget to 1/4, 1/2, 1x or 2x the model's
  ``max_new_tokens`` and adds one instruction to the system prompt (0: "one or two
  sentences", 1: "brief", 2: nothing, 3: "detailed, step by step").
* ``system_message``: becomes the system turn (models whose ``system_message`` control is off
  refuse it). Without one, the model's ``serving.default_system_message`` is used.
* ``reason`` > 0 needs the ``reason`` control; ``search``, ``deep_research``, ``mcp`` need the
  capability of that name; ``inference: true`` needs ``inference``; ``dan`` is never
  supported. Each refusal is a 400 that names the field.
* ``in_billing`` / ``out_billing``: prices come from models.json. A non-zero value in the
  request that differs from the registry's is refused (400 ``billing_mismatch``), so a stale
  price table in a front end is noticed rather than silently overridden.
"""

from __future__ import annotations

import json
from decimal import Decimal, InvalidOperation

from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse, ServerSentEvent

from gateway.auditing import AuditInfo
from gateway.auth import Principal
from gateway.chat import Part, PendingMessage, new_id
from gateway.deps import ClientGone, admission
from gateway.errors import APIError, error_response
from gateway.images import parse_image_url
from gateway.jobs import status_for
from gateway.medgemma.protocol import ImagePart, MedGemmaRequest, MedGemmaResponse
from gateway.state import AppState
from gateway.streaming import JobStream
from gateway.supervision import Relayed
from shared.errors import ErrorBody, ErrorCode, ErrorInfo
from shared.protocol import DoneEvent, Priority, QueuedEvent, SamplingParams, TokenEvent
from shared.registry import ModelEntry

DEFAULT_TEMPERATURE = 0.7
SAMPLING_TOP_P = 0.95
_VERBOSITY_BUDGET = {0: 0.25, 1: 0.5, 2: 1.0, 3: 2.0}
_VERBOSITY_HINT = {
    0: "Answer in one or two sentences.",
    1: "Answer briefly.",
    2: "",
    3: "Answer in detail, step by step.",
}


def _refuse(code: ErrorCode, param: str, message: str) -> APIError:
    return APIError(400, code, message, param=param)


def check_request(req: MedGemmaRequest, entry: ModelEntry) -> None:
    caps, ctl, name = entry.capabilities, entry.controls, entry.model_name
    for field in ("search", "deep_research", "inference"):
        if getattr(req, field) and not getattr(caps, field):
            raise _refuse(
                ErrorCode.UNSUPPORTED_CAPABILITY,
                field,
                f"Model {name!r} does not support {field}; set {field} to false.",
            )
    if req.mcp and not caps.mcp:
        raise _refuse(
            ErrorCode.UNSUPPORTED_CAPABILITY,
            "mcp",
            f"Model {name!r} does not support MCP tools; send mcp as [].",
        )
    if req.stream and not caps.stream:
        raise _refuse(
            ErrorCode.UNSUPPORTED_CAPABILITY,
            "stream",
            f"Model {name!r} cannot stream; set stream to false.",
        )
    if req.dan:
        raise _refuse(
            ErrorCode.UNSUPPORTED_OPTION, "dan", "dan mode is not supported; set dan to false."
        )
    if req.reason and not ctl.reason:
        raise _refuse(
            ErrorCode.UNSUPPORTED_CONTROL,
            "reason",
            f"Model {name!r} has no reasoning control; set reason to 0.",
        )
    if req.temperature is not None and not ctl.temperature:
        raise _refuse(
            ErrorCode.UNSUPPORTED_CONTROL,
            "temperature",
            f"Model {name!r} does not let you set temperature; omit it.",
        )
    if req.verbosity is not None and not ctl.verbosity:
        raise _refuse(
            ErrorCode.UNSUPPORTED_CONTROL,
            "verbosity",
            f"Model {name!r} does not let you set verbosity; omit it.",
        )
    if req.system_message and not ctl.system_message:
        raise _refuse(
            ErrorCode.UNSUPPORTED_CONTROL,
            "system_message",
            f"Model {name!r} does not accept a system message; omit it.",
        )
    for field, price in (("in_billing", entry.in_billing), ("out_billing", entry.out_billing)):
        _check_price(field, getattr(req, field), price)


def _check_price(field: str, sent: float | str, registry: str) -> None:
    try:
        value = Decimal(str(sent))
    except InvalidOperation:
        raise _refuse(ErrorCode.INVALID_REQUEST, field, f"{field} must be a number.") from None
    if value != 0 and value != Decimal(registry):
        raise _refuse(
            ErrorCode.BILLING_MISMATCH,
            field,
            f"{field} {sent} differs from the price in models.json ({registry}); refresh the "
            "model list (GET /models) or send 0.",
        )


def sampling_for(req: MedGemmaRequest, entry: ModelEntry) -> tuple[SamplingParams, str]:
    """Sampling parameters and the verbosity instruction for the system prompt."""
    verbosity = 2 if req.verbosity is None else req.verbosity
    budget = max(16, int(entry.serving.max_new_tokens * _VERBOSITY_BUDGET[verbosity]))
    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    params = SamplingParams(
        temperature=temperature,
        top_p=SAMPLING_TOP_P if temperature > 0 else 1.0,
        max_new_tokens=budget,
    )
    return params, _VERBOSITY_HINT[verbosity]


def _system(req: MedGemmaRequest, entry: ModelEntry, hint: str) -> str | None:
    base = req.system_message or entry.serving.default_system_message or ""
    text = "\n\n".join(p for p in (base, hint) if p)
    return text or None


def seed_farewell(info: ErrorInfo) -> list[ServerSentEvent]:
    return [ServerSentEvent(data=json.dumps(ErrorBody(error=info).model_dump()), event="error")]


def seed_frame(event: Relayed, model: str, cid: str | None) -> ServerSentEvent:
    """One event in the seed API's SSE format: ``event:`` type, ``id:`` sequence number.

    ``queued`` events (place in line while waiting for a worker) carry no id: they are not
    part of the job's log and are not replayed on resume."""
    if isinstance(event, QueuedEvent):
        place = {"position": event.position, "eta_s": event.eta_s}
        return ServerSentEvent(data=json.dumps(place), event="queued")
    if isinstance(event, TokenEvent):
        data: dict[str, object] = {"text": event.text}
    elif isinstance(event, DoneEvent):
        data = {
            "conversation_id": cid,
            "model": model,
            "finish_reason": event.finish_reason,
            "usage": event.usage.model_dump(),
            "disclaimer": event.disclaimer,
        }
    else:
        data = ErrorBody(error=event.error).model_dump()
    return ServerSentEvent(data=json.dumps(data), event=event.type, id=str(event.seq))


async def serve(
    state: AppState,
    principal: Principal,
    entry: ModelEntry,
    req: MedGemmaRequest,
    priority: Priority,
    audit: AuditInfo,
    *,
    client_gone: ClientGone | None = None,
) -> EventSourceResponse | JSONResponse:
    check_request(req, entry)
    async with admission(state, principal, stream=req.stream) as slot:
        sampling, hint = sampling_for(req, entry)
        limits = state.settings.image_limits
        parts: list[Part] = []
        for i, part in enumerate(req.user_message):
            if isinstance(part, ImagePart):
                if not entry.capabilities.image:
                    raise _refuse(
                        ErrorCode.UNSUPPORTED_CAPABILITY,
                        f"user_message.{i}",
                        f"Model {entry.model_name!r} does not read images; send text only.",
                    )
                parts.append(
                    await parse_image_url(part.data_url, limits, f"user_message.{i}.data_url")
                )
            else:
                parts.append(part.text)
        new = PendingMessage(role="user", parts=parts)
        cid = req.conversation_id or new_id("c-")
        opened = await JobStream.start_turn(
            state.chat,
            slot=slot,
            audit=audit,
            observer=state.metrics.stream(entry.model_name, audit.started),
            principal=principal,
            entry=entry,
            new=new,
            system=_system(req, entry, hint),
            sampling=sampling,
            conversation_id=cid,
            api="medgemma",
            priority=priority,
        )
        headers = {"X-Job-Id": opened.job_id, "X-Conversation-Id": cid}
        if req.stream:
            failed = await opened.early_error(state.settings.gateway_first_event_wait_s)
            if failed is not None:
                return error_response(status_for(failed.code), failed, headers)
            return opened.sse(
                lambda event: [seed_frame(event, entry.model_name, cid)],
                farewell=seed_farewell,
                headers=headers,
                ping_s=state.settings.gateway_ping_s,
            )
        text, end = await opened.collect(client_gone)
        if isinstance(end, ErrorInfo):
            return error_response(status_for(end.code), end, headers)
        body = MedGemmaResponse(
            conversation_id=cid,
            model=entry.model_name,
            content=text,
            usage=end.usage,
            finish_reason=end.finish_reason,
            job_id=opened.job_id,
            disclaimer=end.disclaimer,
        )
        return JSONResponse(body.model_dump(mode="json"), headers=headers)
