"""``/healthz`` (the process is alive) and ``/readyz`` (it can serve the default model)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from gateway.api.deps import StateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: Redis reachable and a worker for the default model")
async def readyz(state: StateDep) -> JSONResponse:
    body: dict[str, Any] = {"redis": False, "models": {}}
    try:
        await state.redis.ping()
        body["redis"] = True
        names = [entry.model_name for entry in state.registry.models]
        body["models"] = await state.jobs.live_counts(names)
    except (RedisError, OSError):
        pass
    default = state.settings.gateway_default_model
    ready = body["redis"] and body["models"].get(default, 0) > 0
    body["status"] = "ready" if ready else "not_ready"
    body["default_model"] = default
    return JSONResponse(body, status_code=200 if ready else 503)
