"""HTTP routes of the OpenAI-compatible API. Thin: parse, authorize, hand over to serving."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from gateway.deps import (
    AuditDep,
    ClientGoneDep,
    PrincipalDep,
    StateDep,
    name_end_user,
    note_principal,
    visible_model,
)
from gateway.medgemma.protocol import CONVERSATION_ID
from gateway.openai_api import serving
from gateway.openai_api.protocol import ChatCompletionRequest, ModelCard, ModelList

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post("/chat/completions", response_model=None, summary="OpenAI Chat Completions")
async def chat_completions(
    request: Request,
    req: ChatCompletionRequest,
    state: StateDep,
    principal: PrincipalDep,
    audit: AuditDep,
    gone: ClientGoneDep,
    x_conversation_id: Annotated[str | None, Header(pattern=CONVERSATION_ID)] = None,
    x_resumable: Annotated[
        bool,
        Header(
            description="true: a dropped stream may be resumed (GET /jobs/{id}/events) "
            "within the resume grace; otherwise it is cancelled at once"
        ),
    ] = False,
) -> EventSourceResponse | JSONResponse:
    if principal.may_name_users and req.user:  # the OpenAI field names the end user too
        principal = name_end_user(principal, req.user, param="user")
        note_principal(request, principal)
    entry = visible_model(state, principal, req.model)
    return await serving.serve(
        state,
        principal,
        entry,
        req,
        x_conversation_id,
        audit,
        client_gone=gone,
        resumable=x_resumable,
    )


@router.get("/models", summary="Models you may use, in OpenAI's list format")
async def list_models(state: StateDep, principal: PrincipalDep) -> ModelList:
    """Models some worker serves first (a front end picks the first as its default), then
    the others, each group in the registry's order."""
    created = int(state.registry.source.stat().st_mtime)
    usable = [m for m in state.registry.models if principal.is_admin or not m.admin]
    live = await state.chat.jobs.live_counts([m.model_name for m in usable])
    ordered = sorted(usable, key=lambda m: live[m.model_name] == 0)  # stable
    return ModelList(
        data=[
            ModelCard(id=m.model_name, created=created, owned_by="medgemma-serve") for m in ordered
        ]
    )
