"""Shared helpers for tests that run the tiny Gemma 3 in-process: load it, build the worker's
engine around it, and keep torch to one thread (the model is tiny: one thread is fastest, and
far faster on a busy machine)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.registry import ModelEntry, Registry
from worker.engines.factory import EngineOptions, build_engine
from worker.engines.model import ModelEngine
from worker.weights.loader import LoadedModel, load_model


def tiny_entry(folder: Path, **fields: Any) -> ModelEntry:
    serving = {"path": str(folder), **fields.pop("serving", {})}
    return ModelEntry.model_validate(
        {"model_name": "tiny-gemma", "model_alias": "Tiny Gemma", **fields, "serving": serving}
    )


def load_tiny(entry: ModelEntry, folder: Path) -> LoadedModel:
    registry = Registry(models=[entry], source=folder.parent / "models.json")
    return load_model(entry, registry, device="cpu")


def make_engine(loaded: LoadedModel, context_length: int = 2048, **options: Any) -> ModelEngine:
    """The worker's engine; one job at a time and eager unless ``options`` say otherwise."""
    opts = {"concurrency": 1, "compile": False, **options}
    return build_engine(loaded, context_length=context_length, options=EngineOptions(**opts))


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
