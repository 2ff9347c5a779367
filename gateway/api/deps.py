"""FastAPI dependencies as ``Annotated`` aliases.

They are ``async def`` although they never await: FastAPI runs a plain ``def`` dependency in
its thread pool, a thread hop per dependency per request, for work that takes microseconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gateway.api.auditing import audit_info
from gateway.core.errors import APIError
from gateway.services.apikeys import END_USER_PATTERN, Principal
from gateway.services.audit import AuditInfo
from gateway.services.ratelimit import Slot
from gateway.services.state import AppState
from shared.errors import ErrorCode
from shared.protocol import Priority
from shared.registry import ModelEntry

#: ``<model>@background`` names the model's background class (for a front end's task model).
BACKGROUND_ALIAS = "@background"

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")


async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.gateway
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_principal(
    request: Request,
    state: StateDep,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    principal = state.api_keys.authenticate(creds.credentials) if creds else None
    if principal is None:
        raise APIError(
            401,
            ErrorCode.UNAUTHORIZED,
            "Missing or invalid API key. Send 'Authorization: Bearer <your key>'.",
            headers={"WWW-Authenticate": "Bearer"},
        )
    header = state.settings.gateway_end_user_header
    named = request.headers.get(header) if principal.may_name_users else None
    if named:  # (a user or admin key's header is ignored: it names nobody else)
        principal = name_end_user(principal, named, param=header)
    note_principal(request, principal)
    return principal


def name_end_user(principal: Principal, end_user: str, *, param: str) -> Principal:
    """The end user a service key's request names; 400 if the name is not an id."""
    if not END_USER_PATTERN.fullmatch(end_user):
        raise APIError(
            400,
            ErrorCode.INVALID_REQUEST,
            f"{param} must name the end user by an id of 1 to 128 letters, digits or _.@+-.",
            param=param,
        )
    return principal.on_behalf_of(end_user)


def note_principal(request: Request, principal: Principal) -> None:
    audit_info(request.state).who(principal.user_id, principal.role, principal.service)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_audit(request: Request) -> AuditInfo:
    return audit_info(request.state)


AuditDep = Annotated[AuditInfo, Depends(get_audit)]


def admission(
    state: AppState, principal: Principal, *, stream: bool
) -> contextlib.AbstractAsyncContextManager[Slot]:
    """``async with admission(...) as slot``: count one chat request and, for a stream, hold a
    slot for the block; a request that is refused inside the block gives it back. Hand it to
    the stream that outlives the handler with ``slot.hand_over()``.

    Counted in Redis, so the limits hold across gateway processes. Over a limit: 429 with a
    Retry-After computed from the window."""
    # One round trip for both limits; RateLimited becomes a 429 (gateway/core/errors.py).
    return state.limiter.admitted(principal.user_id, stream=stream)


def visible_model(state: AppState, principal: Principal, name: str) -> ModelEntry:
    """The registry entry, or 404 — also for admin-only models asked for by a non-admin, so
    they cannot be probed."""
    entry = state.registry.get(name)
    if entry is None or (entry.admin and not principal.is_admin):
        raise APIError(
            404,
            ErrorCode.MODEL_NOT_FOUND,
            f"Model {name!r} does not exist. GET /models lists the models you can use.",
            param="model",
        )
    return entry


def chosen_model(
    state: AppState, principal: Principal, name: str
) -> tuple[ModelEntry, Priority | None]:
    """The entry ``name`` names and the class its alias asks for (None: no alias)."""
    if name.endswith(BACKGROUND_ALIAS):
        return visible_model(state, principal, name.removesuffix(BACKGROUND_ALIAS)), "background"
    return visible_model(state, principal, name), None


def priority_for(principal: Principal, *asked: Priority | None) -> Priority:
    """The first class the request asks for (its own field first), else its key's default."""
    return next((p for p in asked if p is not None), principal.priority)


#: Waits until the client closes its connection (for answers collected before they are sent).
ClientGone = Callable[[], Awaitable[None]]


async def get_client_gone(request: Request) -> ClientGone:
    async def gone() -> None:
        # The body has been read: the next ASGI message is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return gone


ClientGoneDep = Annotated[ClientGone, Depends(get_client_gone)]
