"""Benchmark a random-weight, MedGemma-4B-shaped Gemma 3 on one GPU: bf16, LLM.int8 and NF4.

Usage (on the GPU machine, from the repository root)::

    python bench/medgemma_shape_gpu.py --out artifacts/medgemma_shape_h200.json

and, to check every code path on a CPU in seconds with a tiny config::

    python bench/medgemma_shape_gpu.py --smoke --out /tmp/smoke.json

Why it is built this way:

* The real weights are gated and no hub is reachable from the GPU machine, so the model is
  ``Gemma3ForConditionalGeneration`` built from MedGemma 4B's exact config (4.30 B parameters)
  with random weights. Speed and memory depend on shapes, not on values. Random weights can emit
  ``<eos>`` at any step, so every generation forces its length with
  ``min_new_tokens == max_new_tokens``.
* bf16 is built directly on the GPU (normal init there takes seconds). The quantized variants use
  the path a worker uses: the bf16 model is saved once with ``save_pretrained`` to a local folder,
  freed, and reloaded with ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...),
  device_map="cuda:0")``; quantization happens during that load and is part of ``load_s``.
* No tokenizer is needed: prompts are random ids from the ordinary-text range (above the
  ``<pad>/<eos>/<bos>`` ids and below the image-marker ids); the image prompt is
  ``<bos> text <start_of_image> 256 x <image_soft_token> <end_of_image> text`` with
  ``token_type_ids`` marking the image tokens (what Gemma3Processor produces) and a random
  896x896 bf16 ``pixel_values``.
* Device time is scarce (15 minutes per session including the machine start), so there is a
  time budget (``--budget-s``): each configuration gets a fair share of what is left, each
  measurement is skipped once its configuration's share is spent, every configuration and every
  measurement is wrapped in ``try/except`` (errors are recorded and the run carries on), and the
  JSON file is rewritten after every configuration, so a killed run still leaves results.
* Timings: one warm-up, then the median of ``--repeats`` runs, each bracketed by
  ``torch.cuda.synchronize()``. ``prefill_*_ms`` is one forward pass with ``logits_to_keep=1``
  (what ``generate`` does first); ``ttft_*_ms`` is ``generate(max_new_tokens=1)``; decode tok/s
  is ``batch * (new_tokens - 1) / (t_generate - t_ttft)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run from anywhere (python bench/medgemma_shape_gpu.py): the repository root holds devstack.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import transformers
from transformers import (
    AutoModelForImageTextToText,
    BitsAndBytesConfig,
    Gemma3Config,
)

from devstack.tiny_gemma import medgemma_4b_config, tiny_gemma_config  # noqa: E402

GIB = 1024**3
QUANT_NAMES = ("bf16", "int8", "nf4")


# --- configs ---------------------------------------------------------------------------------


full_config = medgemma_4b_config  # MedGemma 4B's exact architecture


def smoke_config() -> Gemma3Config:
    """The tiny shape of ``devstack.tiny_gemma`` (vocab 1000, 32 px image, 4 image tokens)."""
    return tiny_gemma_config()


@dataclass(frozen=True)
class Shape:
    """The config and the ids and sizes the synthetic inputs need from it."""

    config: Gemma3Config
    bos: int
    pad: int
    eos: list[int]
    boi: int
    eoi: int
    image: int
    text_ids: tuple[int, int]  # [low, high) of ordinary text ids
    image_size: int
    mm_tokens: int

    @classmethod
    def of(cls, config: Gemma3Config) -> Shape:
        cfg: Any = config  # sub-configs are typed as "config | dict | None"
        text, vision = cfg.text_config, cfg.vision_config
        boi, eoi, img = cfg.boi_token_index, cfg.eoi_token_index, cfg.image_token_index
        eos = text.eos_token_id
        # The 4B vocab puts the image markers near the top; the tiny one right after the specials.
        low, high = (3, boi) if boi > 1000 else (max(boi, eoi, img) + 1, text.vocab_size)
        return cls(
            config=config,
            bos=text.bos_token_id,
            pad=text.pad_token_id,
            eos=list(eos) if isinstance(eos, list | tuple) else [eos],
            boi=boi,
            eoi=eoi,
            image=img,
            text_ids=(low, high),
            image_size=vision.image_size,
            mm_tokens=cfg.mm_tokens_per_image,
        )


# --- timing helpers --------------------------------------------------------------------------


class OutOfTime(Exception):
    """This configuration's share of the time budget is spent."""


@dataclass
class Clock:
    device: torch.device
    deadline: float  # time.monotonic() value

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise OutOfTime("time budget for this configuration spent")

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start

    def median_s(self, fn: Callable[[], object], repeats: int) -> dict[str, Any]:
        """One warm-up, then up to ``repeats`` timed runs (fewer if the budget runs out)."""
        self.check()
        self.timed(fn)
        runs: list[float] = []
        for _ in range(repeats):
            if runs:
                try:
                    self.check()
                except OutOfTime:
                    break
            runs.append(self.timed(fn))
        return {"median_s": statistics.median(runs), "runs_s": [round(r, 5) for r in runs]}


def _mem(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"allocated_gib": None, "reserved_gib": None, "peak_allocated_gib": None}
    return {
        "allocated_gib": torch.cuda.memory_allocated(device) / GIB,
        "reserved_gib": torch.cuda.memory_reserved(device) / GIB,
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
    }


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _CountInt8Casts(logging.Filter):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on *every* int8
    matmul of a bf16 model (34 layers x 7 linears x every step): count instead of printing."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("MatMul8bitLt: inputs will be cast"):
            self.count += 1
            return False
        return True


INT8_CASTS = _CountInt8Casts()


def _error(exc: BaseException) -> dict[str, str]:
    return {
        "error": f"{type(exc).__name__}: {exc}"[:2000],
        "traceback": "".join(traceback.format_exception(exc))[-4000:],
    }


# --- inputs ----------------------------------------------------------------------------------


def text_inputs(
    shape: Shape, batch: int, length: int, device: torch.device, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    low, high = shape.text_ids
    ids = torch.randint(low, high, (batch, length), generator=gen)
    ids[:, 0] = shape.bos
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
    }


def image_inputs(
    shape: Shape, text_len: int, device: torch.device, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """One image between boi/eoi with ``text_len`` text tokens around it, as the processor does."""
    low, high = shape.text_ids
    half = max(1, text_len // 2)
    ids = torch.cat(
        [
            torch.tensor([shape.bos]),
            torch.randint(low, high, (half,), generator=gen),
            torch.tensor([shape.boi]),
            torch.full((shape.mm_tokens,), shape.image),
            torch.tensor([shape.eoi]),
            torch.randint(low, high, (half,), generator=gen),
        ]
    ).unsqueeze(0)
    pixels = torch.randn((1, 3, shape.image_size, shape.image_size), generator=gen)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "token_type_ids": ids.eq(shape.image).long().to(device),
        "pixel_values": pixels.to(device=device, dtype=torch.bfloat16),
    }


# --- measurements ----------------------------------------------------------------------------


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(**inputs, use_cache=True, logits_to_keep=1)

    return run


def _generate(
    model: Any, inputs: dict[str, torch.Tensor], new_tokens: int, shape: Shape
) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # random weights: <eos> must not end a run early
                do_sample=False,
                top_k=None,
                top_p=None,
                pad_token_id=shape.pad,
                eos_token_id=shape.eos,
            )
        produced = out.shape[1] - inputs["input_ids"].shape[1]
        if produced != new_tokens:
            raise RuntimeError(f"generated {produced} tokens, expected {new_tokens}")
        return out

    return run


def _brief(entry: dict[str, Any]) -> str:
    if "median_s" in entry:
        peak = entry.get("peak_allocated_gib")
        return f"{1000 * entry['median_s']:.1f} ms" + (f", peak {peak:.2f} GiB" if peak else "")
    return str(entry.get("skipped") or entry.get("error", "?"))[:200]


def measure(
    model: Any, shape: Shape, args: argparse.Namespace, clock: Clock, result: dict[str, Any]
) -> None:
    """Fill ``result`` with latency, throughput and memory numbers; each one may fail alone."""
    device = clock.device
    gen = torch.Generator().manual_seed(0)
    prompt = text_inputs(shape, 1, args.prompt_tokens, device, gen)
    batch_prompt = text_inputs(shape, args.batch, args.prompt_tokens, device, gen)
    image = image_inputs(shape, 32, device, gen)
    result["inputs"] = {
        "text_prompt_tokens": args.prompt_tokens,
        "image_prompt_tokens": int(image["input_ids"].shape[1]),
        "image_tokens": int(image["token_type_ids"].sum()),
        "pixel_values": list(image["pixel_values"].shape),
        "batch": args.batch,
        "new_tokens": args.new_tokens,
    }
    m: dict[str, Any] = {}
    result["measurements"] = m

    def step(name: str, fn: Callable[[], object]) -> dict[str, Any] | None:
        entry: dict[str, Any] | None = None
        try:
            clock.check()
            _reset_peak(device)
            entry = clock.median_s(fn, args.repeats)
            entry["peak_allocated_gib"] = _mem(device)["peak_allocated_gib"]
            m[name] = entry
        except OutOfTime as exc:
            m[name] = {"skipped": str(exc)}
        except Exception as exc:  # noqa: BLE001 - record and carry on
            m[name] = _error(exc)
        if "error" in m[name]:
            _free(device)  # after the except block, so the traceback's tensors are gone
        print(f"  {name}: {_brief(m[name])}", flush=True)
        return entry

    step("prefill_text_b1", _forward(model, prompt))
    step("prefill_image_b1", _forward(model, image))
    ttft1 = step("ttft_text_b1", _generate(model, prompt, 1, shape))
    gen1 = step("generate_text_b1", _generate(model, prompt, args.new_tokens, shape))
    ttftb = step(f"ttft_text_b{args.batch}", _generate(model, batch_prompt, 1, shape))
    genb = step(
        f"generate_text_b{args.batch}", _generate(model, batch_prompt, args.new_tokens, shape)
    )
    step("generate_image_b1", _generate(model, image, args.new_tokens, shape))

    summary: dict[str, float | None] = {}
    for batch, ttft, gen_ in ((1, ttft1, gen1), (args.batch, ttftb, genb)):
        if gen_ is None:
            continue
        total = gen_["median_s"]
        summary[f"e2e_tok_s_b{batch}"] = batch * args.new_tokens / total
        if ttft is not None and total > ttft["median_s"]:
            decode = total - ttft["median_s"]
            summary[f"decode_tok_s_b{batch}"] = batch * (args.new_tokens - 1) / decode
            summary[f"ms_per_step_b{batch}"] = 1000 * decode / (args.new_tokens - 1)
    result["summary"] = summary


# --- model construction ----------------------------------------------------------------------


def build_bf16(config: Gemma3Config, device: torch.device) -> Any:
    """Random bf16 weights created directly on ``device`` (no CPU copy, no hub)."""
    auto: Any = AutoModelForImageTextToText  # from_config is untyped
    with device:
        model = auto.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def load_quantized(folder: Path, quant: str, device: torch.device) -> Any:
    """The worker's path: ``from_pretrained`` with a BitsAndBytesConfig onto one device."""
    bnb: Any = BitsAndBytesConfig  # its __init__ is untyped
    if quant == "int8":
        qc = bnb(load_in_8bit=True)
    elif quant == "nf4":
        qc = bnb(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    else:
        raise ValueError(f"unknown quantization {quant!r}")
    device_map = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
    auto: Any = AutoModelForImageTextToText
    model = auto.from_pretrained(
        folder, quantization_config=qc, device_map=device_map, dtype=torch.bfloat16
    )
    return model.eval()


def _describe(model: Any, device: torch.device) -> dict[str, Any]:
    linear_types = sorted(
        {type(mod).__name__ for mod in model.modules() if "Linear" in type(mod).__name__}
    )
    return {
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "memory_footprint_gib": model.get_memory_footprint() / GIB,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "linear_types": linear_types,
        "after_load": _mem(device),
    }


# --- environment -----------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # noqa: BLE001
        env["bitsandbytes"] = f"unavailable: {type(exc).__name__}: {exc}"
    try:
        import accelerate

        env["accelerate"] = accelerate.__version__
    except Exception as exc:  # noqa: BLE001
        env["accelerate"] = f"unavailable: {type(exc).__name__}: {exc}"
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["gpu_properties_repr"] = repr(props)
        env["gpu_total_memory_gib"] = props.total_memory / GIB
        fields: dict[str, object] = {}
        for name in dir(props):
            if name.startswith("_"):
                continue
            try:
                value = getattr(props, name)
            except Exception as exc:  # noqa: BLE001 - one odd attribute must not stop the run
                value = f"unreadable: {type(exc).__name__}"
            if not callable(value):
                fields[name] = _jsonable(value)
        env["gpu_properties"] = fields
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    return env


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# --- driver ----------------------------------------------------------------------------------


def _write(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def _ms(result: dict[str, Any], name: str) -> float | None:
    entry = result.get("measurements", {}).get(name, {})
    return None if "median_s" not in entry else 1000 * entry["median_s"]


def table(report: dict[str, Any], batch: int) -> str:
    head = (
        f"{'config':<6} {'load s':>7} {'mem GiB':>8} {'peak GiB':>8} {'pre txt':>8} "
        f"{'pre img':>8} {'ttft b1':>8} {'tok/s b1':>9} {f'tok/s b{batch}':>9} "
        f"{'ms/step':>8}  status"
    )
    lines = [head, "-" * len(head)]
    for name, r in report["configs"].items():
        mem = r.get("model", {}).get("after_load", {})
        peaks: list[float] = [
            e["peak_allocated_gib"]
            for e in r.get("measurements", {}).values()
            if isinstance(e, dict) and e.get("peak_allocated_gib") is not None
        ]
        summary = r.get("summary", {})
        measured = r.get("measurements", {})
        failed = [k for k, e in measured.items() if "error" in e]
        skipped = [k for k, e in measured.items() if "skipped" in e]
        notes = [f"error: {r['error'][:80]}"] if "error" in r else []
        notes += [f"failed: {','.join(failed)}"] if failed else []
        notes += [f"out of time: {','.join(skipped)}"] if skipped else []
        status = "; ".join(notes) or "ok"
        lines.append(
            f"{name:<6} {_fmt(r.get('load_s')):>7} {_fmt(mem.get('allocated_gib'), digits=2):>8} "
            f"{_fmt(max(peaks) if peaks else None, digits=2):>8} "
            f"{_fmt(_ms(r, 'prefill_text_b1')):>8} {_fmt(_ms(r, 'prefill_image_b1')):>8} "
            f"{_fmt(_ms(r, 'ttft_text_b1')):>8} {_fmt(summary.get('decode_tok_s_b1')):>9} "
            f"{_fmt(summary.get(f'decode_tok_s_b{batch}')):>9} "
            f"{_fmt(summary.get('ms_per_step_b1')):>8}  {status}"
        )
    lines.append(
        "times in ms (medians); tok/s = decode only, excluding prefill; ms/step at batch 1; "
        "mem = allocated after load; peak = max allocated during measurements"
    )
    return "\n".join(lines)


def _save_folder(model: Any, folder: Path, report: dict[str, Any]) -> bool:
    """Save the bf16 model once for the quantized loads; record how long it took or why not."""
    info: dict[str, Any] = {"path": str(folder)}
    report["saved_bf16_folder"] = info
    t0 = time.monotonic()
    try:
        model.save_pretrained(folder, safe_serialization=True)
    except Exception as exc:  # noqa: BLE001 - the quantized configs record the consequence
        info.update(_error(exc))
        return False
    info["save_s"] = time.monotonic() - t0
    info["bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return True


def _time_reload(folder: Path, device: torch.device, clock: Clock) -> dict[str, Any]:
    """How long the worker's bf16 path (``from_pretrained`` of the saved folder) takes.

    The folder was just written, so its bytes are likely still in the page cache: this is the
    warm-cache load time, a lower bound for a cold start from disk.
    """
    info: dict[str, Any] = {}
    model: Any = None
    try:
        clock.check()
        _reset_peak(device)
        auto: Any = AutoModelForImageTextToText
        device_map = f"cuda:{device.index or 0}" if device.type == "cuda" else "cpu"
        t0 = time.monotonic()
        model = auto.from_pretrained(folder, dtype=torch.bfloat16, device_map=device_map)
        clock.sync()
        info["load_s"] = time.monotonic() - t0
        info["memory"] = _mem(device)
    except OutOfTime as exc:
        info["skipped"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - record and carry on
        info.update(_error(exc))
    del model
    _free(device)
    return info


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(INT8_CASTS)
    global_deadline = started + args.budget_s
    if args.smoke:
        device = torch.device("cpu")
        config_fn: Callable[[], Gemma3Config] = smoke_config
    else:
        device = torch.device("cuda", 0)
        config_fn = full_config
    wanted = [q.strip() for q in args.configs.split(",") if q.strip()]
    report: dict[str, Any] = {
        "script": "bench/medgemma_shape_gpu.py",
        "smoke": args.smoke,
        "started_unix": time.time(),
        "args": vars(args),
        "configs": {},
    }
    out = Path(args.out)
    try:
        report["environment"] = environment(device)
    except Exception as exc:  # noqa: BLE001
        report["environment"] = _error(exc)
    if device.type == "cuda" and not torch.cuda.is_available():
        report["error"] = "no CUDA device visible (use --smoke for a CPU check)"
    elif unknown := [q for q in wanted if q not in QUANT_NAMES]:
        report["error"] = f"unknown --configs {unknown}; choose from {', '.join(QUANT_NAMES)}"
    _write(out, report)
    if "error" in report:
        print(f"ERROR: {report['error']}", flush=True)
        return report
    shape = Shape.of(config_fn())
    print(f"device: {report['environment'].get('gpu_name', device)}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="medgemma-shape-", dir=args.workdir))
    folder = workdir / "bf16"
    saved = False
    try:
        for i, quant in enumerate(wanted):
            now = time.monotonic()
            share = (global_deadline - now) / (len(wanted) - i)
            clock = Clock(device, now + share)
            result: dict[str, Any] = {"budget_s": round(share, 1)}
            report["configs"][quant] = result
            print(f"[{quant}] starting, budget {share:.0f} s", flush=True)
            model: Any = None
            t0 = time.monotonic()
            try:
                _free(device)
                _reset_peak(device)
                needs_folder = any(q != "bf16" for q in wanted[i:]) and not saved
                if quant == "bf16":
                    t_build = time.monotonic()
                    model = build_bf16(shape.config, device)
                    clock.sync()
                    result["load_s"] = time.monotonic() - t_build
                    result["load_how"] = "from_config on the device, bf16, random init"
                    result["model"] = _describe(model, device)
                    result["model"]["peak_during_load_gib"] = _mem(device)["peak_allocated_gib"]
                    measure(model, shape, args, clock, result)
                    if needs_folder:  # after measuring: the save does not eat bf16's share
                        saved = _save_folder(model, folder, report)
                    del model
                    model = None
                    _free(device)
                    if saved and not args.skip_bf16_reload:
                        result["from_pretrained"] = _time_reload(folder, device, clock)
                else:
                    if needs_folder:
                        model = build_bf16(shape.config, device)
                        saved = _save_folder(model, folder, report)
                        del model
                        model = None
                        _free(device)
                    if not saved:
                        raise RuntimeError("no saved bf16 folder to quantize from (see above)")
                    _reset_peak(device)
                    t_load = time.monotonic()
                    model = load_quantized(folder, quant, device)
                    clock.sync()
                    result["load_s"] = time.monotonic() - t_load
                    result["load_how"] = "from_pretrained(saved bf16 folder, BitsAndBytesConfig)"
                    result["model"] = _describe(model, device)
                    result["model"]["peak_during_load_gib"] = _mem(device)["peak_allocated_gib"]
                    measure(model, shape, args, clock, result)
            except Exception as exc:  # noqa: BLE001 - record and carry on
                result.update(_error(exc))
                print(f"[{quant}] FAILED: {result['error']}", flush=True)
            finally:
                result["bnb_int8_fp16_cast_warnings"] = INT8_CASTS.count
                INT8_CASTS.count = 0
                del model
                _free(device)
                result["after_free"] = _mem(device)
                result["wall_s"] = time.monotonic() - t0
                _write(out, report)
            print(f"[{quant}] done in {result['wall_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["total_s"] = time.monotonic() - started
    _write(out, report)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--out", required=True, help="where to write the JSON report")
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU, seconds")
    p.add_argument(
        "--configs", default=",".join(QUANT_NAMES), help="comma list of bf16,int8,nf4 (in order)"
    )
    p.add_argument("--repeats", type=int, default=None, help="timed runs after a warm-up (3)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per generation (64)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="text prompt length (256)")
    p.add_argument("--batch", type=int, default=8, help="the larger decode batch (8)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget for all configurations (300 on GPU, 120 with --smoke)",
    )
    p.add_argument(
        "--skip-bf16-reload",
        action="store_true",
        help="do not time from_pretrained of the saved bf16 folder",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="where the bf16 folder for the quantized loads is written (default: system temp)",
    )
    args = p.parse_args(argv)
    smoke_defaults = {"repeats": 1, "new_tokens": 8, "prompt_tokens": 64, "budget_s": 120.0}
    gpu_defaults = {"repeats": 3, "new_tokens": 64, "prompt_tokens": 256, "budget_s": 300.0}
    for key, value in (smoke_defaults if args.smoke else gpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if "error" in report:
        return 2
    print()
    print(table(report, args.batch))
    reload = report["configs"].get("bf16", {}).get("from_pretrained", {})
    if "load_s" in reload:
        print(
            f"bf16 from_pretrained of the saved folder (warm page cache): {reload['load_s']:.1f} s"
        )
    saved = report.get("saved_bf16_folder", {})
    if "save_s" in saved:
        print(f"bf16 save_pretrained: {saved['save_s']:.1f} s, {saved['bytes'] / GIB:.2f} GiB")
    print(f"\ntotal {report['total_s']:.1f} s; JSON written to {args.out}")
    failed = [name for name, r in report["configs"].items() if "error" in r]
    return 1 if failed and len(failed) == len(report["configs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
