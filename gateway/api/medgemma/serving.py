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

from decimal import Decimal, InvalidOperation

from fastapi.responses import Response

from gateway.api.answer import answer, open_turn
from gateway.api.deps import ClientGone, admission
from gateway.api.medgemma.framing import SeedFraming
from gateway.api.medgemma.protocol import ImagePart, MedGemmaRequest
from gateway.core.errors import APIError
from gateway.services.apikeys import Principal
from gateway.services.audit import AuditInfo
from gateway.services.images import parse_image_url
from gateway.services.state import AppState
from gateway.services.turns import (
    Part,
    PendingMessage,
    TurnRequest,
    check_images,
    check_streaming,
    new_id,
)
from shared.errors import ErrorCode
from shared.protocol import Priority, SamplingParams
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
    check_streaming(entry, req.stream)
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


async def serve(
    state: AppState,
    principal: Principal,
    entry: ModelEntry,
    req: MedGemmaRequest,
    priority: Priority,
    audit: AuditInfo,
    *,
    client_gone: ClientGone | None = None,
) -> Response:
    audit.asked(entry.model_name)
    check_request(req, entry)
    async with admission(state, principal, stream=req.stream) as slot:
        sampling, hint = sampling_for(req, entry)
        limits = state.settings.image_limits
        parts: list[Part] = []
        for i, part in enumerate(req.user_message):
            if isinstance(part, ImagePart):
                check_images(entry, 1, param=f"user_message.{i}")  # before decoding it
                parts.append(
                    await parse_image_url(part.data_url, limits, f"user_message.{i}.data_url")
                )
            else:
                parts.append(part.text)
        new = PendingMessage(role="user", parts=parts)
        cid = req.conversation_id or new_id("c-")
        turn = TurnRequest(
            principal=principal,
            entry=entry,
            new=new,
            sampling=sampling,
            api="medgemma",
            system=_system(req, entry, hint),
            conversation_id=cid,
            priority=priority,
        )
        opened = await open_turn(state, turn, slot=slot, audit=audit)
        return await answer(
            opened,
            SeedFraming(entry.model_name, cid),
            as_stream=req.stream,
            headers={"X-Job-Id": opened.job_id, "X-Conversation-Id": cid},
            settings=state.settings,
            client_gone=client_gone,
        )
