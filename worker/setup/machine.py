"""What the model needs against what this machine has: parameters, memory, disk.

The memory estimate is parameters x bytes per parameter (bf16 2, 8-bit 1.2, 4-bit 0.8, float32
4) + 20% for activations and the KV cache. The 8-/4-bit figures are MedGemma 4B's measured
footprints (docs/bench/medgemma_shape_h200.json: 1.16 and 0.74-0.80 bytes per parameter), not
the nominal 1 and 0.5: bitsandbytes leaves the 671M-parameter embedding, the norms and parts of
the vision tower in 16 bits. Parameters come from a small table for known hub repos (no download
needed) or, for a local checkpoint, from its ``config.json`` by building the model on the meta
device (exact; tied embeddings counted once).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants as hf_constants

from shared.registry import ModelEntry
from worker.setup.report import Report, human_bytes
from worker.weights.sources import GGUF_MARKER, gguf_cache_folder

#: Bytes per parameter of a quantized model, as measured for MedGemma 4B on an H200 (see the
#: module docstring): more than 1 and 0.5 because embeddings and norms stay in 16 bits.
QUANT_BYTES_PER_PARAM = {"8bit": 1.2, "4bit": 0.8}
#: Activations and the KV cache on top of the weights.
OVERHEAD = 0.20


@dataclass(frozen=True)
class RepoFacts:
    """What is known about a hub repo without asking the hub."""

    parameters: int
    download_bytes: int


#: Known hub repos: parameters (exact, tied lm_head counted once) and the size of the files
#: HUB_ALLOW_PATTERNS fetches (bf16 safetensors + tokenizer).
KNOWN_REPOS: dict[str, RepoFacts] = {
    "google/medgemma-4b-it": RepoFacts(parameters=4_300_079_472, download_bytes=8_640_000_000),
}


def hub_cache(cache_dir: Path | None) -> Path:
    """The Hugging Face cache in use: ``cache_dir``, else HF_HUB_CACHE / HF_HOME's."""
    return cache_dir.expanduser() if cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)


def existing_parent(path: Path) -> Path:
    """``path``, or its nearest folder that exists (the disk it will be written on)."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


@dataclass
class LocalWeights:
    """Where an entry's weights are on this machine, if they are."""

    folder: Path | None = None  # a model folder with config.json
    gguf: Path | None = None  # a .gguf file (converted at first load)
    present: bool = False


def count_parameters(config: Any) -> int:
    """Exact parameter count of the model ``config`` describes, built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto: Any = (
        AutoModelForImageTextToText
        if getattr(config, "vision_config", None) is not None
        else AutoModelForCausalLM
    )
    with init_empty_weights():
        model = auto.from_config(config)
    model.tie_weights()  # init_empty_weights unties lm_head from the embeddings
    return int(sum(p.numel() for p in model.parameters()))


def parameters_of_folder(folder: Path) -> int:
    from transformers import AutoConfig

    return count_parameters(AutoConfig.from_pretrained(str(folder)))


def parameters_of_gguf(gguf: Path) -> int:
    from transformers import AutoConfig

    return count_parameters(AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name))


def bytes_per_parameter(quantization: str, dtype_bytes: int) -> float:
    return QUANT_BYTES_PER_PARAM.get(quantization, float(dtype_bytes))


def memory_need(parameters: int, bytes_per_param: float) -> tuple[float, float]:
    """``(weights, weights + OVERHEAD)`` in bytes."""
    weights = parameters * bytes_per_param
    return weights, weights * (1 + OVERHEAD)


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(report: Report, dev: str, weights: float, need: float, quantization: str) -> bool:
    """Report free GPU memory (or RAM on CPU) against the estimate; False when it cannot fit."""
    import torch

    if dev.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(dev))
        what, where = "gpu memory", f"{dev}"
        smaller = (
            "set serving.quantization to '4bit'" if quantization != "4bit" else "use a bigger GPU"
        )
        advice = f"free the GPU of other processes, or {smaller}"
        have = f"{human_bytes(free)} free of {human_bytes(total)} on {where}"
    else:
        ram = _available_ram()
        if ram is None:
            report.warn("ram", "cannot read the available memory of this machine: not checked")
            return True
        free = ram
        what = "ram"
        have = f"{human_bytes(free)} available"
        advice = "close other programs, or use a machine with more memory or a GPU"
    if free >= need:
        report.ok(what, f"{have}, needs about {human_bytes(need)}")
        return True
    if free >= weights:
        report.warn(
            what,
            f"{have}: enough for the weights ({human_bytes(weights)}) but little is left for "
            f"activations and the KV cache (about {human_bytes(need)} in all): {advice}",
        )
        return True
    report.fail(what, f"{have}, needs about {human_bytes(need)}: {advice}")
    return False


def check_disk(
    report: Report,
    entry: ModelEntry,
    weights: LocalWeights,
    params: int | None,
    cache_dir: Path | None,
) -> None:
    s = entry.serving
    if s.repo_id is not None:
        cache = hub_cache(cache_dir)
        free = shutil.disk_usage(existing_parent(cache)).free
        if weights.present:
            report.ok("disk", f"weights already cached; {human_bytes(free)} free at {cache}")
            return
        facts = KNOWN_REPOS.get(s.repo_id)
        size = facts.download_bytes if facts else (params * 2 if params else None)
        if size is None:
            report.warn("disk", f"{human_bytes(free)} free at {cache}; download size unknown")
        elif free >= size * 1.05:
            report.ok("disk", f"{human_bytes(free)} free at {cache}, download ~{human_bytes(size)}")
        else:
            report.fail(
                "disk",
                f"{human_bytes(free)} free at {cache}, the download needs ~{human_bytes(size)}: "
                "free space, or put the cache on a bigger disk (HF_HOME)",
            )
        return
    if weights.gguf is not None:
        folder = gguf_cache_folder(weights.gguf, cache_dir)
        if (folder / GGUF_MARKER).is_file():
            report.ok("disk", f"the GGUF file is already converted: {folder}")
            return
        free = shutil.disk_usage(existing_parent(folder)).free
        need = params * 4 if params else None
        if need is None or free >= need * 1.05:
            report.ok(
                "disk",
                f"{human_bytes(free)} free at {folder.parent} for the one-time GGUF conversion"
                + (f" (~{human_bytes(need)})" if need else ""),
            )
        else:
            report.fail(
                "disk",
                f"{human_bytes(free)} free at {folder.parent}, the one-time GGUF conversion "
                f"writes ~{human_bytes(need)}: free space",
            )
