"""What the lifespan builds and every request uses."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from redis.asyncio import Redis

from gateway.audit import AuditLog
from gateway.auth import KeyStore
from gateway.chat import ChatService
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.relay import Relay
from gateway.settings import GatewaySettings
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
    chat: ChatService
    api_keys: KeyStore
    limiter: RateLimiter
    audit: AuditLog
    metrics: Metrics
