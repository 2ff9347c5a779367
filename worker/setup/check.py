"""``medgemma setup check``: can this machine run the model as a worker?

Versions, CUDA and the GPU, quantization libraries, the weights (in the hub cache, a folder, a
GGUF file), memory and disk against the model's need (:mod:`worker.setup.machine`), the token
when a download is still to come, then the smoke test (:mod:`worker.setup.smoke`).
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

from huggingface_hub import get_token, snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

from shared.registry import ModelEntry, Registry
from worker.setup.download import entry_source, validate_checkpoint
from worker.setup.machine import (
    KNOWN_REPOS,
    OVERHEAD,
    LocalWeights,
    bytes_per_parameter,
    check_disk,
    check_memory,
    hub_cache,
    memory_need,
    parameters_of_folder,
    parameters_of_gguf,
)
from worker.setup.report import Report, SetupError, human_bytes
from worker.setup.smoke import run_smoke
from worker.weights.errors import ModelLoadError, short
from worker.weights.hub import HUB_ALLOW_PATTERNS, hf_token_from_env
from worker.weights.loader import resolve_device, torch_dtype
from worker.weights.sources import package_file


def _version_of(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def run_check(
    report: Report,
    entry: ModelEntry,
    registry: Registry,
    *,
    device: str = "auto",
    smoke: bool | None = None,
    cache_dir: Path | None = None,
    cpu_quantization: Literal["none", "registry"] = "none",
    smoke_tokens: int = 32,
) -> None:
    """``setup check``: can this machine run ``entry``? ``smoke=None``: smoke test when possible."""
    import torch

    s = entry.serving
    report.ok(
        "registry", f"{entry.model_name} in {registry.source}: {entry_source(entry, registry)}"
    )
    report.ok("python", f"{platform.python_version()} ({sys.executable})")
    cuda_build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    report.ok("torch", f"{torch.__version__} ({cuda_build})")
    for dist, what in (("transformers", "transformers"), ("huggingface-hub", "huggingface_hub")):
        v = _version_of(dist)
        if v is None:
            report.fail(what, "not installed: `pip install -e '.[worker]'`")
        else:
            report.ok(what, v)
    if s.engine == "loadtest":
        report.ok("model", f"{entry.model_name} uses the load-test engine: no weights, no GPU")
        return

    # -- device --
    try:
        dev = resolve_device(device)
    except ModelLoadError as exc:
        prefix = "no CUDA GPU: " if "CUDA is not available" in exc.message else ""
        report.fail("device", prefix + exc.message)
        dev = None
    if dev is not None and dev.startswith("cuda"):
        idx = torch.device(dev).index or 0
        props = torch.cuda.get_device_properties(idx)
        report.ok(
            "gpu",
            f"{props.name} ({dev}, compute {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB; {torch.cuda.device_count()} GPU(s) visible)",
        )
        wants_bf16 = s.dtype in ("bfloat16", "auto") or s.quantization == "4bit"
        if wants_bf16 and not torch.cuda.is_bf16_supported():
            report.warn(
                "bfloat16",
                f"{props.name} has no bfloat16 support: set serving.dtype to 'float16'",
            )
    elif dev == "cpu":
        if device == "auto":
            report.warn(
                "device",
                "no CUDA GPU seen (torch "
                f"{torch.__version__}, {cuda_build}): the worker will run on the CPU, many "
                "times slower than on a GPU",
            )
        else:
            report.ok("device", "cpu (as asked)")

    # -- quantization --
    on_cpu = dev is None or dev == "cpu"
    quantization = s.quantization
    if on_cpu and cpu_quantization == "none":
        quantization = "none"
    bnb = _version_of("bitsandbytes")
    if quantization != "none":
        if bnb is None or importlib.util.find_spec("bitsandbytes") is None:
            report.fail(
                "bitsandbytes",
                f"{quantization} quantization needs bitsandbytes, which is not installed: "
                f"`pip install bitsandbytes`, or set serving.quantization to 'none'",
            )
        else:
            try:
                importlib.import_module("bitsandbytes")
                report.ok("bitsandbytes", f"{bnb} (needed for {quantization})")
            except Exception as exc:
                report.fail(
                    "bitsandbytes",
                    f"{bnb} is installed but fails to import ({type(exc).__name__}: "
                    f"{short(exc, 150)}): reinstall it for this torch/CUDA",
                )
    else:
        why = (
            f"models.json asks for {s.quantization}, but on CPU the worker loads full "
            "precision (WORKER_CPU_QUANTIZATION=none)"
            if s.quantization != "none"
            else "quantization none"
        )
        report.ok("bitsandbytes", f"not needed: {why}" + (f"; {bnb} installed" if bnb else ""))

    # -- weights --
    weights = _find_weights(report, entry, registry, cache_dir)

    # -- parameters and memory --
    params = _parameters(report, entry, weights)
    dtype_bytes = torch_dtype(s.dtype, dev or "cpu").itemsize
    memory_ok: bool | None = None  # None: not checked
    if params is not None:
        bpp = bytes_per_parameter(quantization, dtype_bytes)
        weights_bytes, need = memory_need(params, bpp)
        label = (
            quantization
            if quantization != "none"
            else str(torch_dtype(s.dtype, dev or "cpu")).removeprefix("torch.")
        )
        report.ok(
            "memory estimate",
            f"{params:,} parameters x {bpp:g} bytes ({label}) = "
            f"{human_bytes(weights_bytes)} + {OVERHEAD:.0%} = {human_bytes(need)}",
        )
        if dev is not None:
            memory_ok = check_memory(report, dev, weights_bytes, need, quantization)

    # -- disk --
    check_disk(report, entry, weights, params, cache_dir)

    # -- token (only when a download is still to come) --
    if s.repo_id is not None and not weights.present:
        if hf_token_from_env() is None and not get_token():
            report.warn(
                "token",
                "HF_TOKEN is not set and the weights are not here: the worker cannot download "
                f"{s.repo_id} (see `medgemma setup token`)",
            )
        else:
            report.ok("token", "set (not checked against the hub here: `medgemma setup token`)")

    # -- smoke --
    if smoke is False:
        return
    explicit = smoke is True
    blockers = []
    if dev is None:
        blockers.append("the device is not available")
    if not weights.present:
        blockers.append("the weights are not on this machine")
    if memory_ok is False:
        blockers.append("there is not enough memory")
    if blockers:
        msg = f"skipped: {' and '.join(blockers)}"
        if explicit:
            report.fail("smoke", msg)
        else:
            report.warn("smoke", msg)
        return
    assert dev is not None
    run_smoke(report, entry, registry, dev, cpu_quantization, cache_dir, smoke_tokens)


def _find_weights(
    report: Report, entry: ModelEntry, registry: Registry, cache_dir: Path | None
) -> LocalWeights:
    s = entry.serving
    if s.repo_id is not None:
        cache = hub_cache(cache_dir)
        try:
            folder = snapshot_download(
                repo_id=s.repo_id,
                revision=s.revision,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                allow_patterns=HUB_ALLOW_PATTERNS,
                local_files_only=True,
            )
        except IncompleteSnapshotError:
            report.warn(
                "weights",
                f"the cached copy of {s.repo_id} in {cache} is incomplete (an interrupted "
                "download?): complete it with "
                f"`medgemma setup download --model {entry.model_name}`",
            )
            return LocalWeights()
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            detail = f"{s.repo_id} (revision {s.revision or 'main'}) is not in the cache at {cache}"
            if not isinstance(exc, LocalEntryNotFoundError):
                detail += f" ({type(exc).__name__}: {short(exc, 120)})"
            report.warn(
                "weights",
                f"{detail}: the worker downloads it at its first start (needs network and "
                f"HF_TOKEN), or run `medgemma setup download --model {entry.model_name}` now",
            )
            return LocalWeights()
        report.ok("weights", f"in the cache: {folder}")
        return LocalWeights(folder=Path(folder), present=True)
    if s.path is not None:
        where = registry.resolve_path(s.path)
        if where.is_file() and where.suffix.lower() == ".gguf":
            report.ok("weights", f"GGUF file {where} ({human_bytes(where.stat().st_size)})")
            return LocalWeights(gguf=where, present=True)
        if where.is_dir():
            try:
                _, summary = validate_checkpoint(where)
            except SetupError as exc:
                report.fail("weights", str(exc))
                return LocalWeights(folder=where if (where / "config.json").is_file() else None)
            report.ok("weights", f"{where}: {summary}")
            return LocalWeights(folder=where, present=True)
        report.fail(
            "weights",
            f"the model path {where} does not exist (serving.path; relative to "
            f"{registry.source}): copy the model there, e.g. with `medgemma setup download "
            f"--model {entry.model_name} --from-dir DIR`, or fix the path",
        )
        return LocalWeights()
    assert s.package_file is not None
    try:
        found = package_file(s.package_file.package, s.package_file.file)
    except ModelLoadError as exc:
        report.fail("weights", exc.message)
        return LocalWeights()
    report.ok("weights", f"{found} ({human_bytes(found.stat().st_size)})")
    return LocalWeights(gguf=found, present=True)


def _parameters(report: Report, entry: ModelEntry, weights: LocalWeights) -> int | None:
    s = entry.serving
    facts = KNOWN_REPOS.get(s.repo_id or "")
    if facts is not None:
        return facts.parameters
    try:
        if weights.folder is not None:
            return parameters_of_folder(weights.folder)
        if weights.gguf is not None:
            return parameters_of_gguf(weights.gguf)
    except Exception as exc:
        report.warn(
            "memory estimate",
            f"cannot count the parameters from the config ({type(exc).__name__}: "
            f"{short(exc, 150)}): memory not checked",
        )
        return None
    report.warn(
        "memory estimate",
        "unknown model size (not a known repo and its config is not on this machine): memory "
        "not checked",
    )
    return None
