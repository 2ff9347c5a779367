"""Single-stream decoding through the worker's engine on this CPU: dtype, compile and
quantization side by side, and how far each quantized answer agrees with bfloat16's.

Each variant runs in its own fresh process (compiled code, OpenMP threads and memory of one must
not leak into the next), loads the model with the worker's loader, builds the worker's engine
(:func:`worker.engines.factory.build_engine`, one job at a time), runs its warm-up (compiling,
when on, happens there and is reported as ``warmup_s``), then for each prompt of a fixed set
generates ``--new-tokens`` greedy tokens: decode tok/s (tokens after the first / time after
the first), TTFT, and the generated ids.

Agreement with the reference variant (``bf16``) is per prompt: the share of positions, up to
the shorter answer, holding the same token id, and whether the whole answer is identical.

    python bench/engine_cpu.py --model demo --out docs/bench/engine_cpu_demo.json
    python bench/engine_cpu.py --model tiny --variants bf16 8bit-torchao 8bit-bnb 4bit-bnb \
        --out docs/bench/engine_cpu_tiny.json

Variants: ``fp32`` (the worker's CPU default before compiled decoding: float32, eager),
``bf16-eager``, ``bf16`` (the current default: bfloat16 on a CPU with native bf16, compiled),
``8bit-torchao`` (eager; ``8bit-torchao-compiled`` compiles for minutes here), ``8bit-bnb``
(LLM.int8, default threshold), ``8bit-bnb-t0`` (``llm_int8_threshold=0``), ``4bit-bnb`` (NF4).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What are the symptoms of diabetes?",
    "Explain in a few sentences what a fever is and when to see a doctor.",
    "How is high blood pressure treated?",
    "What should I do after a minor burn?",
    "What is the difference between a virus and a bacterium?",
]
# name -> (serving fields, compile)
VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "fp32": ({"dtype": "float32", "quantization": "none"}, False),
    "bf16-eager": ({"dtype": "bfloat16", "quantization": "none"}, False),
    "bf16": ({"dtype": "bfloat16", "quantization": "none"}, True),
    "8bit-torchao": ({"dtype": "bfloat16", "quantization": "8bit"}, False),
    "8bit-torchao-compiled": ({"dtype": "bfloat16", "quantization": "8bit"}, True),
    "8bit-bnb": (
        {"dtype": "bfloat16", "quantization": "8bit", "quantization_backend": "bitsandbytes"},
        False,
    ),
    "8bit-bnb-t0": (
        {"dtype": "bfloat16", "quantization": "8bit", "quantization_backend": "bitsandbytes"},
        False,
    ),
    "4bit-bnb": ({"dtype": "bfloat16", "quantization": "4bit"}, False),
}
DEFAULT_VARIANTS = ["fp32", "bf16-eager", "bf16", "8bit-torchao", "8bit-bnb", "4bit-bnb"]
REFERENCE = "bf16"


def _entry(model: str, tiny_folder: str | None, serving: dict[str, Any]) -> tuple[Any, Any]:
    from shared.registry import ModelEntry, Registry, load_registry

    if model == "demo":
        registry = load_registry(ROOT / "models.json")
        base = registry.get("smollm2-demo")
        assert base is not None
        entry = base.model_copy(update={"serving": base.serving.model_copy(update=serving)})
        return entry, Registry(models=[entry], source=registry.source)
    assert tiny_folder is not None
    raw = {"path": tiny_folder, "context_length": 512, **serving}
    entry = ModelEntry.model_validate({"model_name": "tiny", "model_alias": "tiny", "serving": raw})
    return entry, Registry(models=[entry], source=Path(tiny_folder) / "models.json")


def _child(args: argparse.Namespace) -> dict[str, Any]:
    serving, compile_on = VARIANTS[args.child]
    from worker.torch_env import prepare_cpu_torch

    prepare_cpu_torch("cpu", compile_on)
    import torch

    if args.child == "8bit-bnb-t0":
        # Not a registry option: the loader's bitsandbytes config with the threshold at 0.
        import worker.weights.loader
        from worker.weights.quantization import quantization_config

        def threshold_zero(plan: Any) -> Any:
            config = quantization_config(plan)
            config.llm_int8_threshold = 0.0
            return config

        worker.weights.loader.quantization_config = threshold_zero  # type: ignore[attr-defined]

    from shared.protocol import ChatMessage, SamplingParams, TextPart
    from worker.engines.factory import EngineOptions, build_engine
    from worker.weights.loader import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    entry, registry = _entry(args.model, args.tiny_folder, serving)
    loaded = load_model(entry, registry, device="cpu", cpu_quantization="registry")
    engine = build_engine(
        loaded,
        context_length=entry.serving.context_length,
        options=EngineOptions(concurrency=1, compile=compile_on),
    )
    started = time.perf_counter()
    engine.warmup()
    warmup_s = time.perf_counter() - started
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    per_prompt = []
    for prompt in PROMPTS:
        chat = [ChatMessage(role="user", content=[TextPart(text=prompt)])]
        rates, ttfts = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            r = engine.generate(chat, sampling, on_text=lambda _t: None)
            wall = time.perf_counter() - t0
            first = r.first_token_s or 0.0
            ttfts.append(first)
            rates.append(max(0, r.completion_tokens - 1) / max(1e-9, wall - first))
        # The answer's ids: the text the client got, re-encoded (the engine reports text).
        ids = loaded.tokenizer(r.text, add_special_tokens=False)["input_ids"]
        per_prompt.append(
            {
                "prompt": prompt,
                "completion_tokens": r.completion_tokens,
                "decode_tok_s": statistics.median(rates),
                "ttft_s": statistics.median(ttfts),
                "path": r.path,
                "text": r.text,
                "ids": ids,
            }
        )
    engine.close()
    return {
        "variant": args.child,
        "dtype": loaded.dtype,
        "quantization": loaded.quantization_label,
        "compiled": engine.single.compiled,
        "cache": engine.single.cache_kind,
        "warmup_s": warmup_s,
        "load_s": loaded.load_seconds,
        "model_bytes": loaded.model.get_memory_footprint(),  # type: ignore[no-untyped-call]
        "decode_tok_s": statistics.median(p["decode_tok_s"] for p in per_prompt),
        "ttft_s": statistics.median(p["ttft_s"] for p in per_prompt),
        "torch_threads": torch.get_num_threads(),
        "per_prompt": per_prompt,
    }


def agreement(ref: dict[str, Any], other: dict[str, Any]) -> dict[str, float]:
    """Share of positions holding the same token as ``ref``, and of identical answers."""
    same = total = identical = 0
    for a, b in zip(ref["per_prompt"], other["per_prompt"], strict=True):
        n = min(len(a["ids"]), len(b["ids"]))
        same += sum(1 for x, y in zip(a["ids"][:n], b["ids"][:n], strict=True) if x == y)
        total += max(len(a["ids"]), len(b["ids"]))
        identical += a["text"] == b["text"]
    return {
        "token_agreement": same / total if total else 1.0,
        "identical_answers": identical / len(ref["per_prompt"]),
    }


def _spawn(args: argparse.Namespace, variant: str, tiny: str | None) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model]
    cmd += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)]
    if tiny:
        cmd += ["--tiny-folder", tiny]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        return {"variant": variant, "error": proc.stderr[-2000:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def table(results: dict[str, dict[str, Any]]) -> str:
    ref = results.get(REFERENCE)
    base = results.get("fp32")
    head = f"{'variant':<22} {'MB':>6} {'warm-up s':>9} {'TTFT ms':>8} {'decode tok/s':>12}"
    head += f" {'vs fp32':>8} {'tokens = bf16':>13} {'answers = bf16':>14}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<22} error: {r['error'].strip().splitlines()[-1][:80]}")
            continue
        rel = (
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x"
            if base and "error" not in base
            else "-"
        )
        agree = agreement(ref, r) if ref and "error" not in ref else None
        tok = f"{agree['token_agreement']:.1%}" if agree else "-"
        ans = f"{agree['identical_answers']:.0%}" if agree else "-"
        lines.append(
            f"{name:<22} {r['model_bytes'] / 1e6:>6.0f} {r['warmup_s']:>9.1f} "
            f"{r['ttft_s'] * 1000:>8.0f} {r['decode_tok_s']:>12.1f} {rel:>8} {tok:>13} {ans:>14}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["demo", "tiny"], default="demo")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="runs per prompt (median)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--tiny-folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    from bench.spawn import machine_info

    tiny = None
    if args.model == "tiny":
        from devstack.tiny_gemma import build_tiny_gemma

        tiny = str(build_tiny_gemma(Path(tempfile.mkdtemp()) / "tiny", multimodal=False))
    started = time.time()
    results: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        print(f"measuring {variant} ...", flush=True)
        results[variant] = _spawn(args, variant, tiny)
    ref = results.get(REFERENCE)
    for r in results.values():
        if ref and "error" not in ref and "error" not in r:
            r["agreement_with_bf16"] = agreement(ref, r)
    print(table(results))
    if args.out:
        report = {
            "benchmark": "bench/engine_cpu.py",
            "command": " ".join(["python", "bench/engine_cpu.py", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_seconds": round(time.time() - started, 1),
            "machine": machine_info(),
            "prompts": PROMPTS,
            "new_tokens": args.new_tokens,
            "results": results,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
