"""``GET /metrics`` (Prometheus, no auth, like health) and ``GET /admin/fleet`` (admins only).

``/metrics`` reads Redis first (queues, heartbeats: see :mod:`gateway.services.fleet`), sets
the gauges and renders, with no ``await`` between the last two, so concurrent scrapes never see a
half-set state. If Redis cannot be read the scrape still answers, with ``medgemma_redis_up 0``
and without the Redis-derived gauges. Like ``/readyz`` it names every model of the registry:
keep it off the public side of a reverse proxy.

``/admin/fleet`` is a 404 for anyone but an admin, the same body an unknown path gets, so the
route cannot be probed (as admin-only models). Its error rate is counted in memory by this
gateway process over the last five minutes (:meth:`Metrics.recent_errors`); with several
gateways, each reports its own.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from gateway.api.deps import PrincipalDep, StateDep
from gateway.services.fleet import ModelFleet, WorkerView, read_fleet
from gateway.services.metrics import ERROR_WINDOW_S
from gateway.services.state import AppState

logger = logging.getLogger(__name__)

router = APIRouter(tags=["operations"])


async def _fleet(state: AppState) -> list[ModelFleet]:
    return await read_fleet(
        state.redis,
        state.keys,
        state.registry,
        state.jobs.book,
        heartbeat_ttl_s=state.settings.heartbeat_ttl_s,
    )


@router.get("/metrics", summary="Prometheus metrics (text format)", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    fleet: list[ModelFleet] | None
    try:
        fleet = await _fleet(state)
    except (RedisError, OSError) as exc:
        logger.warning("metrics: cannot read Redis: %s", type(exc).__name__)
        fleet = None
    state.metrics.refresh(fleet)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _worker(w: WorkerView) -> dict[str, Any]:
    hb = w.heartbeat
    return {
        "worker_id": hb.worker_id,
        "heartbeat_age_s": round(w.age_s, 2),
        "device": hb.device,
        "quantization": hb.quantization,
        "jobs_running": hb.jobs_running,
        "concurrency": hb.concurrency,
        "gpu_memory_free_bytes": hb.gpu_memory_free_bytes,
        "version": hb.version,
        "uptime_s": round(max(0.0, hb.sent_at - hb.started_at), 1),
    }


@router.get("/admin/fleet", summary="Workers, queues and recent errors per model (admins)")
async def fleet(state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    if not principal.is_admin:
        raise HTTPException(status_code=404)  # exactly what an unknown path answers
    recent = state.metrics.recent_errors()
    models = []
    for m in await _fleet(state):
        models.append(
            {
                "model": m.model,
                "queue": m.queue,
                "live_workers": m.live_workers,
                "queue_depth": m.queue_depth,
                "celery_queue_length": m.celery_queue_length,
                "drain_rate_per_s": round(m.drain_rate, 4),
                "recent": recent.get(m.model, {"requests": 0, "errors": 0, "error_rate": None}),
                "workers": [_worker(w) for w in m.workers],
            }
        )
    total = sum(r["requests"] for r in recent.values())
    errors = sum(r["errors"] for r in recent.values())
    return {
        "generated_at": round(time.time(), 3),
        "error_window_s": ERROR_WINDOW_S,
        "recent": {
            "requests": total,
            "errors": errors,
            "error_rate": round(errors / total, 4) if total else None,
        },
        "models": models,
    }
