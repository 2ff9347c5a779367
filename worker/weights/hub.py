"""The Hugging Face hub: the token, offline mode, and fetching a repo's snapshot.

The config, tokenizer and ``*.safetensors`` files of a ``revision`` are fetched with
:func:`huggingface_hub.snapshot_download`, honouring the token, ``cache_dir`` and
``HF_HUB_OFFLINE`` (read at call time). A failure becomes a
:class:`~worker.weights.errors.ModelLoadError` from the table of
:mod:`worker.weights.hub_errors`. The token is never logged.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download

from worker.weights.hub_errors import HubCall, HubTimeout, load_error

logger = logging.getLogger(__name__)

#: Files fetched from a hub repo: config, tokenizer, chat template and safetensors weights (no
#: ``*.bin``/``*.gguf``/``original/`` duplicates of the same weights).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]
#: Where the token is read from, in this order.
TOKEN_ENV_NAMES = ("HUGGINGFACE_TOKEN", "HF_TOKEN")
_TRUE = {"1", "ON", "YES", "TRUE"}

_T = TypeVar("_T")


def hf_token_from_env() -> str | None:
    """The Hugging Face token from ``HUGGINGFACE_TOKEN`` or ``HF_TOKEN``, or None."""
    for name in TOKEN_ENV_NAMES:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them at import)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value is not None and value.strip():
            return value.strip().upper() in _TRUE
    return bool(hf_constants.HF_HUB_OFFLINE)


def download_snapshot(
    repo_id: str, revision: str | None, token: str | None, cache_dir: Path | None
) -> Path:
    """The local snapshot of ``repo_id`` at ``revision``, downloaded if needed. Raises
    :class:`~worker.weights.errors.ModelLoadError`."""
    offline = hub_offline()
    logger.info(
        "fetching %s (revision %s) from the Hugging Face hub%s",
        repo_id,
        revision or "main",
        " cache only (HF_HUB_OFFLINE)" if offline else "",
    )
    try:
        folder = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            token=token,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
            allow_patterns=HUB_ALLOW_PATTERNS,
            local_files_only=offline,
        )
    except Exception as exc:
        call = HubCall(
            repo_id,
            revision,
            token_given=token is not None,
            offline=offline,
            cache_dir=cache_dir,
        )
        raise load_error(exc, call) from exc
    return Path(folder)


def with_deadline(fn: Callable[[], _T], seconds: float) -> _T:
    """Run ``fn`` in a daemon thread; raise :class:`HubTimeout` if it has not returned in time.

    ``huggingface_hub``'s HTTP client has no timeout for ``whoami``/``auth_check``: behind a
    firewall that drops packets they would hang."""
    result: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=run, name="hub-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise HubTimeout(seconds)
    if error:
        raise error[0]
    return result[0]
