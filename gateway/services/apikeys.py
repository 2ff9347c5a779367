"""API keys with identities and roles.

Keys come from ``GATEWAY_API_KEYS`` ("key:user_id:role[:priority],...") and/or a file, and are
held only
as SHA-256 digests mapped to a :class:`Principal`. Roles: ``user``, ``admin``, and ``service``:
a front end (Open WebUI, LibreChat, a reverse proxy) that calls with one key for all of its
users and names the user of each request (``GATEWAY_END_USER_HEADER``, or the OpenAI ``user``
field). Such a request acts as ``<service>/<end user>``: its own conversation space, rate
limits and audit line, scoped to the service, so no service can reach a personal key's data
by naming its user id. A ``user`` or ``admin`` key never names anyone else (the header is
ignored). A service request that names nobody acts as the service itself.

The optional fourth field is the key's default priority, ``interactive`` or ``background``:
a key for a front end's background tasks (LibreChat's titles, say) sends background work
without the front end knowing of priorities (a request's own ``priority`` still wins).

In development mode with no keys the demo key ``demo-key`` (user ``demo``) is used; production
refuses to start without keys or with the demo key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from shared.protocol import Priority

DEMO_KEY = "demo-key"
DEMO_USER = "demo"

Role = Literal["user", "admin", "service"]
ROLES: tuple[Role, ...] = ("user", "admin", "service")
#: An end user's id as a service names it: Open WebUI's ids are UUIDs; emails fit too.
#: Matched whole (``fullmatch``: ``$`` would let a trailing newline through into keys and logs).
END_USER_PATTERN = re.compile(r"[A-Za-z0-9_.@+-]{1,128}")


class KeyConfigError(ValueError):
    """The key configuration is unusable; the message says how to fix it."""


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: Role
    service: str | None = None  # the service key that named this end user
    priority: Priority = "interactive"  # the key's default class of work

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def may_name_users(self) -> bool:
        """A service key's own principal: it may name the end user of a request."""
        return self.role == "service" and self.service is None

    def on_behalf_of(self, end_user: str) -> Principal:
        """The end user a service key named (checked against :data:`END_USER_PATTERN`)."""
        assert self.may_name_users
        return Principal(
            user_id=f"{self.user_id}/{end_user}",
            role="user",
            service=self.user_id,
            priority=self.priority,
        )


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _parse(spec: str, where: str) -> tuple[str, Principal]:
    parts = spec.strip().split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise KeyConfigError(
            f"{where}: expected key:user_id:role[:priority], got {len(parts)} fields"
        )
    key, user, role = parts[:3]
    priority = parts[3] if len(parts) == 4 else "interactive"
    if role not in ROLES:
        raise KeyConfigError(f"{where}: role must be user, admin or service, got {role!r}")
    if priority not in get_args(Priority):
        raise KeyConfigError(
            f"{where}: priority must be interactive or background, got {priority!r}"
        )
    if "/" in user:
        raise KeyConfigError(f"{where}: a user id may not contain '/' (it scopes service users)")
    if len(key) < 8:
        raise KeyConfigError(f"{where}: key for user {user!r} is shorter than 8 characters")
    return key, Principal(user_id=user, role=role, priority=priority)  # type: ignore[arg-type]


class KeyStore:
    def __init__(self, entries: dict[bytes, Principal]) -> None:
        self._by_digest = entries

    @classmethod
    def from_config(
        cls, env_value: str | None, file: Path | None, *, development: bool
    ) -> KeyStore:
        specs: list[tuple[str, str]] = []
        if env_value:
            specs += [(s, "GATEWAY_API_KEYS") for s in env_value.split(",") if s.strip()]
        if file is not None:
            try:
                lines = file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise KeyConfigError(f"cannot read GATEWAY_API_KEYS_FILE: {exc.strerror}") from None
            specs += [
                (line, f"{file.name} line {n}")
                for n, line in enumerate(lines, 1)
                if line.strip() and not line.lstrip().startswith("#")
            ]
        entries: dict[bytes, Principal] = {}
        for spec, where in specs:
            key, principal = _parse(spec, where)
            if key == DEMO_KEY and not development:
                raise KeyConfigError(
                    "the demo key 'demo-key' is configured in production; use real keys"
                )
            entries[_digest(key)] = principal
        if not entries:
            if not development:
                raise KeyConfigError(
                    "no API keys configured: set GATEWAY_API_KEYS='key:user_id:role,...' or "
                    "GATEWAY_API_KEYS_FILE (GATEWAY_ENV=development allows the demo key)"
                )
            entries[_digest(DEMO_KEY)] = Principal(user_id=DEMO_USER, role="user")
        return cls(entries)

    def authenticate(self, key: str) -> Principal | None:
        digest = _digest(key)
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None

    @property
    def uses_demo_key(self) -> bool:
        return _digest(DEMO_KEY) in self._by_digest
