"""Assemble a model engine from a loaded model and the worker's options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.engines.batching import BatchDecoder
from worker.engines.model import ModelEngine
from worker.engines.prompt import Prompter
from worker.engines.single import SingleDecoder
from worker.engines.turns import Turns
from worker.weights.loader import LoadedModel

#: Tokens per continuous-batching step unless WORKER_BATCH_TOKENS says otherwise. On the CPU a
#: smaller step gave the same tokens/s and a shorter wait for new requests' first token.
GPU_BATCH_TOKENS = 512
CPU_BATCH_TOKENS = 128


def default_batch_tokens(device: str) -> int:
    return GPU_BATCH_TOKENS if device.startswith("cuda") else CPU_BATCH_TOKENS


@dataclass(frozen=True)
class EngineOptions:
    """How a worker decodes (from its settings; see worker/settings.py)."""

    concurrency: int = 1
    batching: Literal["auto", "always", "off"] = "auto"
    batch_tokens: int | None = None  # None: GPU_BATCH_TOKENS or CPU_BATCH_TOKENS
    compile: bool = True
    cache: Literal["auto", "static", "dynamic"] = "auto"
    cuda_graphs: bool = True


def build_engine(
    loaded: LoadedModel, *, context_length: int, options: EngineOptions
) -> ModelEngine:
    """The model engine for ``loaded``: the single-stream decoder, plus the batch when the
    worker runs more than one job at once and batching is not off."""
    prompter = Prompter(loaded, context_length=context_length)
    batching = options.batching != "off" and options.concurrency > 1
    turns = None
    if batching:  # two decoders on one model: their forward passes take turns
        turns = Turns()
        turns.guard(loaded.model)
    single = SingleDecoder(
        loaded,
        prompter,
        compile=options.compile,
        context_length=context_length,
        cache=options.cache,
        turns=turns,
    )
    batch = None
    if batching:
        batch = BatchDecoder(
            loaded,
            prompter,
            concurrency=options.concurrency,
            max_batch_tokens=options.batch_tokens or default_batch_tokens(loaded.device),
            context_length=context_length,
            cuda_graphs=options.cuda_graphs,
        )
    return ModelEngine(prompter, single, batch, always_batch=options.batching == "always")
