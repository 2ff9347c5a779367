"""HTTP route of the seed's API. Thin: parse, authorize, hand over to serving."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from gateway.api.deps import (
    AuditDep,
    ClientGoneDep,
    PrincipalDep,
    StateDep,
    chosen_model,
    priority_for,
)
from gateway.api.medgemma import serving
from gateway.api.medgemma.protocol import MedGemmaRequest

router = APIRouter(tags=["medgemma"])


@router.post(
    "/medgemma",
    summary="Chat with a model (the seed's API); SSE when stream is true",
    response_model=None,
)
async def medgemma(
    req: MedGemmaRequest,
    state: StateDep,
    principal: PrincipalDep,
    audit: AuditDep,
    gone: ClientGoneDep,
) -> Response:
    entry, aliased = chosen_model(state, principal, req.model)
    priority = priority_for(principal, req.priority, aliased)
    return await serving.serve(state, principal, entry, req, priority, audit, client_gone=gone)
