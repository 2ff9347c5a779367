"""What the lifespan builds and every request uses."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from redis.asyncio import Redis

from gateway.core.settings import GatewaySettings
from gateway.services.apikeys import KeyStore
from gateway.services.audit import AuditLog
from gateway.services.conversations import ConversationStore
from gateway.services.jobs import JobService
from gateway.services.metrics import Metrics
from gateway.services.ratelimit import RateLimiter
from gateway.services.relay import Relay
from gateway.services.turns import TurnService
from shared.keys import Keys
from shared.registry import Registry


@dataclass
class AppState:
    settings: GatewaySettings
    registry: Registry
    keys: Keys
    redis: Redis
    relay: Relay
    celery: Celery
    turns: TurnService
    api_keys: KeyStore
    limiter: RateLimiter
    audit: AuditLog
    metrics: Metrics

    @property
    def jobs(self) -> JobService:
        return self.turns.jobs

    @property
    def conversations(self) -> ConversationStore:
        return self.turns.conversations
