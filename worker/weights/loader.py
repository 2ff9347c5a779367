"""Load a registry model into memory, once per worker process.

:func:`load_model` takes a :class:`~shared.registry.ModelEntry` and returns a
:class:`LoadedModel`: the model in eval mode, its tokenizer, its processor when the checkpoint is
multimodal (MedGemma's ``Gemma3Processor``), and what was really applied (device, quantization,
dtype, seconds). The weights are found (or fetched, or converted) as a local folder by
:mod:`worker.weights.sources`.

Quantization (:mod:`worker.weights.quantization`): on CUDA the registry's ``8bit`` / ``4bit`` is
applied as it says (8-bit: torchao int8 weight-only unless ``quantization_backend`` names
bitsandbytes; 4-bit: bitsandbytes NF4). On a CPU it is applied only when
``cpu_quantization="registry"``; the default ``"none"`` loads full precision, which measured as
fast or faster there (``bench/quant_cpu.py``, docs/BENCHMARKS.md). ``dtype: "auto"`` is bfloat16
on a GPU and on a CPU with native bfloat16, float32 elsewhere.

Every failure a person can fix is a :class:`~worker.weights.errors.ModelLoadError` with a stable
``code`` and a message saying what to do. Hub errors are mapped by exception type
(:mod:`worker.weights.hub_errors`). The token is never logged.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

from shared.registry import ModelEntry, Registry
from worker.weights.errors import ModelLoadError, short
from worker.weights.quantization import (
    FULL_PRECISION,
    Quantization,
    QuantizationUnavailable,
    Quantizer,
    QuantPlan,
    check_available,
    native_bf16_cpu,
    quantization_config,
    quiet_imports,
)
from worker.weights.sources import weights_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to generate, and what was really applied to load it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    processor: ProcessorMixin | None
    device: str
    quantization: Quantization
    dtype: str
    load_seconds: float
    quantizer: Quantizer | None = None

    @property
    def quantization_label(self) -> str:
        """What the fleet view shows: ``none``, ``8bit-torchao``, ``4bit-bitsandbytes`` ..."""
        return QuantPlan(self.quantization, self.quantizer).label


def resolve_device(requested: str) -> str:
    """``auto`` -> ``cuda:0`` when CUDA is available, else ``cpu``; check ``cuda``/``cuda:N``."""
    req = requested.strip().lower()
    if req == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if req == "cpu":
        return "cpu"
    if req == "cuda" or req.startswith("cuda:"):
        if not torch.cuda.is_available():
            build = (
                f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
            )
            raise ModelLoadError(
                "device_unavailable",
                f"device {requested!r} was requested but CUDA is not available here (torch "
                f"{torch.__version__} is {build} and sees no GPU): use device 'cpu' or 'auto', or "
                "run the worker on a machine with an NVIDIA GPU, its driver and a CUDA build of "
                "torch",
            )
        index_text = req.partition(":")[2] or "0"
        count = torch.cuda.device_count()
        if not index_text.isdigit() or int(index_text) >= count:
            raise ModelLoadError(
                "device_unavailable",
                f"device {requested!r} does not exist: this machine has {count} CUDA device(s), "
                f"cuda:0 to cuda:{count - 1}",
            )
        return f"cuda:{int(index_text)}"
    raise ModelLoadError(
        "device_unavailable",
        f"unknown device {requested!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'",
    )


def load_model(
    entry: ModelEntry,
    registry: Registry,
    *,
    device: str = "auto",
    cpu_quantization: Literal["none", "registry"] = "none",
    hf_token: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load ``entry``'s weights on ``device`` (see the module docstring).

    ``hf_token`` defaults to :func:`~worker.weights.hub.hf_token_from_env`. ``cache_dir`` is
    the hub cache for a ``repo_id`` and holds ``gguf/`` conversions (default
    ``~/.cache/medgemma-serve/gguf``).
    Raises :class:`ModelLoadError`.
    """
    started = time.perf_counter()
    serving = entry.serving
    dev = resolve_device(device)
    quantization: Quantization = serving.quantization
    if dev == "cpu" and cpu_quantization == "none" and quantization != "none":
        logger.info(
            "model %s: registry asks for %s, but on CPU it is loaded in full precision "
            "(cpu_quantization='none')",
            entry.model_name,
            quantization,
        )
        quantization = "none"
    dtype = torch_dtype(serving.dtype, dev)
    plan = QuantPlan(quantization, serving.quantizer) if quantization != "none" else FULL_PRECISION
    try:
        check_available(entry.model_name, plan)
    except QuantizationUnavailable as exc:
        raise ModelLoadError("quantization_unavailable", str(exc)) from exc

    folder = weights_folder(entry, registry, hf_token=hf_token, cache_dir=cache_dir)
    with quiet_imports():
        model, tokenizer, processor = _load_folder(
            folder, name=entry.model_name, device=dev, plan=plan, dtype=dtype
        )
    seconds = time.perf_counter() - started
    dtype_name = str(dtype).removeprefix("torch.")
    logger.info(
        "loaded model %s (%s) on %s: quantization=%s dtype=%s multimodal=%s in %.1f s",
        entry.model_name,
        type(model).__name__,
        dev,
        plan.label,
        dtype_name,
        processor is not None,
        seconds,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        processor=processor,
        device=dev,
        quantization=quantization,
        quantizer=plan.quantizer,
        dtype=dtype_name,
        load_seconds=seconds,
    )


# --- loading a folder ------------------------------------------------------------------------


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of ``serving.dtype`` on ``device`` (``auto``: see the module docstring)."""
    if name == "auto":
        native = device.startswith("cuda") or native_bf16_cpu()
        return torch.bfloat16 if native else torch.float32
    dtype = getattr(torch, name)
    assert isinstance(dtype, torch.dtype)
    return dtype


def _load_folder(
    folder: Path,
    *,
    name: str,
    device: str,
    plan: QuantPlan,
    dtype: torch.dtype,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin | None]:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    def guarded(step: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except ModelLoadError:
            raise
        except Exception as exc:
            raise _load_error(exc, name, folder, step, device, plan.quantization) from exc

    config = guarded("config", lambda: AutoConfig.from_pretrained(str(folder)))
    multimodal = getattr(config, "vision_config", None) is not None
    processor: ProcessorMixin | None = None
    if multimodal:
        auto_processor: Any = AutoProcessor  # from_pretrained is untyped
        processor = guarded("processor", lambda: auto_processor.from_pretrained(str(folder)))
        tokenizer: PreTrainedTokenizerBase = processor.tokenizer
        model_cls: Any = AutoModelForImageTextToText
    else:
        tokenizer = guarded("tokenizer", lambda: AutoTokenizer.from_pretrained(str(folder)))
        model_cls = AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    quant_config = quantization_config(plan)
    if quant_config is not None:
        kwargs["quantization_config"] = quant_config
        kwargs["device_map"] = {"": device}
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    model: Any = guarded("weights", lambda: model_cls.from_pretrained(str(folder), **kwargs))
    model.eval()
    return model, tokenizer, processor


def _load_error(
    exc: Exception,
    name: str,
    folder: Path,
    step: str,
    device: str,
    quantization: Quantization,
) -> ModelLoadError:
    """Map a failure while reading a local model folder, by type."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        gc.collect()
        torch.cuda.empty_cache()
        smaller = (
            "set serving.quantization to '4bit'"
            if quantization != "4bit"
            else "the model does not fit even in 4-bit"
        )
        return ModelLoadError(
            "out_of_memory",
            f"not enough GPU memory on {device} to load {name} with quantization "
            f"{quantization}: {smaller}, free the GPU of other processes, or use a GPU with more "
            "memory",
        )
    if isinstance(exc, MemoryError):
        return ModelLoadError(
            "out_of_memory",
            f"not enough RAM to load {name} on {device} with quantization {quantization}: free "
            "memory, or use a machine with more RAM",
        )
    if isinstance(exc, ImportError) and quantization != "none":
        return ModelLoadError(
            "quantization_unavailable",
            f"{quantization} quantization of {name} failed to set up ({short(exc)}): install a "
            "bitsandbytes build for this torch/CUDA, or set serving.quantization to 'none'",
        )
    if isinstance(exc, FileNotFoundError):
        return ModelLoadError(
            "weights_not_found",
            f"a file of {name} is missing in {folder} while loading its {step} ({short(exc)}): "
            "download or copy the complete model again",
        )
    return ModelLoadError(
        "bad_checkpoint",
        f"cannot load the {step} of {name} from {folder} ({type(exc).__name__}: {short(exc)}): "
        "check that the folder holds a complete checkpoint that this transformers version "
        "supports",
    )
