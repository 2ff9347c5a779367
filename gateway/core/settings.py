"""Settings of the gateway process (``GATEWAY_*`` plus the common ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from gateway.core.types import ImageLimits
from shared.settings import CommonSettings

DEFAULT_BACKGROUND_MAX_WAIT_S = 30.0


class GatewaySettings(CommonSettings):
    gateway_host: str = Field(default="127.0.0.1", description="Address to listen on.")
    gateway_port: int = Field(default=8000, ge=1, le=65535, description="Port to listen on.")
    gateway_env: Literal["production", "development"] = Field(
        default="production",
        description="'development' (make demo) allows the built-in demo key when no keys are "
        "configured; 'production' refuses to start without real keys.",
    )
    gateway_api_keys: SecretStr | None = Field(
        default=None,
        description='API keys as "key:user_id:role[:priority],..." (role user, admin or service; '
        "priority interactive, the default, or background). No default.",
    )
    gateway_api_keys_file: Path | None = Field(
        default=None,
        description="A file with one key:user_id:role[:priority] per line (# comments).",
    )
    gateway_default_model: str = Field(
        default="medgemma-4b", description="The model /readyz requires a live worker for."
    )
    gateway_queue_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="How long a job may wait for a worker before it is dropped with an error.",
    )
    gateway_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Longest silence between two events of a running job before the stream "
        "ends with a worker_timeout error.",
    )
    gateway_end_user_header: str = Field(
        default="X-OpenWebUI-User-Id",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="The header in which a service key's front end names the end user of a "
        "request (Open WebUI sends X-OpenWebUI-User-Id with ENABLE_FORWARD_USER_INFO_HEADERS; "
        "for LibreChat set a header such as X-End-User to {{LIBRECHAT_USER_ID}} and name it "
        "here). Requests with other keys ignore it.",
    )
    gateway_coalesce_max_events: int = Field(
        default=16,
        ge=0,
        le=1024,
        description="When a stream falls behind (its client or this gateway is slower than "
        "the worker), at most this many waiting token events are sent as one frame (one SSE "
        "event, or one OpenAI chunk, with their joined text). A stream that keeps up gets one "
        "frame per event. 0: never joined.",
    )
    gateway_redis_outage_s: float = Field(
        default=15.0,
        gt=0,
        description="How long an open stream rides out a Redis outage (reconnecting, then "
        "reading the job's log from its last event) before it ends with redis_unavailable.",
    )
    gateway_max_generation_s: float = Field(
        default=600.0,
        gt=0,
        description="Longest one generation may run: the worker then ends the answer with "
        "finish_reason length. The turn lock, the job's images and a stream slot live longer.",
    )
    gateway_resume_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="How long a job whose client left mid-stream keeps running, waiting for "
        "the client to resume (GET /jobs/{id}/events); then it is cancelled.",
    )
    gateway_first_event_wait_s: float = Field(
        default=3.0,
        ge=0,
        description="How long a stream waits for its first event before sending headers, so "
        "a job that fails at once gets an HTTP error status rather than a 200 stream.",
    )
    gateway_ping_s: float = Field(default=15.0, gt=0, description="SSE keep-alive interval.")
    gateway_background_max_wait_s: float | None = Field(
        default=None,
        gt=0,
        description="How long background work (priority background, a model@background "
        "alias, OpenAI service_tier flex, or a key whose default is background) gives way to "
        "interactive work: it waits behind it in line for at most this long (then it is sent "
        "again on a line that workers read first, into their background slots), and once "
        "running it pauses while interactive work runs beside it for at most this long in "
        "all; so nothing starves. Must be below GATEWAY_IDLE_TIMEOUT_S "
        "(a pause is silence); default 30 s, or half the idle timeout if that is less.",
    )
    gateway_redis_max_connections: int = Field(
        default=64,
        ge=4,
        description="Redis connections of one gateway process, the relay's pub/sub one "
        "included; every stream shares them.",
    )
    gateway_redis_pool_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a request waits for a free Redis connection before it is "
        "answered 503 redis_unavailable.",
    )
    gateway_max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Larger request bodies get 413."
    )
    gateway_max_image_bytes: int = Field(
        default=5 * 1024 * 1024, ge=1024, description="Largest accepted image (decoded bytes)."
    )
    gateway_max_image_pixels: int = Field(
        default=40_000_000,
        ge=1024,
        description="Largest accepted image in pixels (width x height), checked from the "
        "header before decoding, against decompression bombs.",
    )
    gateway_max_images: int = Field(default=4, ge=1, description="Images per request.")
    gateway_rate_limit_rpm: int = Field(
        default=60, ge=0, description="Chat requests per minute per user (0: no limit)."
    )
    gateway_max_concurrent_streams: int = Field(
        default=4, ge=0, description="Open answers (streams) per user at once (0: no limit)."
    )
    gateway_audit_log: str = Field(
        default="stdout",
        description="Where the audit trail goes: 'stdout' or a file path (appended, mode 0600).",
    )
    gateway_cors_origins: list[str] = Field(
        default_factory=list,
        description='Front-end origins allowed by CORS, e.g. ["https://chat.hospital.org"]; '
        "empty (the default) turns CORS off.",
    )
    gateway_log_level: str = Field(default="INFO", description="Python log level.")

    @property
    def background_max_wait_s(self) -> float:
        if self.gateway_background_max_wait_s is not None:
            return self.gateway_background_max_wait_s
        return min(DEFAULT_BACKGROUND_MAX_WAIT_S, self.gateway_idle_timeout_s / 2)

    @model_validator(mode="after")
    def _pauses_fit_the_idle_timeout(self) -> GatewaySettings:
        if self.background_max_wait_s >= self.gateway_idle_timeout_s:
            raise ValueError(
                "GATEWAY_BACKGROUND_MAX_WAIT_S must be below GATEWAY_IDLE_TIMEOUT_S: a paused "
                "background job would otherwise be ended as silent"
            )
        return self

    @property
    def turn_ttl_s(self) -> int:
        """Longest life of one turn (queue wait + generation + a margin): bounds the
        conversation lock, the job's images and a rate-limit stream slot."""
        return int(self.gateway_queue_timeout_s + self.gateway_max_generation_s) + 60

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.gateway_max_image_bytes, self.gateway_max_image_pixels)
