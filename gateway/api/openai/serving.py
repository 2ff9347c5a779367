"""The logic of ``POST /v1/chat/completions``: map an OpenAI request onto a turn, and the
turn's events onto OpenAI's frames.

* Streaming sends ``data: {chat.completion.chunk}`` frames exactly as OpenAI does: the first
  carries ``delta.role``, each token a ``delta.content``, the last an empty delta with
  ``finish_reason``; with ``stream_options.include_usage`` every chunk has ``"usage": null``
  and a final chunk with ``choices: []`` carries the usage; then ``data: [DONE]``. A failure in
  the middle of a stream is an error frame ``{"error": {...}}`` and then ``data: [DONE]``.
* Stateless by default, as OpenAI clients expect: the request's messages are the whole
  context. With ``conversation_id`` (body) or ``X-Conversation-Id`` (header) the server's
  stored history is the context instead: only the request's system messages and its last user
  message are used, and the finished turn is stored.
* System and developer messages are joined into one system turn. The last message must be
  the user's. The model calls no tools: ``tools``/``functions`` offered with ``tool_choice``
  absent, ``"auto"`` or ``"none"`` are not shown to it and it answers in text (response
  header ``X-Tools-Ignored: true``); ``"required"`` or a named function is a 400, and so are
  tool and function messages.
* ``temperature`` defaults to 1 and ``top_p`` to 1, as in OpenAI's API; the answer budget is
  ``max_completion_tokens`` (or ``max_tokens``), else what the context has left (bounded by
  ``GATEWAY_MAX_GENERATION_S``); a cut answer ends with ``finish_reason: "length"``.
"""

from __future__ import annotations

import time

from fastapi.responses import Response

from gateway.api.answer import answer, open_turn
from gateway.api.deps import ClientGone, admission
from gateway.api.openai.framing import ChunkFraming
from gateway.api.openai.protocol import ChatCompletionRequest, ImageContent, Message
from gateway.core.errors import APIError
from gateway.core.types import ImageLimits
from gateway.services.apikeys import Principal
from gateway.services.audit import AuditInfo
from gateway.services.images import parse_image_url
from gateway.services.state import AppState
from gateway.services.turns import Part, PendingMessage, TurnRequest, check_streaming
from shared.errors import ErrorCode
from shared.protocol import Priority, SamplingParams
from shared.registry import ModelEntry

MAX_STOP = 4


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, ErrorCode.UNSUPPORTED_OPTION, message, param=param)


#: Response header of a request that offered tools: they were not shown to the model.
TOOLS_HEADER = "X-Tools-Ignored"
_CHOICE_FREE = (None, "auto", "none")  # the model may answer without calling any tool


def check_options(req: ChatCompletionRequest) -> bool:
    """Refuse what cannot be honoured, by name. True if the request offered tools (or
    functions) that it lets the model leave uncalled: it is answered in text, as OpenAI's
    semantics allow for ``tool_choice`` absent, ``"auto"`` or ``"none"`` (front ends such as
    Open WebUI attach their built-in tools to every chat)."""
    if req.n not in (None, 1):
        raise _unsupported("n", "Only n=1 is supported; send one request per completion.")
    if req.tool_choice not in _CHOICE_FREE:
        raise _unsupported(
            "tool_choice",
            'This server does not call tools: send tool_choice absent, "auto" or "none" '
            '(the model then answers in text), not "required" or a named function.',
        )
    if req.function_call not in _CHOICE_FREE:
        raise _unsupported(
            "function_call",
            'This server does not call functions: send function_call absent, "auto" or '
            '"none" (the model then answers in text).',
        )
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _unsupported("response_format", "Only the text response format is supported.")
    if req.logprobs or req.top_logprobs:
        raise _unsupported("logprobs", "Log probabilities are not returned by this server.")
    if req.logit_bias:
        raise _unsupported("logit_bias", "logit_bias is not supported.")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise _unsupported(name, f"{name} is not supported; omit it or send 0.")
    if req.audio is not None:
        raise _unsupported("audio", "Audio output is not supported.")
    offered_tools = bool(req.tools or req.functions)
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise APIError(
            400,
            ErrorCode.INVALID_REQUEST,
            f"stop takes up to {MAX_STOP} non-empty strings.",
            param="stop",
        )
    return offered_tools


def sampling_for(req: ChatCompletionRequest, entry: ModelEntry) -> SamplingParams:
    """Without ``max_tokens`` (Open WebUI sends none) the answer may use the context that is
    left, as OpenAI's API allows, bounded by the generation time limit; the model's
    ``max_new_tokens`` is then only the room kept when old turns are trimmed."""
    asked = req.max_completion_tokens or req.max_tokens
    budget = asked or entry.serving.max_new_tokens
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_new_tokens=min(budget, entry.serving.context_length),
        open_ended=asked is None,
        seed=req.seed,
        stop=stops,
    )


async def _parts(m: Message, i: int, limits: ImageLimits) -> list[Part]:
    if m.content is None:
        return []
    if isinstance(m.content, str):
        return [m.content]
    parts: list[Part] = []
    for j, c in enumerate(m.content):
        if isinstance(c, ImageContent):
            param = f"messages.{i}.content.{j}.image_url.url"
            parts.append(await parse_image_url(c.image_url.url, limits, param))
        else:
            parts.append(c.text)
    return parts


async def split_messages(
    req: ChatCompletionRequest, limits: ImageLimits
) -> tuple[str | None, list[PendingMessage], PendingMessage]:
    """System text, earlier turns and the new user message."""
    system: list[str] = []
    turns: list[PendingMessage] = []
    for i, m in enumerate(req.messages):
        if m.role in ("tool", "function"):
            raise _unsupported(f"messages.{i}.role", f"{m.role} messages are not supported.")
        parts = await _parts(m, i, limits)
        if m.role in ("system", "developer"):
            if any(not isinstance(p, str) for p in parts):
                raise APIError(
                    400,
                    ErrorCode.INVALID_REQUEST,
                    "System messages take text only.",
                    param=f"messages.{i}.content",
                )
            system.append("".join(p for p in parts if isinstance(p, str)))
        else:
            turns.append(
                PendingMessage(role="user" if m.role == "user" else "assistant", parts=parts)
            )
    if not turns or turns[-1].role != "user":
        raise APIError(
            400,
            ErrorCode.INVALID_REQUEST,
            "The last message must be the user's message to answer.",
            param="messages",
        )
    return ("\n\n".join(s for s in system if s) or None), turns[:-1], turns[-1]


async def serve(
    state: AppState,
    principal: Principal,
    entry: ModelEntry,
    req: ChatCompletionRequest,
    priority: Priority,
    header_conversation_id: str | None,
    audit: AuditInfo,
    *,
    client_gone: ClientGone | None = None,
    resumable: bool = False,
) -> Response:
    """``resumable``: the client may come back for the rest (``GET /jobs/{id}/events``), so a
    dropped connection gets the resume grace; otherwise (OpenAI clients never resume) the job
    is cancelled as soon as its client is gone, freeing the GPU at once."""
    audit.asked(entry.model_name)
    tools_ignored = check_options(req)
    check_streaming(entry, req.stream)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    limits = state.settings.image_limits
    async with admission(state, principal, stream=req.stream) as slot:
        system, earlier, new = await split_messages(req, limits)
        cid = req.conversation_id or header_conversation_id
        turn = TurnRequest(
            principal=principal,
            entry=entry,
            new=new,
            sampling=sampling_for(req, entry),
            api="openai",
            system=system,
            conversation_id=cid,
            earlier=() if cid else earlier,
            include_usage=include_usage,
            priority=priority,
        )
        opened = await open_turn(state, turn, slot=slot, audit=audit)
        if not resumable:
            opened.resume_grace_s = 0.0
        headers = {"X-Job-Id": opened.job_id}
        if cid:
            headers["X-Conversation-Id"] = cid
        if tools_ignored:
            headers[TOOLS_HEADER] = "true"
        framing = ChunkFraming(
            f"chatcmpl-{opened.job_id}", entry.model_name, int(time.time()), include_usage
        )
        return await answer(
            opened,
            framing,
            as_stream=req.stream,
            headers=headers,
            settings=state.settings,
            client_gone=client_gone,
        )
