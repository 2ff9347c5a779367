"""``GET /models``: what the front end's model dropdown reads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from gateway.api.deps import PrincipalDep, StateDep

router = APIRouter(tags=["models"])


@router.get("/models", summary="Models you may use, in the seed's shape, with availability")
async def list_models(state: StateDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    usable = [e for e in state.registry.models if principal.is_admin or not e.admin]
    live = await state.jobs.live_counts([e.model_name for e in usable])
    return [{**entry.public(), "available": live[entry.model_name] > 0} for entry in usable]
