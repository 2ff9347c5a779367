"""Writes one audit record per request, after its response (or its stream) has ended.

Each request gets one :class:`~gateway.services.audit.AuditInfo` on ``request.state``; who
asked (the key dependency), which job (the turn or the job route) and how it ended (the
stream) are set through its methods. The ASGI middleware writes the record once the app has
finished with the request, so a streamed answer is recorded with its real outcome, and a
client that left is recorded as such. Health, readiness and metrics are not audited. An
optional ``observe`` callback (the Prometheus metrics) gets each record once it is written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.services.audit import AuditInfo, AuditLog, AuditRecord

logger = logging.getLogger(__name__)

_SKIP = {"/healthz", "/readyz", "/metrics", "/", "/favicon.ico"}
_ACTIONS: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/medgemma$"), "chat.medgemma"),
    ("POST", re.compile(r"^/v1/chat/completions$"), "chat.openai"),
    ("GET", re.compile(r"^/(v1/)?models$"), "models.list"),
    ("GET", re.compile(r"^/conversations$"), "conversation.list"),
    ("GET", re.compile(r"^/conversations/[^/]+$"), "conversation.get"),
    ("DELETE", re.compile(r"^/conversations/[^/]+$"), "conversation.delete"),
    ("POST", re.compile(r"^/jobs/[^/]+/cancel$"), "job.cancel"),
    ("GET", re.compile(r"^/jobs/[^/]+/events$"), "job.resume"),
    ("GET", re.compile(r"^/admin/fleet$"), "admin.fleet"),
]


def audit_info(state: object) -> AuditInfo:
    info = getattr(state, "audit", None)
    if not isinstance(info, AuditInfo):
        info = AuditInfo()
        state.audit = info  # type: ignore[attr-defined]
    return info


def _action(method: str, path: str) -> str:
    for m, pattern, name in _ACTIONS:
        if m == method and pattern.match(path):
            return name
    return f"{method.lower()} {path[:64]}"


def _outcome(info: AuditInfo, status: int) -> str:
    if info.outcome:
        return info.outcome
    if status >= 400:
        return f"denied:{status}" if status in (401, 403, 404, 429) else f"error:{status}"
    return "ok"


class AuditMiddleware:
    def __init__(
        self, app: ASGIApp, log: AuditLog, observe: Callable[[AuditRecord], None] | None = None
    ) -> None:
        self.app = app
        self.log = log
        self.observe = observe  # e.g. Metrics.observe_request, called after each record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _SKIP:
            await self.app(scope, receive, send)
            return
        status = 0
        scope.setdefault("state", {})["audit"] = AuditInfo()  # shared with request.state

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            info = scope["state"].get("audit")
            info = info if isinstance(info, AuditInfo) else AuditInfo()
            client = scope.get("client")
            record = AuditRecord(
                user_id=info.user_id,
                role=info.role,
                service=info.service,
                action=_action(scope["method"], scope["path"]),
                model=info.model,
                conversation_id=info.conversation_id,
                job_id=info.job_id,
                outcome=_outcome(info, status or 499),
                prompt_tokens=info.prompt_tokens,
                completion_tokens=info.completion_tokens,
                prompt_sha256=info.prompt_sha256,
                client=client[0] if client else None,
                status=status or 499,  # 499: the client left before any response
            )
            try:
                self.log.write(record)
            except (OSError, ValueError) as exc:
                logger.error("audit write failed: %s", type(exc).__name__)
            if self.observe is not None:
                self.observe(record)
