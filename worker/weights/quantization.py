"""Quantizing a model as it loads: which library, which config, and the checks before loading.

``serving.quantization`` says how many bits; ``serving.quantization_backend`` (or its default)
says which library:

* **8bit → torchao int8 weight-only** by default (``TorchAoConfig(Int8WeightOnlyConfig())``):
  per-channel int8 weights, bfloat16 activations. It can be compiled, and compiled the int8
  matmul reads half the bytes of bfloat16; eager it dequantizes every weight on every call, so
  it is fast only on the compiled single-stream path. Measured on the CPU in
  docs/BENCHMARKS.md.
* **8bit with ``quantization_backend: "bitsandbytes"``** → LLM.int8 (the seed's library): not
  compileable, and with its default outlier threshold it syncs GPU→CPU in every linear layer
  (bitsandbytes' own H100 table gives int8 about 0.3x bfloat16 at batch 1).
* **4bit → bitsandbytes NF4**, bfloat16 compute, double quantization (not compileable).

A missing or broken library is a :class:`QuantizationUnavailable` naming what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

Quantization = Literal["8bit", "4bit", "none"]
Quantizer = Literal["torchao", "bitsandbytes"]

_BNB_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast from %s to float16 during quantization"


class QuantizationUnavailable(RuntimeError):
    """The library the registry asks for is missing or does not import here."""


@dataclass(frozen=True)
class QuantPlan:
    """How a model is quantized: bits and library (None: full precision)."""

    quantization: Quantization
    quantizer: Quantizer | None

    @property
    def label(self) -> str:
        """``none``, ``8bit-torchao``, ``8bit-bitsandbytes`` or ``4bit-bitsandbytes``."""
        return "none" if self.quantizer is None else f"{self.quantization}-{self.quantizer}"


FULL_PRECISION = QuantPlan("none", None)


def check_available(model_name: str, plan: QuantPlan) -> None:
    """Raise :class:`QuantizationUnavailable` if ``plan``'s library cannot be used here."""
    if plan.quantizer is None:
        return
    package = plan.quantizer
    advice = (
        f"install it with `pip install {package}` (the worker extra has it), or set "
        f"serving.quantization to 'none' for {model_name}"
    )
    if importlib.util.find_spec(package) is None:
        raise QuantizationUnavailable(
            f"{plan.quantization} quantization needs {package}, which is not installed: {advice}"
        )
    try:
        _import_quietly(package)
    except Exception as exc:
        raise QuantizationUnavailable(
            f"{plan.quantization} quantization needs {package}, which fails to import "
            f"({type(exc).__name__}): reinstall it for this torch/CUDA, or set "
            f"serving.quantization to 'none' for {model_name}"
        ) from exc


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """torchao warns about every CUDA kernel it cannot load on a CPU, and torch about enums
    torchao registers, once each when torchao is imported (by transformers too, whenever it is
    installed): keep those out of the worker log."""
    quiet = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


def _import_quietly(package: str) -> None:
    with quiet_imports():
        importlib.import_module(package)


def quantization_config(plan: QuantPlan) -> Any:
    """The ``quantization_config`` for ``from_pretrained``, or None."""
    if plan.quantizer is None:
        return None
    if plan.quantizer == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig

        torchao_config: Any = TorchAoConfig  # its __init__ is untyped
        return torchao_config(quant_type=Int8WeightOnlyConfig())
    from transformers import BitsAndBytesConfig

    bnb_config: Any = BitsAndBytesConfig  # its __init__ is untyped
    if plan.quantization == "8bit":
        _quiet_bnb_cast_warning()
        return bnb_config(load_in_8bit=True)
    return bnb_config(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )


class _OnceFilter(logging.Filter):
    """Let one log template through once per process (bitsandbytes logs one at every step)."""

    def __init__(self, template: str) -> None:
        super().__init__()
        self.template = template
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.template:
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _quiet_bnb_cast_warning() -> None:
    """8-bit on a float32 model logs "inputs will be cast ... to float16" at every forward."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in bnb_logger.filters):
        bnb_logger.addFilter(_OnceFilter(_BNB_CAST_MESSAGE))


def native_bf16_cpu() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX): there bfloat16
    halves the bytes read per decoding step; elsewhere it is emulated and slower than float32."""
    cpu: Any = torch.cpu
    for check in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        probe = getattr(cpu, check, None)
        if probe is not None and bool(probe()):
            return True
    return False
