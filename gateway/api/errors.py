"""One error body for every failure: ``{"error": {"message", "type", "param", "code"}}``.

Routes and services raise :class:`~gateway.core.errors.APIError`; the handlers here turn it,
FastAPI's validation errors, Starlette's HTTP errors, rate limits and Redis outages into that
body, so no malformed request ever gets a bare 500 or a differently shaped answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.core.errors import APIError, ClientLeft, error_type
from gateway.services.ratelimit import RateLimited
from shared.errors import ErrorBody, ErrorCode, ErrorInfo

logger = logging.getLogger(__name__)


def error_response(
    status: int, info: ErrorInfo, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        ErrorBody(error=info).model_dump(mode="json"), status_code=status, headers=headers
    )


def _param(loc: tuple[object, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return error_response(exc.status, exc.info(), exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = _param(tuple(first.get("loc", ())))
    # pydantic's "msg" never quotes the input value; the input itself is not echoed back.
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    info = ErrorInfo(
        message=message,
        type="invalid_request_error",
        param=param,
        code=ErrorCode.INVALID_REQUEST.value,
    )
    return error_response(422, info)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.INVALID_REQUEST
    info = ErrorInfo(
        message=str(exc.detail),
        type=error_type(exc.status_code, "invalid_request_error"),
        param=None,
        code=code.value,
    )
    return error_response(exc.status_code, info, getattr(exc, "headers", None))


async def _rate_limited(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RateLimited)
    info = ErrorInfo(
        message=exc.message,
        type="rate_limit_error",
        param=None,
        code=ErrorCode.RATE_LIMITED.value,
    )
    return error_response(429, info, {"Retry-After": str(exc.retry_after_s)})


async def _client_left(_: Request, exc: Exception) -> Response:
    # Nobody reads this: the connection is closed. 499 is nginx's "client closed request".
    return Response(status_code=499)


async def _redis_down(_: Request, exc: Exception) -> JSONResponse:
    logger.warning("Redis unavailable: %s", type(exc).__name__)
    info = ErrorInfo(
        message="Redis is unreachable; the service cannot take requests now. Try again shortly.",
        type="service_unavailable",
        param=None,
        code=ErrorCode.REDIS_UNAVAILABLE.value,
    )
    return error_response(503, info, {"Retry-After": "5"})


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled %s", type(exc).__name__)
    info = ErrorInfo(
        message="Internal error; the operators have the details in the gateway log.",
        type="server_error",
        code=ErrorCode.INTERNAL.value,
    )
    return error_response(500, info)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RateLimited, _rate_limited)
    app.add_exception_handler(ClientLeft, _client_left)
    app.add_exception_handler(RedisError, _redis_down)
    app.add_exception_handler(Exception, _unexpected)
