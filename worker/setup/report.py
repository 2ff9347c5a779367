"""What a ``medgemma setup`` step reports: :class:`Check` lines through a :class:`Report`.

Every step reports ``OK`` / ``WARN`` / ``FAIL`` lines (what, detail) as soon as it knows them;
the caller (:mod:`worker.setup.cli`) decides how to show them. The Hugging Face token is never
part of a line: :class:`Report` blanks it out of any detail as a last guard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["OK", "WARN", "FAIL"]


@dataclass(frozen=True)
class Check:
    """One result line: ``OK|WARN|FAIL  <what>  <detail>``."""

    status: Status
    what: str
    detail: str


Line = Check | str
Sink = Callable[[Line], None]


@dataclass
class Report:
    """Collects the lines of one command and hands each to ``sink`` at once.

    ``secrets`` (the token) are replaced by ``***`` in every line, whatever produced it.
    """

    sink: Sink
    secrets: list[str] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(isinstance(x, Check) and x.status == "FAIL" for x in self.lines)

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    def add(self, status: Status, what: str, detail: str) -> Check:
        check = Check(status, what, self._redact(detail))
        self.lines.append(check)
        self.sink(check)
        return check

    def ok(self, what: str, detail: str) -> Check:
        return self.add("OK", what, detail)

    def warn(self, what: str, detail: str) -> Check:
        return self.add("WARN", what, detail)

    def fail(self, what: str, detail: str) -> Check:
        return self.add("FAIL", what, detail)

    def note(self, text: str) -> None:
        text = self._redact(text)
        self.lines.append(text)
        self.sink(text)


class SetupError(Exception):
    """A problem that stops a command before any check runs (bad token file ...)."""


# --- formatting ------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """``8.6 GB`` (decimal units, as disk vendors and the hub write sizes)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
