"""Process-wide torch settings that must be in place before torch is imported.

Inductor's ``freezing`` (weights folded into the compiled graph and prepacked for oneDNN) makes
compiled CPU decoding 1.3x faster than compiling without it (docs/BENCHMARKS.md). Only the
``TORCHINDUCTOR_FREEZING`` environment variable, read when ``torch._inductor.config`` is
imported, turns it on for every thread inductor uses: ``inductor_config.freezing = True`` is a
per-thread override (the config module keeps overrides in ``ContextVar``s), and set on the
inference thread it measured *slower* than no freezing at all (16.9 vs 32 tok/s), its oneDNN
weight packing never applied. So the worker sets the variable first and imports torch after.

On a CPU the worker also asks transformers to let torch's SDPA share each key/value head among
its query heads itself (``enable_gqa``) instead of copying the keys and values per query head
(``repeat_kv``), which transformers does whenever there is an attention mask, and continuous
batching always has one. Measured here with SmolLM2 (3 key/value heads for 9 query heads) at 8
streams: 126 -> 132 tok/s in-process, the single-stream compiled path unchanged (docs/BENCHMARKS.md
§2). On CUDA, masked SDPA with GQA falls back to the math kernel, so GPUs keep the copy.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

FREEZING_VAR = "TORCHINDUCTOR_FREEZING"
GQA_VAR = "TRANSFORMERS_SDPA_FORCE_GQA"  # read by transformers at every SDPA call


def _cuda_present() -> bool:
    """Whether this host has an NVIDIA driver (without importing torch)."""
    return os.path.exists("/dev/nvidiactl")


def _on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not _cuda_present())


def prepare_cpu_torch(device: str, compile_on: bool) -> None:
    """On a CPU: SDPA with shared key/value heads, and inductor's freezing when this worker will
    compile decoding. Leaves values the operator set alone. Call before anything imports torch."""
    if not _on_cpu(device):
        return
    os.environ.setdefault(GQA_VAR, "1")
    if not compile_on or FREEZING_VAR in os.environ:
        return
    if "torch" in sys.modules:
        logger.warning("torch was imported before %s could be set: no freezing", FREEZING_VAR)
        return
    os.environ[FREEZING_VAR] = "1"


def inductor_freezing() -> bool:
    """Whether inductor freezes compiled graphs in this process (imports torch)."""
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)
