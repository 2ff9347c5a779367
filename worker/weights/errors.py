"""The one error of loading weights: :class:`ModelLoadError`, with a stable code and a message
that says what to do."""

from __future__ import annotations

from typing import Literal

LoadErrorCode = Literal[
    "weights_not_found",
    "hub_unreachable",
    "gated_model",
    "bad_token",
    "out_of_memory",
    "quantization_unavailable",
    "bad_checkpoint",
    "device_unavailable",
]


class ModelLoadError(RuntimeError):
    """The model cannot be loaded. ``code`` is stable; the message says what to do about it.

    Codes: ``weights_not_found``, ``hub_unreachable``, ``gated_model``, ``bad_token``,
    ``out_of_memory``, ``quantization_unavailable``, ``bad_checkpoint``, ``device_unavailable``.
    """

    def __init__(self, code: LoadErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: LoadErrorCode = code
        self.message = message


def short(exc: BaseException, limit: int = 300) -> str:
    """An exception's text on one line, cut to ``limit`` characters (for a message's parens)."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
