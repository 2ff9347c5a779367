"""The audit trail: one append-only JSON line per request, for the hospital's security team.

Why a separate stream and not a log call: the security team keeps, ships and reads this trail
under its own retention rules, so it must not depend on the log level, the log format or the
handlers of the ``logging`` root (``configure_logging`` replaces them). Each record says who
(user id, role, client IP) did what (action, model, conversation, job) with which outcome and
HTTP status, and how much (token counts). It never holds a prompt or an answer: the prompt is
kept only as its SHA-256 (``prompt_digest``), enough to match a record against a prompt the
team already holds, not to read it back. ``json.dumps`` escapes newlines, so a user-supplied
value cannot forge an extra line.

The file is opened in append mode (a restart, or a second process, adds to it; nothing is
rewritten) with line buffering, and created ``0o600``; an existing file's mode is left as the
operator set it. Writes are serialised by a ``threading.Lock`` and never await, so one
``AuditLog`` is safe to share between threads and coroutines. A failed write raises: whether a
request may go on without its audit record is the caller's decision.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

STDOUT_TARGETS = ("stdout", "-")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def prompt_digest(texts: Sequence[str]) -> str:
    """SHA-256 (hex) of the prompt texts joined by the ASCII record separator ``\\x1e``."""
    return hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest()


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """One request. Field order is the order of the keys in the JSON line."""

    ts: str = field(default_factory=_now)
    user_id: str
    role: str
    service: str | None = None  # the service key (e.g. Open WebUI) that named user_id
    action: str
    model: str | None = None
    conversation_id: str | None = None
    job_id: str | None = None
    outcome: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    prompt_sha256: str | None = None
    client: str | None
    status: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))


@dataclass
class AuditInfo:
    """One request's audit record while it is served, written once by the audit middleware
    (:mod:`gateway.api.auditing`) after the response. Set through its methods only: who
    asked, for which model, which job, and how it ended."""

    user_id: str = "-"
    role: str = "-"
    service: str | None = None  # the service key that named the end user, if one did
    model: str | None = None
    conversation_id: str | None = None
    job_id: str | None = None
    prompt_sha256: str | None = None
    outcome: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    started: float = field(default_factory=time.monotonic)  # arrival, for time to first token

    def who(self, user_id: str, role: str, service: str | None) -> None:
        self.user_id, self.role, self.service = user_id, role, service

    def asked(self, model: str) -> None:
        """The served model the request names: recorded even if it is refused before a job
        exists (no worker for it, a full line)."""
        self.model = model

    def job(
        self,
        job_id: str,
        *,
        model: str | None = None,
        conversation_id: str | None = None,
        prompt_sha256: str | None = None,
    ) -> None:
        self.job_id, self.model, self.conversation_id = job_id, model, conversation_id
        self.prompt_sha256 = prompt_sha256

    def ended(
        self,
        outcome: str,
        *,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
    ) -> None:
        """``ok``, ``cancelled``, ``client_left`` or ``error:<code>``."""
        self.outcome = outcome
        if prompt_tokens is not None:
            self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens


class AuditLog:
    """Appends records to a file, or to ``sys.stdout`` (looked up at each write)."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream  # None: sys.stdout, which this log does not own
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_target(cls, target: str) -> AuditLog:
        if target.strip() in STDOUT_TARGETS:
            return cls(None)
        path = Path(target).expanduser()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return cls(os.fdopen(fd, "a", buffering=1, encoding="utf-8"))

    def write(self, record: AuditRecord) -> None:
        line = record.to_json() + "\n"
        with self._lock:
            if self._closed:
                raise ValueError("the audit log is closed")
            stream = self._stream if self._stream is not None else sys.stdout
            stream.write(line)
            stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._stream is not None:
                self._stream.close()
