"""``GET /models``: what the front end's model dropdown reads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.deps import PrincipalDep, StateDep

router = APIRouter(tags=["models"])


@router.get("/models", summary="Models you may use, in the seed's shape, with availability")
async def list_models(state: StateDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    out = []
    for entry in state.registry.models:
        if entry.admin and not principal.is_admin:
            continue
        item = entry.public()
        item["available"] = await state.chat.jobs.live_workers(entry.model_name) > 0
        out.append(item)
    return out
