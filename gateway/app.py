"""``create_app(settings)``: the gateway's FastAPI app, built from settings, no globals.

The lifespan validates models.json and the API keys (a bad file or a production start without
keys stops start-up with one clear error), opens a Redis client and the multiplexed relay (on
a connection of its own), and builds the Celery app used only to send tasks by name.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from celery import Celery
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from redis.asyncio import Redis
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.api.auditing import AuditMiddleware
from gateway.api.errors import error_response, install_error_handlers
from gateway.api.medgemma.router import router as medgemma_router
from gateway.api.openai.router import router as openai_router
from gateway.api.routes.conversations import router as conversations_router
from gateway.api.routes.health import router as health_router
from gateway.api.routes.jobs import router as jobs_router
from gateway.api.routes.metrics import router as metrics_router
from gateway.api.routes.models import router as models_router
from gateway.api.routes.page import router as page_router
from gateway.core.errors import APIError
from gateway.core.settings import GatewaySettings
from gateway.services.apikeys import KeyStore
from gateway.services.audit import AuditLog
from gateway.services.conversations import ConversationStore
from gateway.services.giveback import GiveBack
from gateway.services.jobs import JobService
from gateway.services.metrics import Metrics
from gateway.services.queue_book import QueueBook
from gateway.services.ratelimit import RateLimiter
from gateway.services.relay import Relay
from gateway.services.state import AppState
from gateway.services.turns import TurnService
from shared.celery_config import celery_options
from shared.errors import ErrorCode
from shared.keys import Keys
from shared.redis_url import async_redis
from shared.registry import load_registry

logger = logging.getLogger(__name__)


class BodyLimit:
    """Refuses request bodies above the limit with 413 before they are read."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                err = APIError(
                    413,
                    ErrorCode.BODY_TOO_LARGE,
                    f"The request body is larger than {self.max_bytes} bytes.",
                )
                await error_response(413, err.info())(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: GatewaySettings) -> FastAPI:
    registry = load_registry(settings.models_file)  # fail fast, before serving anything
    api_keys = KeyStore.from_config(
        settings.gateway_api_keys.get_secret_value() if settings.gateway_api_keys else None,
        settings.gateway_api_keys_file,
        development=settings.gateway_env == "development",
    )

    audit_log = AuditLog.from_target(settings.gateway_audit_log)
    metrics = Metrics()  # this app's own Prometheus registry

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        def client(name: str, max_connections: int, **extra: Any) -> Redis:
            return async_redis(
                settings.redis_url,
                max_connections=max_connections,
                pool_timeout_s=settings.gateway_redis_pool_timeout_s,
                client_name=name,  # CLIENT LIST shows whose connections these are
                decode_responses=True,
                socket_connect_timeout=2,
                socket_timeout=5,
                health_check_interval=15,
                **extra,
            )

        redis = client("medgemma-gateway", settings.gateway_redis_max_connections)
        # The relay's pub/sub connection speaks RESP2: under RESP3 every message is a push
        # that redis-py hands through a logging callback first (~5% of the CPU per token).
        listen = client("medgemma-gateway-relay", 2, protocol=2)
        keys = Keys(settings.key_prefix)
        relay = Relay(redis, keys, coalesce=settings.gateway_coalesce_max_events, listen=listen)
        await relay.start()
        celery = Celery("medgemma-gateway")
        celery.conf.update(celery_options(settings.redis_url))
        conversations = ConversationStore(redis, keys, ttl_s=settings.conversation_ttl_s)
        give_back = GiveBack()  # releases that failed in an outage, retried
        jobs = JobService(
            redis,
            relay,
            celery,
            keys,
            heartbeat_ttl_s=settings.heartbeat_ttl_s,
            idle_timeout_s=settings.gateway_idle_timeout_s,
            job_ttl_s=settings.job_ttl_s,
            resume_grace_s=settings.gateway_resume_grace_s,
            queues={m.model_name: m.queue for m in registry.models},
            book=QueueBook(redis, keys, queue_timeout_s=settings.gateway_queue_timeout_s),
            outage_s=settings.gateway_redis_outage_s,
        )
        turns = TurnService(
            jobs,
            conversations,
            queue_timeout_s=settings.gateway_queue_timeout_s,
            max_generation_s=settings.gateway_max_generation_s,
            max_images=settings.gateway_max_images,
            turn_ttl_s=settings.turn_ttl_s,
            background_max_wait_s=settings.background_max_wait_s,
            give_back=give_back,
        )
        app.state.gateway = AppState(
            settings=settings,
            registry=registry,
            keys=keys,
            redis=redis,
            relay=relay,
            celery=celery,
            turns=turns,
            api_keys=api_keys,
            limiter=RateLimiter(
                redis,
                settings.key_prefix,
                requests_per_minute=settings.gateway_rate_limit_rpm,
                concurrent_streams=settings.gateway_max_concurrent_streams,
                stream_ttl_s=settings.turn_ttl_s,
                give_back=give_back,
            ),
            audit=audit_log,
            metrics=metrics,
        )
        if api_keys.uses_demo_key:
            logger.warning("development mode: the demo API key 'demo-key' (user demo) is active")
        logger.info("gateway ready: %d models in %s", len(registry.models), registry.source)
        try:
            yield
        finally:
            await jobs.aclose()
            await give_back.aclose()
            await relay.stop()
            await listen.aclose()
            await redis.aclose()
            celery.close()
            audit_log.close()

    app = FastAPI(
        title="MedGemma serving gateway",
        version="0.1.0",
        lifespan=lifespan,
        description="Chat with MedGemma through a queue of GPU workers; answers stream as SSE.",
    )
    install_error_handlers(app)
    app.include_router(health_router)
    app.include_router(models_router)
    app.include_router(medgemma_router)
    app.include_router(openai_router)
    app.include_router(conversations_router)
    app.include_router(jobs_router)
    app.include_router(metrics_router)
    app.include_router(page_router)
    app.add_middleware(BodyLimit, max_bytes=settings.gateway_max_body_bytes)
    app.add_middleware(AuditMiddleware, log=audit_log, observe=metrics.observe_request)
    if settings.gateway_cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.gateway_cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID", "X-Conversation-Id"],
            expose_headers=["X-Job-Id", "X-Conversation-Id", "Retry-After"],
        )
    return app
