"""Settings shared by every process, read from the environment (and a .env file).

Each process (gateway, worker) extends :class:`CommonSettings` with its own fields. Every
environment variable is the field's name in upper case (``REDIS_URL``, ``WORKER_MODEL``,
``GATEWAY_PORT`` ...); process-specific fields carry their process's name as a prefix. Nothing
here is built at import time: processes call ``Settings()`` in their entry point, so tests can
build settings of their own.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODELS_FILE = Path(__file__).resolve().parent.parent / "models.json"


class CommonSettings(BaseSettings):
    """Settings that the gateway and the workers must share to talk to each other."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis for the Celery broker, token events, conversations and heartbeats. "
        "Use rediss:// for TLS, redis://:password@host/0 for a password, and "
        "sentinel://host1:26379,host2:26379/0?master=NAME for Sentinel failover.",
    )
    models_file: Path = Field(
        default=DEFAULT_MODELS_FILE,
        description="Path of the model registry (models.json).",
    )
    key_prefix: str = Field(
        default="mg",
        pattern=r"^[a-z][a-z0-9_-]{0,15}$",
        description="Prefix of every Redis key and channel this stack writes (lets two stacks "
        "share one Redis).",
    )
    job_ttl_s: int = Field(
        default=3600,
        ge=60,
        description="How long a job's event log (used to resume streams) and its other "
        "per-job keys live in Redis after their last write.",
    )
    conversation_ttl_s: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="How long a conversation is kept after its last turn (default 7 days).",
    )
    heartbeat_interval_s: float = Field(
        default=2.0,
        gt=0,
        description="How often a worker announces itself in Redis.",
    )
    heartbeat_ttl_s: float = Field(
        default=6.0,
        gt=0,
        description="A worker whose last heartbeat is older than this is considered gone.",
    )
