"""The gateway's error type: every refusal is an :class:`APIError` with a stable code, an HTTP
status and a message a person can act on. :mod:`gateway.api.errors` turns it (and FastAPI's,
Starlette's and Redis's errors) into the one error body."""

from __future__ import annotations

from collections.abc import Mapping

from shared.errors import ErrorCode, ErrorInfo

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type(status: int, default: str = "server_error") -> str:
    """The OpenAI-style error ``type`` of an HTTP status."""
    return _TYPES.get(status, default)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def info(self) -> ErrorInfo:
        return ErrorInfo(
            message=self.message,
            type=error_type(self.status),
            param=self.param,
            code=self.code.value,
        )


class ClientLeft(Exception):
    """The client of a non-stream request closed its connection before the answer was done."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


def status_for(code: str) -> int:
    """HTTP status for a job that failed before a response was sent."""
    statuses: dict[str, int] = {
        ErrorCode.PROMPT_TOO_LONG.value: 400,
        ErrorCode.QUEUE_TIMEOUT.value: 503,
        ErrorCode.GATEWAY_SHUTDOWN.value: 503,
        ErrorCode.REDIS_UNAVAILABLE.value: 503,
        ErrorCode.WORKER_TIMEOUT.value: 504,
    }
    return statuses.get(code, 502)
