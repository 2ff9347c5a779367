"""The processes' logging set-up (shared/logs.py) keeps encoded patient text out of the log:
transformers' continuous batching, asked to take a request while it is stopping, warns with
the request's token ids; with the project's set-up that line never reaches the log, while the
batch's other warnings still do. The real tiny Gemma 3 and transformers' real manager."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from shared.logs import CB_LOGGER, configure_logging
from tests.engines import load_tiny, tiny_entry

# Token ids no template produces, so the log cannot contain them by chance.
PROMPT_IDS = [2, 9871, 9872, 9873, 9874, 9875, 9876]


@pytest.fixture
def project_logging() -> Iterator[None]:
    """configure_logging() as a process calls it, undone afterwards for the other tests."""
    root = logging.getLogger()
    cb = logging.getLogger(CB_LOGGER)
    saved = (root.handlers[:], root.level, cb.level, cb.filters[:])
    configure_logging("INFO")
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    cb.setLevel(saved[2])
    cb.filters[:] = saved[3]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.usefixtures("project_logging")
def test_transformers_batch_never_logs_token_ids(tiny_gemma_dir: Path) -> None:
    loaded = load_tiny(tiny_entry(tiny_gemma_dir, serving={"dtype": "float32"}), tiny_gemma_dir)
    model: Any = loaded.model
    manager = model.init_continuous_batching(
        generation_config=GenerationConfig(max_new_tokens=2, eos_token_id=1, pad_token_id=0),  # type: ignore[no-untyped-call]
        continuous_batching_config=ContinuousBatchingConfig(num_blocks=4, max_batch_tokens=64),
    )
    manager.start()
    manager.stop(block=True)
    seen = _Lines()  # what the logger's handlers get (its own handler writes to stderr)
    cb = logging.getLogger(CB_LOGGER)
    cb.addHandler(seen)
    try:
        assert manager.add_request(PROMPT_IDS, request_id="r1") is None  # refused: stopping
        cb.warning("Generation thread did not exit after join timeout")
    finally:
        cb.removeHandler(seen)
    assert any("did not exit" in line for line in seen.lines)  # its warnings still pass...
    assert not any("9871" in line or "9876" in line for line in seen.lines)  # ...not the ids
