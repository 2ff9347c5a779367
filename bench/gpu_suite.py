"""The engine on one GPU, MedGemma 4B's shape: bf16 / 8-bit / 4-bit, through the worker's code.

One script, one JSON, one table, under a time budget (device time is scarce)::

    python bench/gpu_suite.py --out artifacts/gpu_suite.json            # on the GPU machine
    python bench/gpu_suite.py --smoke --out /tmp/gpu_suite_smoke.json   # CPU, toy size

For each quantization it loads the model with the worker's loader (:func:`worker.weights.loader.
load_model`, so 8-bit is what ``quantization: "8bit"`` really gives), builds the worker's engine
(:func:`worker.engines.factory.build_engine`, compile on, batch slots = the largest concurrency),
runs its warm-up, and measures:

* ``load_s``, ``warmup_s``, ``weight_gib`` (``get_memory_footprint``);
* ``batch1_tok_s``: one request alone (the single-stream path), median of ``--repeats``;
* ``c8_tok_s``, ``c32_tok_s``: that many requests at once on threads, as Celery's threads send
  them (the first starts alone and moves into the batch), total generated tokens / wall time;
* ``ttft_1000_ms``: first token of a ~1,000-token prompt on an idle engine, median.

Then, for bf16, the stack's TTFT overhead on this device: ``bench/serve.py --spawn-stack`` with
its in-process engine baseline (Redis + gateway + one worker on the same folder).

The model is random-weight ``Gemma3ForConditionalGeneration`` with MedGemma 4B's exact config
(the real weights are gated and no hub is reachable from the GPU machine): speed and memory
depend on shapes, not values. Its tokenizer is the tiny test tokenizer (ids beyond it decode to
nothing; the token counts are the model's). Random weights rarely pick ``<eos>`` among 262k ids,
and every rate divides the tokens really generated. ``--smoke`` does the same with the tiny
Gemma 3 of the tests on the CPU (tests/test_gpu_suite.py runs it, so this script cannot rot).

Every configuration and measurement is wrapped: an error is recorded and the run goes on; the
JSON is rewritten after each configuration, so a run cut short still leaves results.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.torch_env import prepare_cpu_torch  # noqa: E402

QUANTS = {  # name -> the registry's serving fields
    "bf16": {"quantization": "none"},
    "8bit-torchao": {"quantization": "8bit", "quantization_backend": "torchao"},
    "4bit-bitsandbytes": {"quantization": "4bit"},
    "8bit-bitsandbytes": {"quantization": "8bit", "quantization_backend": "bitsandbytes"},
}
GIB = 1024**3


class Budget:
    """Seconds left of ``--budget-s``; a step that would start past it is skipped."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"[:500], "where": traceback.format_exc()[-800:]}


def build_folder(dest: Path, smoke: bool, device: str) -> Path:
    """The tiny test model folder; unless ``smoke``, its weights replaced by MedGemma 4B's shape
    (random bf16, built on ``device``)."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from devstack.tiny_gemma import build_tiny_gemma, medgemma_4b_config

    folder = build_tiny_gemma(dest, multimodal=False)
    if smoke:
        return folder
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    with torch.device(device):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = Gemma3ForConditionalGeneration(medgemma_4b_config())
        finally:
            torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return folder


def _prompt(prompter: Any, tokens: int) -> list[Any]:
    """A user turn of at least ``tokens`` prompt tokens (grown until the template says so)."""
    from shared.protocol import ChatMessage, TextPart

    words = ["the", "patient", "reports", "chest", "pain", "and", "shortness", "of", "breath"]
    n = max(8, tokens // 2)
    while True:
        text = " ".join(words[i % len(words)] for i in range(n))
        chat = [ChatMessage(role="user", content=[TextPart(text=text)])]
        if prompter.build(chat, 1).prompt_tokens >= tokens:
            return chat
        n = int(n * 1.3) + 1


def _concurrent(engine: Any, chats: list[Any], sampling: Any) -> dict[str, Any]:
    results: list[Any] = [None] * len(chats)

    def one(i: int) -> None:
        results[i] = engine.generate(chats[i], sampling, on_text=lambda _t: None)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(chats))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    paths = sorted({r.path for r in results})
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "paths": paths}


def measure(name: str, folder: Path, args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    import torch

    from shared.protocol import SamplingParams
    from shared.registry import ModelEntry, Registry
    from worker.engines.factory import EngineOptions, build_engine
    from worker.weights.loader import load_model

    out: dict[str, Any] = {"config": name}
    serving = {
        "path": str(folder),
        "dtype": "bfloat16",
        "context_length": args.context_length,
        "max_new_tokens": args.new_tokens,
        **QUANTS[name],
    }
    entry = ModelEntry.model_validate(
        {"model_name": "suite", "model_alias": "suite", "serving": serving}
    )
    registry = Registry(models=[entry], source=folder / "models.json")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    loaded = load_model(entry, registry, device=args.device, cpu_quantization="registry")
    out.update(
        load_s=loaded.load_seconds,
        quantization=loaded.quantization_label,
        weight_gib=loaded.model.get_memory_footprint() / GIB,  # type: ignore[no-untyped-call]
    )
    top = max(args.concurrency)
    engine = build_engine(
        loaded,
        context_length=args.context_length,
        options=EngineOptions(concurrency=top, compile=args.compile == "on"),
    )
    try:
        started = time.perf_counter()
        engine.warmup()
        out["warmup_s"] = time.perf_counter() - started
        out["compiled"] = engine.single.compiled
        sampling = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
        chat = _prompt(engine.prompter, 32)

        def step(key: str, fn: Callable[[], Any]) -> None:
            if budget.left() < 0:
                out[key] = {"skipped": "budget"}
                return
            try:
                out[key] = fn()
            except Exception as exc:  # record and go on: one failure must not end the run
                out[key] = _error(exc)

        def batch1() -> dict[str, Any]:
            """Decoding rate of one request alone: tokens after the first / time after it."""
            rates, paths = [], set()
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                r = engine.generate(chat, sampling, on_text=lambda _t: None)
                wall = time.perf_counter() - t0
                rates.append(
                    max(0, r.completion_tokens - 1) / max(1e-9, wall - (r.first_token_s or 0))
                )
                paths.add(r.path)
            return {"tok_s": statistics.median(rates), "runs": rates, "paths": sorted(paths)}

        step("batch1", batch1)
        for n in args.concurrency:
            step(f"c{n}", functools.partial(_concurrent, engine, [chat] * n, sampling))

        def ttft() -> dict[str, Any]:
            long = _prompt(engine.prompter, args.ttft_prompt_tokens)
            one = SamplingParams(temperature=0.0, max_new_tokens=2)
            times = []
            for _ in range(args.repeats):
                r = engine.generate(long, one, on_text=lambda _t: None)
                times.append((r.first_token_s or 0.0) * 1000)
            return {"ms": statistics.median(times), "prompt_tokens": r.prompt_tokens}

        step("ttft_long", ttft)
        if args.device.startswith("cuda"):
            out["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    finally:
        engine.close()
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def stack_overhead(folder: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """bench/serve.py against a spawned stack on this folder, with its engine baseline."""
    dest = workdir / "stack.json"
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "serve.py"),
        "--spawn-stack",
        str(folder),
        "--engine-baseline",
        str(folder),
        "--dtype",
        "bfloat16",
        "--device",
        args.device,
        "--context-length",
        str(args.context_length),
        "--concurrency",
        "1",
        "--num-requests",
        str(args.stack_requests),
        "--baseline-runs",
        str(args.stack_requests),
        "--max-tokens",
        "16",
        # The overhead is the path around the engine, prefill-bound: eager decoding on both
        # sides keeps the worker's start short.
        "--worker-env",
        "WORKER_COMPILE=off",
        "--worker-env",
        "WORKER_CONCURRENCY=1",
        "--out",
        str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(60, args.stack_timeout))
    if proc.returncode != 0:
        return {"error": f"bench/serve.py exited {proc.returncode}", "tail": proc.stderr[-1500:]}
    report = json.loads(dest.read_text(encoding="utf-8"))
    over = report.get("overhead", {})
    keys = ("ttft_stack_p50_ms", "ttft_engine_p50_ms", "ttft_overhead_ms", "same_answer")
    return {k: over.get(k) for k in keys}


def environment(device: str) -> dict[str, Any]:
    """bench/spawn.py's machine record, plus the device and the quantization libraries."""
    import torch

    from bench.spawn import machine_info

    env: dict[str, Any] = {**machine_info(), "device": device}
    for pkg in ("torchao", "bitsandbytes"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception as exc:  # noqa: BLE001 - absent or broken: say which
            env[pkg] = f"unavailable ({type(exc).__name__})"
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _num(value: Any, key: str, digits: int = 1) -> str:
    if isinstance(value, dict):
        value = value.get(key)
    return "-" if not isinstance(value, (int, float)) else f"{value:.{digits}f}"


def table(report: dict[str, Any], concurrency: list[int]) -> str:
    head = ["config", "weights GiB", "load s", "warm-up s", "batch-1 tok/s"]
    head += [f"{n} conc tok/s" for n in concurrency] + ["TTFT long ms"]
    rows = [head]
    for name, r in report["configs"].items():
        if "error" in r:
            rows.append([name, "error: " + r["error"][:60]])
            continue
        row = [name, _num(r, "weight_gib", 2), _num(r, "load_s"), _num(r, "warmup_s")]
        row.append(_num(r.get("batch1"), "tok_s"))
        row += [_num(r.get(f"c{n}"), "tok_s") for n in concurrency]
        row.append(_num(r.get("ttft_long"), "ms"))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in rows]
    stack = report.get("stack_overhead")
    if stack:
        lines.append(f"stack TTFT overhead (bf16): {json.dumps(stack)}")
    return "\n".join(lines)


def _write(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny Gemma 3 on the CPU, small sizes")
    p.add_argument("--out", type=Path)
    p.add_argument("--quant", nargs="+", choices=list(QUANTS), default=None)
    p.add_argument("--budget-s", type=float, default=None, help="default 450 (smoke: 600)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128 (smoke: 8)")
    p.add_argument("--concurrency", type=int, nargs="+", default=None, help="default 8 32")
    p.add_argument("--ttft-prompt-tokens", type=int, default=None, help="default 1000")
    p.add_argument("--context-length", type=int, default=None, help="default 8192 (smoke 512)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", choices=["on", "off"], default=None, help="default on")
    p.add_argument("--stack", choices=["on", "off"], default=None, help="default on (GPU)")
    p.add_argument("--stack-requests", type=int, default=10)
    p.add_argument("--stack-timeout", type=float, default=300)
    args = p.parse_args(argv)
    smoke = args.smoke
    defaults: dict[str, Any] = {
        "quant": ["bf16", "8bit-torchao"] if smoke else list(QUANTS),
        "budget_s": 600.0 if smoke else 450.0,
        "new_tokens": 8 if smoke else 128,
        "concurrency": [2, 4] if smoke else [8, 32],
        "ttft_prompt_tokens": 100 if smoke else 1000,
        "context_length": 512 if smoke else 8192,
        "compile": "off" if smoke else "on",
        "stack": "off" if smoke else "on",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.device = "cpu" if smoke else "cuda"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_cpu_torch(args.device, args.compile == "on")
    budget = Budget(args.budget_s)
    report: dict[str, Any] = {
        "command": " ".join(["python", "bench/gpu_suite.py", *(argv or sys.argv[1:])]),
        "environment": environment(args.device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "configs": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    try:
        started = time.perf_counter()
        folder = build_folder(workdir / "model", args.smoke, args.device)
        report["build_s"] = time.perf_counter() - started
        for i, name in enumerate(args.quant):
            if budget.left() < 0:
                report["configs"][name] = {"error": "skipped: out of --budget-s"}
                continue
            # Each configuration gets a fair share of what is left.
            share = Budget(budget.left() / (len(args.quant) - i))
            try:
                report["configs"][name] = measure(name, folder, args, share)
            except Exception as exc:
                report["configs"][name] = _error(exc)
            _write(args.out, report)
            print(f"{name}: done, {budget.left():.0f} s of the budget left", flush=True)
        if args.stack == "on" and budget.left() > 60:
            try:
                report["stack_overhead"] = stack_overhead(folder, args, workdir)
            except Exception as exc:
                report["stack_overhead"] = _error(exc)
        report["total_s"] = time.perf_counter() - started
        _write(args.out, report)
        print(table(report, args.concurrency))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
