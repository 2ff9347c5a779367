"""Benchmark the serving stack over HTTP, in the spirit of ``vllm bench serve``.

Usage (from the repository root)::

    # against a stack that is already running (make demo, docker compose, ...)
    .venv/bin/python bench/serve.py --base-url http://127.0.0.1:8000 --api-key demo-key \\
        --model smollm2-demo --concurrency 1 --num-requests 20 --out /tmp/serve.json

    # start redis + one worker + the gateway for the run, measure the engine in-process first
    .venv/bin/python bench/serve.py --spawn-stack demo --engine-baseline demo \\
        --num-requests 20 --max-tokens 64 --out docs/bench/overhead_demo_cpu.json

What is measured, and how:

* **Load.** ``--concurrency N`` alone is a closed loop: N clients, each sends its next request
  when the previous answer has ended. ``--request-rate R`` is an open loop: requests start at
  Poisson arrival times (exponential gaps, mean ``1/R`` s, seeded), whether or not earlier ones
  have finished; ``--concurrency`` then caps how many are in flight. ``--warmup`` requests run
  one at a time before the measured ones and are reported apart.
* **Requests.** Every request is the same ``POST /medgemma`` with ``stream: true``,
  ``temperature: 0`` (greedy, so every answer is the same) and a synthetic prompt of exactly
  ``--prompt-words`` words. Each request opens a new conversation (no ``conversation_id``). The
  API has no ``max_tokens`` field: the answer budget is the model's ``max_new_tokens`` in
  models.json scaled by ``verbosity`` (0: 1/4, 1: 1/2, 2: 1x, 3: 2x). ``--max-tokens`` therefore
  only acts where this program writes the registry entry itself (``--spawn-stack``, or a model
  folder given to ``--engine-baseline``); against a running stack, set ``max_new_tokens`` there.
* **Per request**, with :func:`time.perf_counter` in this process: TTFT = request sent to the
  first ``token`` event received; ITL = the gaps between consecutive ``token`` events (one event
  may carry more than one token: the worker sends text as soon as it is printable); E2E =
  request sent to the ``done``/``error`` event; completion tokens from the ``done`` usage;
  TPOT = (E2E - TTFT) / (completion tokens - 1); errors by their ``code`` (the body of a non-200
  answer, or the ``error`` event), or ``client_<Exception>`` when the HTTP client fails.
* **Summary**: p50/p90/p99 (and mean) of TTFT, ITL, TPOT and E2E over the successful requests;
  request throughput and output token throughput = completed requests and completion tokens
  divided by the wall time from the first request sent to the last answer ended.
* **Engine baseline** (``--engine-baseline``): before any HTTP load, the same model is loaded
  in this process with :func:`worker.weights.loader.load_model` and the worker's engine, and
  ``Engine.generate`` runs ``--baseline-runs`` times (after ``--baseline-warmup``) with exactly
  the messages and sampling the gateway builds for the request (the gateway's own
  :func:`gateway.api.medgemma.serving.sampling_for`). Its TTFT is the call to ``generate`` to the
  first ``on_text`` callback, i.e. the moment the worker would publish the first ``token``
  event; the engine's internal ``first_token_s`` (prompt already encoded, first token id out)
  is reported too. The model is then freed, and only then is the stack started or loaded, so
  the two measurements never share the CPU. The overhead is stack TTFT p50 - engine TTFT p50
  (ms) and their ratio; the same for E2E, and whether the greedy answers were identical.
* **Spawned stack** (``--spawn-stack``): redis-server, one worker and the gateway on free ports
  of 127.0.0.1 (:mod:`devstack.processes`), a temporary models.json, and an API key made for
  the run. Afterwards the ``timing`` of each job's ``done`` event (read from the job's log in
  that Redis: gateway created the job, worker started it, engine's first token; one clock)
  splits each request's TTFT: request sent -> job created -> worker started -> first token
  -> first ``token`` event at the client (:mod:`bench.stages`).
* **Noise.** Every phase records how much CPU the machine, this program with the stack it
  started, and everything else ("foreign") used; more than 5% foreign CPU prints a warning.
  ``--quiet-cpu PCT`` waits (bounded by ``--quiet-timeout``) for a quiet machine before each
  phase.

Everything runs on this machine, so on a small CPU the client, the gateway, Redis and the worker
compete for the same cores: the figures are the cost of the stack *on that machine*, not of the
network or of a GPU deployment.

The parts, in ``bench/``: ``options`` (this command line), ``workload`` (prompt, bodies,
arrivals), ``clients`` (the timed SSE clients), ``load`` (the load loops, their summary),
``stats`` (percentiles, CPU meters), ``entries`` (the models.json entries), ``spawn`` (the
spawned stack, machine and source records), ``stages`` (the TTFT breakdown), ``baseline``
(engine in-process, ``transformers serve``), ``report`` (tables and JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the project's packages importable
    sys.path.insert(0, str(ROOT))

from bench.baseline import (  # noqa: E402
    baseline_phase,
    overhead,
    transformers_serve_phase,
    versus,
)
from bench.entries import resolve_model  # noqa: E402
from bench.load import Results, run_load, summarize  # noqa: E402
from bench.options import parse_args  # noqa: E402
from bench.report import per_request_rows, print_report, write_report  # noqa: E402
from bench.spawn import SpawnedStack, machine_info, source_info, temp_workdir  # noqa: E402
from bench.stages import breakdown_from_redis  # noqa: E402
from bench.stats import (  # noqa: E402
    CpuMeter,
    cpu_busy,
    cpu_per_token,
    memory_kib,
    pin,
    wait_quiet,
)
from bench.workload import request_body, synthetic_prompt  # noqa: E402
from shared.registry import Registry  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prompt = synthetic_prompt(args.prompt_words)
    mode = (
        f"closed loop, concurrency {args.concurrency or 1}"
        if args.request_rate is None
        else f"open loop, Poisson {args.request_rate:g} req/s, cap {args.concurrency or 'none'}"
    )
    report: dict[str, Any] = {
        "benchmark": "bench/serve.py",
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": [Path(sys.executable).name, *sys.argv],
        "machine": machine_info(),
        "source": source_info(),
        "cpu": {"busy_before_pct": cpu_busy()},
    }
    with temp_workdir(args.keep_workdir) as workdir:
        spawn: tuple[Registry, str] | None = None
        if args.spawn_stack:
            spawn = resolve_model(args.spawn_stack, args, workdir)
            if args.model != spawn[1]:
                print(f"--spawn-stack serves {spawn[1]!r}: sending model {spawn[1]!r}")
            args.model = spawn[1]
        body = request_body(args, prompt)
        if args.engine_baseline:
            base, report["cpu"]["baseline"] = baseline_phase(args, prompt, workdir, spawn)
            report["engine_baseline"] = base
        warm, results, duration = _stack_phase(args, body, mode, spawn, workdir, report)
        if args.vs_transformers_serve:
            report["transformers_serve"] = transformers_serve_phase(args, prompt, workdir)

    report["config"] = _config(args, mode, prompt, body)
    summary = summarize(results, duration)
    report["stack"] = {
        "summary": summary,
        "warmup": [asdict(r) for r in warm],
        "per_request": per_request_rows(results),
    }
    if "engine_baseline" in report:
        report["overhead"] = overhead(summary, report["engine_baseline"], results)
    if "transformers_serve" in report:
        report["vs_transformers_serve"] = versus(summary, results, report["transformers_serve"])
    print_report(report)
    if args.out is not None:
        write_report(report, args.out)
    return 0 if summary["failed"] == 0 else 1


def _stack_phase(
    args: argparse.Namespace,
    body: dict[str, Any],
    mode: str,
    spawn: tuple[Registry, str] | None,
    workdir: Path,
    report: dict[str, Any],
) -> Results:
    """The HTTP load on the stack (spawned for it with ``--spawn-stack``); its CPU, and with a
    spawned stack the gateway's memory and the TTFT breakdown, go into ``report``."""
    stack: SpawnedStack | None = None
    try:
        if spawn is not None:
            print(f"starting redis, a worker for {spawn[1]} and the gateway ...", flush=True)
            started = time.perf_counter()
            stack = SpawnedStack(spawn[0], spawn[1], workdir, args)
            args.base_url = stack.base_url
            report["spawned_stack_ready_s"] = time.perf_counter() - started
            if args.pin_gateway is not None:  # the gateway alone on its core(s)
                rest = set(os.sched_getaffinity(0)) - args.pin_gateway
                for name, pid in {"client": os.getpid(), **stack.named_pids()}.items():
                    pin(pid, args.pin_gateway if name == "gateway" else rest)
                report["pinned"] = {"gateway": sorted(args.pin_gateway), "rest": sorted(rest)}
        print(f"load: {args.num_requests} requests, {mode}, on {args.base_url}", flush=True)
        wait_quiet(args.quiet_cpu, args.quiet_timeout, "the HTTP load")
        named = {"client": os.getpid()}
        if stack is not None:
            named.update(stack.named_pids())
        meter = CpuMeter(list(named.values()), list(named))
        warm, results, duration = asyncio.run(run_load(args, body))
        report["cpu"]["load"] = load = meter.stop()
        # CPU per token the clients received (user + system time over the load phase).
        received = sum(r.completion_tokens or 0 for r in (*warm, *results))
        per_token = cpu_per_token(load, received)
        if per_token is not None:
            load["cpu_us_per_token"] = per_token
        if stack is not None:
            report["gateway_memory_kib"] = memory_kib(stack.gateway.popen.pid)
            try:
                report["worker_breakdown"] = breakdown_from_redis(stack.redis_url, results)
            except RedisError as exc:
                print(f"could not read the jobs' timing from Redis: {exc}", file=sys.stderr)
    finally:
        if stack is not None:
            stack.stop()
    return warm, results, duration


def _config(
    args: argparse.Namespace, mode: str, prompt: str, body: dict[str, Any]
) -> dict[str, Any]:
    return {
        "base_url": args.base_url,
        "model": args.model,
        "mode": mode,
        "concurrency": args.concurrency,
        "request_rate": args.request_rate,
        "num_requests": args.num_requests,
        "warmup": args.warmup,
        "prompt_words": args.prompt_words,
        "prompt_sha256": hashlib.sha256(prompt.encode()).hexdigest(),
        "max_tokens": args.max_tokens,
        "verbosity": args.verbosity,
        "spawn_stack": args.spawn_stack,
        "engine_baseline": args.engine_baseline,
        "device": args.device,
        "request_body": {k: v for k, v in body.items() if k != "user_message"},
    }


if __name__ == "__main__":
    sys.exit(main())
