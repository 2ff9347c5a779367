"""Stable error codes and the one error body used everywhere.

HTTP errors and mid-stream ``error`` events carry the same object, shaped like OpenAI's:
``{"error": {"message", "type", "param", "code"}}``. ``code`` is stable and machine-readable;
``message`` tells a person what to do.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel


class ErrorCode(StrEnum):
    # Request errors (4xx)
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_CAPABILITY = "unsupported_capability"
    UNSUPPORTED_CONTROL = "unsupported_control"
    UNSUPPORTED_OPTION = "unsupported_option"
    BILLING_MISMATCH = "billing_mismatch"
    MODEL_NOT_FOUND = "model_not_found"
    CONVERSATION_NOT_FOUND = "conversation_not_found"
    CONVERSATION_BUSY = "conversation_busy"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    BODY_TOO_LARGE = "body_too_large"
    IMAGE_URL_NOT_ALLOWED = "image_url_not_allowed"
    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_TOO_MANY_PIXELS = "image_too_many_pixels"
    TOO_MANY_IMAGES = "too_many_images"
    IMAGE_EXPIRED = "image_expired"
    # Capacity and availability
    MODEL_UNAVAILABLE = "model_unavailable"
    QUEUE_FULL = "queue_full"
    RATE_LIMITED = "rate_limited"
    REDIS_UNAVAILABLE = "redis_unavailable"
    GATEWAY_SHUTDOWN = "gateway_shutdown"
    # Job failures (mid-stream or in a non-stream error response)
    WORKER_TIMEOUT = "worker_timeout"
    WORKER_LOST = "worker_lost"
    QUEUE_TIMEOUT = "queue_timeout"
    GENERATION_FAILED = "generation_failed"
    PROMPT_TOO_LONG = "prompt_too_long"
    INTERNAL = "internal_error"


class ErrorInfo(BaseModel):
    """The inner error object: OpenAI's fields."""

    message: str
    type: str
    param: str | None = None
    code: str


class ErrorBody(BaseModel):
    error: ErrorInfo
