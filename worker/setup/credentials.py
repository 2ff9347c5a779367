"""The Hugging Face token a ``medgemma setup`` step uses, and where it came from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import get_token

from worker.setup.report import SetupError
from worker.weights.hub import TOKEN_ENV_NAMES, hf_token_from_env


@dataclass(frozen=True)
class Token:
    """The token and where it came from (never the value itself in messages)."""

    value: str | None
    origin: str


def resolve_token(token_file: Path | None) -> Token:
    """The token from ``token_file``, else HUGGINGFACE_TOKEN / HF_TOKEN, else ``hf auth login``'s.

    Raises :class:`SetupError` when ``token_file`` cannot be read or is empty.
    """
    if token_file is not None:
        try:
            value = token_file.expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SetupError(
                f"cannot read the token file {token_file} ({exc.strerror or exc}): give a "
                "readable file that holds only the token"
            ) from None
        if not value:
            raise SetupError(f"the token file {token_file} is empty: put the read token in it")
        return Token(value, f"the file {token_file}")
    from_env = hf_token_from_env()
    if from_env is not None:
        name = next(n for n in TOKEN_ENV_NAMES if os.environ.get(n, "").strip() == from_env)
        return Token(from_env, name)
    saved = get_token()
    if saved:
        return Token(saved, "the token saved by `hf auth login`")
    return Token(None, "")
