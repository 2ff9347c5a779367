"""HTTP routes of the OpenAI-compatible API. Thin: parse, authorize, hand over to serving."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response

from gateway.api.deps import (
    BACKGROUND_ALIAS,
    AuditDep,
    ClientGoneDep,
    PrincipalDep,
    StateDep,
    chosen_model,
    name_end_user,
    note_principal,
    priority_for,
)
from gateway.api.openai import serving
from gateway.api.openai.protocol import ChatCompletionRequest, ModelCard, ModelList
from gateway.core.types import CONVERSATION_ID
from shared.protocol import Priority

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
) -> Response:
    if principal.may_name_users and req.user:  # the OpenAI field names the end user too
        principal = name_end_user(principal, req.user, param="user")
        note_principal(request, principal)
    entry, aliased = chosen_model(state, principal, req.model)
    flex: Priority | None = "background" if req.service_tier == "flex" else None
    return await serving.serve(
        state,
        principal,
        entry,
        req,
        priority_for(principal, req.priority, aliased, flex),
        x_conversation_id,
        audit,
        client_gone=gone,
        resumable=x_resumable,
    )


@router.get("/models", summary="Models you may use, in OpenAI's list format")
async def list_models(state: StateDep, principal: PrincipalDep) -> ModelList:
    """Models some worker serves first (a front end picks the first as its default), then
    their ``@background`` aliases (a front end's task model: the same model, as background
    work), then the models no worker serves; each group in the registry's order."""
    created = int(state.registry.source.stat().st_mtime)
    usable = [m for m in state.registry.models if principal.is_admin or not m.admin]
    live = await state.jobs.live_counts([m.model_name for m in usable])
    served = [m.model_name for m in usable if live[m.model_name]]
    names = [
        *served,
        *(name + BACKGROUND_ALIAS for name in served),
        *(m.model_name for m in usable if not live[m.model_name]),
    ]
    return ModelList(
        data=[ModelCard(id=n, created=created, owned_by="medgemma-serve") for n in names]
    )
