"""What the stack is compared with, and the comparisons.

* **Engine baseline** (``--engine-baseline``): before any HTTP load, the same model is loaded
  in this process with the worker's loader and engine, and ``Engine.generate`` runs with exactly
  the messages and sampling the gateway builds for the request. Its TTFT is the call to
  ``generate`` to the first ``on_text`` callback, i.e. the moment the worker would publish the
  first ``token`` event. :func:`overhead`: stack minus engine, and stack / engine.
* **transformers serve** (``--vs-transformers-serve``): after the stack has stopped, the same
  load on transformers' own OpenAI-compatible server pinned to the same model folder
  (``bench/hf_serve.py``). :func:`versus`: the stack against it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

from bench.clients import RequestResult
from bench.entries import resolve_model
from bench.load import run_load, summarize
from bench.spawn import worker_env
from bench.stats import CpuMeter, describe, wait_quiet
from bench.workload import engine_inputs, medgemma_body, openai_body
from devstack.processes import free_port
from shared.protocol import ChatMessage, SamplingParams
from shared.registry import ModelEntry, Registry

# --- the engine in-process ---------------------------------------------------------------------


def _mark(marks: list[float], _text: str) -> None:
    marks.append(time.perf_counter())


def engine_baseline(
    entry: ModelEntry,
    registry: Registry,
    messages: Sequence[ChatMessage],
    sampling: SamplingParams,
    *,
    runs: int,
    warmup: int,
    device: str,
    compile: bool,
) -> dict[str, Any]:
    """Load the model here, run the worker's engine ``warmup + runs`` times (one job at a time,
    so on the single-stream path), free the model."""
    from worker.torch_env import prepare_cpu_torch

    prepare_cpu_torch(device, compile)  # before torch: as the worker does
    import torch

    from worker.engines.base import GenerationEngine
    from worker.engines.factory import EngineOptions, build_engine
    from worker.weights.loader import load_model

    engine: GenerationEngine
    if entry.serving.engine == "loadtest":
        from worker.engines.loadtest import LoadTestEngine

        engine = LoadTestEngine(
            entry.serving.loadtest_tokens_per_s,
            first_token_s=entry.serving.loadtest_first_token_s,
        )
        info: dict[str, Any] = {"device": "none", "model_class": "LoadTestEngine"}
    else:
        loaded = load_model(entry, registry, device=device)
        engine = build_engine(
            loaded,
            context_length=entry.serving.context_length,
            options=EngineOptions(concurrency=1, compile=compile),
        )
        engine.warmup()
        info = {
            "device": loaded.device,
            "dtype": loaded.dtype,
            "quantization": loaded.quantization,
            "load_s": loaded.load_seconds,
            "model_class": type(loaded.model).__name__,
        }
        del loaded
    info["torch_threads"] = torch.get_num_threads()
    rows: list[dict[str, Any]] = []
    for i in range(warmup + runs):
        marks: list[float] = []
        t0 = time.perf_counter()
        result = engine.generate(messages, sampling, on_text=partial(_mark, marks))
        t1 = time.perf_counter()
        n = result.completion_tokens
        ttft = marks[0] - t0 if marks else None
        rows.append(
            {
                "warmup": i < warmup,
                "ttft_s": ttft,
                "engine_first_token_s": result.first_token_s,
                "e2e_s": t1 - t0,
                "itl_s": [b - a for a, b in zip(marks, marks[1:], strict=False)],
                "token_events": len(marks),
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": n,
                "finish_reason": result.finish_reason,
                "path": result.path,
                "tpot_s": (t1 - t0 - ttft) / (n - 1) if ttft is not None and n > 1 else None,
                "text_sha256": hashlib.sha256(result.text.encode()).hexdigest(),
                "text_chars": len(result.text),
            }
        )
    engine.close()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    measured = [r for r in rows if not r["warmup"]]

    def col(key: str) -> list[float]:
        return [float(r[key]) for r in measured if r[key] is not None]

    completion = col("completion_tokens")
    e2e = col("e2e_s")
    return {
        **info,
        "runs": runs,
        "warmup": warmup,
        "ttft_ms": describe(col("ttft_s"), 1000.0),
        "engine_first_token_ms": describe(col("engine_first_token_s"), 1000.0),
        "itl_ms": describe([g for r in measured for g in r["itl_s"]], 1000.0),
        "tpot_ms": describe(col("tpot_s"), 1000.0),
        "e2e_ms": describe(e2e, 1000.0),
        "completion_tokens": describe(completion),
        "prompt_tokens": measured[0]["prompt_tokens"] if measured else None,
        "output_tok_s": sum(completion) / sum(e2e) if e2e and sum(e2e) > 0 else None,
        "distinct_answers": len({r["text_sha256"] for r in measured}),
        "per_run": rows,
    }


def baseline_phase(
    args: argparse.Namespace, prompt: str, workdir: Path, spawn: tuple[Registry, str] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--engine-baseline``: the model (the spawned stack's entry when it names the same one)
    in-process, with the messages and sampling the gateway builds for ``prompt``. Returns the
    baseline's record and the CPU of the phase."""
    if spawn is not None and args.engine_baseline in (args.spawn_stack, spawn[1]):
        registry, name = spawn
    else:
        registry, name = resolve_model(args.engine_baseline, args, workdir / "baseline")
    entry = registry.get(name)
    assert entry is not None
    messages, sampling = engine_inputs(medgemma_body(args, prompt), entry)
    wait_quiet(args.quiet_cpu, args.quiet_timeout, "the engine baseline")
    print(
        f"engine baseline: loading {name} in-process, {args.baseline_warmup} warm-up + "
        f"{args.baseline_runs} runs (max_new_tokens {sampling.max_new_tokens}) ...",
        flush=True,
    )
    meter = CpuMeter([os.getpid()])
    record = engine_baseline(
        entry,
        registry,
        messages,
        sampling,
        runs=args.baseline_runs,
        warmup=args.baseline_warmup,
        device=args.device,
        compile=worker_env(args).get("WORKER_COMPILE", "auto") != "off",
    )
    record["sampling"] = sampling.model_dump()
    return record, meter.stop()


def overhead(
    stack: dict[str, Any], base: dict[str, Any], results: Sequence[RequestResult]
) -> dict[str, Any]:
    """Stack minus engine, and stack / engine, for the p50 TTFT and E2E of this run."""
    out: dict[str, Any] = {}
    for key in ("ttft", "e2e"):
        s, e = stack[f"{key}_ms"]["p50"], base[f"{key}_ms"]["p50"]
        out[f"{key}_stack_p50_ms"] = s
        out[f"{key}_engine_p50_ms"] = e
        out[f"{key}_overhead_ms"] = s - e if s is not None and e is not None else None
        out[f"{key}_ratio"] = s / e if s is not None and e else None
        # The fastest request of each side: a check that is robust to bursts of foreign load.
        smin, emin = stack[f"{key}_ms"]["min"], base[f"{key}_ms"]["min"]
        out[f"{key}_overhead_min_ms"] = (
            smin - emin if smin is not None and emin is not None else None
        )
    engine_answers = {r["text_sha256"] for r in base["per_run"]}
    stack_answers = {r.text_sha256 for r in results if r.ok}
    out["same_answer"] = bool(stack_answers) and stack_answers == engine_answers
    out["prompt_tokens_stack"] = stack["prompt_tokens"]
    out["prompt_tokens_engine"] = base["prompt_tokens"]
    out["same_prompt"] = stack["prompt_tokens"] == base["prompt_tokens"]
    out["completion_tokens_stack_p50"] = stack["completion_tokens"]["p50"]
    out["completion_tokens_engine_p50"] = base["completion_tokens"]["p50"]
    return out


# --- side by side with transformers serve -----------------------------------------------------


def transformers_serve_phase(
    args: argparse.Namespace, prompt: str, workdir: Path
) -> dict[str, Any]:
    """The same load, after the stack has stopped, on ``transformers serve`` pinned to the
    same model folder (``--continuous-batching`` when the stack's workers batch)."""
    from bench.hf_serve import (
        served_model_name,
        start_transformers_serve,
        wait_transformers_serve,
    )

    registry, name = resolve_model(args.vs_transformers_serve, args, workdir / "hf")
    entry = registry.get(name)
    assert entry is not None
    if entry.serving.engine == "loadtest":
        raise SystemExit("--vs-transformers-serve needs a model, not the load-test engine")
    from worker.weights.sources import weights_folder

    folder = weights_folder(entry, registry)
    batching = args.hf_continuous_batching == "on" or (
        args.hf_continuous_batching == "auto" and args.worker_concurrency > 1
    )
    port = free_port()
    print(
        f"transformers serve: {folder.name}, continuous batching {batching}, port {port} ...",
        flush=True,
    )
    proc = start_transformers_serve(
        folder,
        port,
        workdir / "transformers-serve.log",
        continuous_batching=batching,
        dtype=args.hf_dtype,
    )
    try:
        wait_transformers_serve(port, args.ready_timeout, proc)
        their = argparse.Namespace(**vars(args))
        their.api, their.base_url = "openai", f"http://127.0.0.1:{port}"
        their.model = served_model_name(folder)
        body = openai_body(
            their.model, prompt, system_message=args.system_message, max_tokens=args.max_tokens
        )
        wait_quiet(args.quiet_cpu, args.quiet_timeout, "the transformers serve load")
        meter = CpuMeter([os.getpid(), proc.popen.pid], ["client", "transformers_serve"])
        warm, results, duration = asyncio.run(run_load(their, body))
        cpu = meter.stop()
    finally:
        proc.stop()
    return {
        "command": proc.popen.args,
        "continuous_batching": batching,
        "dtype": args.hf_dtype,
        "cpu": cpu,
        "summary": summarize(results, duration),
        "warmup": [asdict(r) for r in warm],
        "per_request": [asdict(r) for r in results],
    }


def versus(
    ours: dict[str, Any], results: Sequence[RequestResult], theirs: dict[str, Any]
) -> dict[str, Any]:
    """Our stack against transformers serve, same load: ratios > 1 favour the stack for
    throughput; TTFT and E2E ratios are ours / theirs (below 1 favours the stack)."""
    t = theirs["summary"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ours_answers = {r.text_sha256 for r in results if r.ok}
    their_answers = {r["text_sha256"] for r in theirs["per_request"] if r["ok"]}
    return {
        "output_tok_s": [ours["output_token_throughput_tok_s"], t["output_token_throughput_tok_s"]],
        "throughput_ratio": ratio(
            ours["output_token_throughput_tok_s"], t["output_token_throughput_tok_s"]
        ),
        "ttft_p50_ms": [ours["ttft_ms"]["p50"], t["ttft_ms"]["p50"]],
        "ttft_p50_ratio": ratio(ours["ttft_ms"]["p50"], t["ttft_ms"]["p50"]),
        "e2e_p50_ratio": ratio(ours["e2e_ms"]["p50"], t["e2e_ms"]["p50"]),
        "prompt_tokens": [ours["prompt_tokens"], t["prompt_tokens"]],
        "completion_tokens_p50": [ours["completion_tokens"]["p50"], t["completion_tokens"]["p50"]],
        "same_answer": bool(ours_answers) and ours_answers == their_answers,
    }
