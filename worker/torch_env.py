"""Process-wide torch settings that must be in place before torch is imported.

Inductor's ``freezing`` (weights folded into the compiled graph and prepacked for oneDNN) makes
compiled CPU decoding 1.3x faster than compiling without it (docs/BENCHMARKS.md). Only the
``TORCHINDUCTOR_FREEZING`` environment variable, read when ``torch._inductor.config`` is
imported, turns it on for every thread inductor uses: ``inductor_config.freezing = True`` is a
per-thread override (the config module keeps overrides in ``ContextVar``s), and set on the
inference thread it measured *slower* than no freezing at all (16.9 vs 32 tok/s), its oneDNN
weight packing never applied. So the worker sets the variable first and imports torch after.
"""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger(__name__)

FREEZING_VAR = "TORCHINDUCTOR_FREEZING"


def _cuda_present() -> bool:
    """Whether this host has an NVIDIA driver (without importing torch)."""
    return os.path.exists("/dev/nvidiactl")


def prepare_cpu_compile(device: str, compile_on: bool) -> None:
    """Turn inductor's freezing on when this worker will compile decoding on a CPU. Leaves a
    value the operator set alone. Call before anything imports torch."""
    on_cpu = device == "cpu" or (device == "auto" and not _cuda_present())
    if not (compile_on and on_cpu) or FREEZING_VAR in os.environ:
        return
    if "torch" in sys.modules:
        logger.warning("torch was imported before %s could be set: no freezing", FREEZING_VAR)
        return
    os.environ[FREEZING_VAR] = "1"


def inductor_freezing() -> bool:
    """Whether inductor freezes compiled graphs in this process (imports torch)."""
    import torch._inductor.config as inductor_config

    return bool(inductor_config.freezing)
