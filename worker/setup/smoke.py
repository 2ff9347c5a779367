"""The smoke test of ``medgemma setup check``: load the model as a worker does and generate one
short greedy answer with the worker's engine.

The model is loaded with :func:`worker.weights.loader.load_model` with ``HF_HUB_OFFLINE=1``, so
it uses only weights already on this machine and never waits on a network; decoding is eager
(:mod:`worker.engines`): this check is about the weights and the device, not about speed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from shared.registry import ModelEntry, Registry
from worker.setup.report import Report, human_bytes
from worker.weights.errors import ModelLoadError, short
from worker.weights.loader import load_model

SMOKE_PROMPT = "In one sentence: what is hypertension?"


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the block: load only what is on disk (read live by
    :mod:`worker.weights.hub`)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def run_smoke(
    report: Report,
    entry: ModelEntry,
    registry: Registry,
    dev: str,
    cpu_quantization: Literal["none", "registry"],
    cache_dir: Path | None,
    max_new_tokens: int,
) -> None:
    import torch

    from shared.protocol import ChatMessage, SamplingParams, TextPart
    from worker.engines.factory import EngineOptions, build_engine

    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(dev))
    try:
        with _offline_hub():
            loaded = load_model(
                entry, registry, device=dev, cpu_quantization=cpu_quantization, cache_dir=cache_dir
            )
    except ModelLoadError as exc:
        report.fail("load", f"[{exc.code}] {exc.message}")
        return
    except Exception as exc:
        report.fail("load", f"loading failed ({type(exc).__name__}: {short(exc, 200)})")
        return
    report.ok(
        "load",
        f"{type(loaded.model).__name__} on {loaded.device} (quantization {loaded.quantization}, "
        f"{loaded.dtype}) in {loaded.load_seconds:.1f} s",
    )
    messages = []
    if entry.serving.default_system_message:
        messages.append(
            ChatMessage(
                role="system", content=[TextPart(text=entry.serving.default_system_message)]
            )
        )
    messages.append(ChatMessage(role="user", content=[TextPart(text=SMOKE_PROMPT)]))
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    engine = None
    try:
        # Eager decoding: this check is about the weights and the device, not about speed,
        # and compiling would take longer than the answer.
        engine = build_engine(
            loaded,
            context_length=entry.serving.context_length,
            options=EngineOptions(concurrency=1, compile=False),
        )
        # The first generation pays one-time CUDA/kernel set-up: keep it out of the rate.
        started = time.perf_counter()
        engine.generate(
            messages, SamplingParams(temperature=0.0, max_new_tokens=2), on_text=lambda _t: None
        )
        warmup = time.perf_counter() - started
        started = time.perf_counter()
        result = engine.generate(messages, sampling, on_text=lambda _t: None)
        seconds = time.perf_counter() - started
    except Exception as exc:
        report.fail("smoke", f"generation failed ({type(exc).__name__}: {short(exc, 200)})")
        return
    finally:
        peak = torch.cuda.max_memory_allocated(torch.device(dev)) if dev.startswith("cuda") else 0
        if engine is not None:
            engine.close()
        del loaded, engine
        gc.collect()
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    if result.completion_tokens == 0:
        report.fail("smoke", "the model generated no token: check the checkpoint and its config")
        return
    rate = result.completion_tokens / seconds if seconds > 0 else float("inf")
    first = f", first token {result.first_token_s:.2f} s" if result.first_token_s else ""
    answer = " ".join(result.text.split())
    answer = answer if len(answer) <= 80 else answer[:77] + "..."
    peak_text = f", peak GPU memory {human_bytes(peak)}" if peak else ""
    report.ok(
        "smoke",
        f"{result.completion_tokens} tokens in {seconds:.2f} s = {rate:.1f} tokens/s"
        f"{first} (after a {warmup:.1f} s warm-up){peak_text}; answer: {answer!r}",
    )
    if not answer:
        report.warn(
            "answer",
            f"the {result.completion_tokens} tokens decode to no text: check that the "
            "tokenizer files belong to this model",
        )
