"""bench/serve.py's command line: its options, their defaults, and the checks between them."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from bench.entries import DEMO_MODEL, ROOT
from bench.spawn import DEFAULT_SPAWN_KEY


def cpu_set(value: str) -> set[int]:
    """``0`` or ``0,2``: a set of CPU numbers (for pinning)."""
    return {int(c) for c in value.split(",")}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark POST /medgemma over HTTP (TTFT, ITL, E2E, throughput).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default=os.environ.get("MEDGEMMA_API_KEY"))
    p.add_argument("--model", default=DEMO_MODEL, help="model name sent in the request")
    p.add_argument("--concurrency", type=int, default=None, help="closed loop clients (default 1)")
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="Poisson open loop, requests/s; --concurrency then caps requests in flight",
    )
    p.add_argument("--num-requests", type=int, default=20)
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests sent first")
    p.add_argument("--prompt-words", type=int, default=64)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="max_new_tokens of the entry this program writes (--spawn-stack, or a folder "
        "given to --engine-baseline); the API itself has no such field",
    )
    p.add_argument("--verbosity", type=int, choices=(0, 1, 2, 3), default=None)
    p.add_argument("--system-message", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--max-duration", type=float, default=1800.0, help="bound on the load phase")
    p.add_argument("--engine-baseline", default=None, metavar="PATH_OR_MODEL")
    p.add_argument("--baseline-runs", type=int, default=10)
    p.add_argument("--baseline-warmup", type=int, default=1)
    p.add_argument(
        "--api",
        choices=("medgemma", "openai"),
        default="medgemma",
        help="POST /medgemma, or POST /v1/chat/completions (also for any OpenAI-compatible "
        "server, e.g. transformers serve)",
    )
    p.add_argument(
        "--spawn-stack",
        default=None,
        metavar="MODEL_DIR_OR_DEMO",
        help="a model folder, 'demo' (SmolLM2), or 'loadtest' (the load-test engine)",
    )
    p.add_argument(
        "--vs-transformers-serve",
        default=None,
        metavar="MODEL_DIR_OR_DEMO",
        help="after the stack, run the same load on `transformers serve` pinned to this model "
        "(continuous batching when --worker-concurrency > 1); needs --api openai",
    )
    p.add_argument(
        "--hf-continuous-batching",
        choices=("auto", "on", "off"),
        default="auto",
        help="transformers serve's --continuous-batching: auto = when --worker-concurrency > 1",
    )
    p.add_argument(
        "--hf-dtype", default="float32", help="transformers serve's --dtype (auto, bfloat16 ...)"
    )
    p.add_argument(
        "--pin-gateway",
        type=cpu_set,
        default=None,
        metavar="CPUS",
        help="--spawn-stack: run the gateway on these CPUs (e.g. 0) and everything else, "
        "this client included, on the others",
    )
    p.add_argument(
        "--lean-client",
        action="store_true",
        help="count token frames per network read instead of parsing them (aiohttp; either API, "
        "closed loop): for relay capacity with thousands of streams",
    )
    p.add_argument(
        "--ramp-up", type=float, default=0.0, help="spread the closed-loop clients' starts (s)"
    )
    p.add_argument("--workers", type=int, default=1, help="workers of the spawned stack")
    p.add_argument(
        "--worker-concurrency", type=int, default=1, help="WORKER_CONCURRENCY of each worker"
    )
    p.add_argument(
        "--worker-batch-tokens", type=int, default=None, help="WORKER_BATCH_TOKENS of each worker"
    )
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another setting of each spawned worker (repeatable), e.g. WORKER_COMPILE=off; "
        "WORKER_COMPILE applies to the engine baseline too",
    )
    p.add_argument(
        "--loadtest-tokens-per-s", type=float, default=50.0, help="per stream, 'loadtest' only"
    )
    p.add_argument("--loadtest-first-token-ms", type=float, default=0.0, help="simulated prefill")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--keep-workdir", action="store_true", help="keep the spawned stack's logs")
    p.add_argument(
        "--models-file",
        default=os.environ.get("MODELS_FILE", str(ROOT / "models.json")),
        help="registry for --engine-baseline MODEL_NAME",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="device of the engine baseline and of the spawned worker (WORKER_DEVICE)",
    )
    p.add_argument("--dtype", default="float32", help="dtype of an entry made for a folder")
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument(
        "--quiet-cpu",
        type=float,
        default=None,
        metavar="PCT",
        help="before each phase, wait until the machine's CPUs are at most PCT%% busy",
    )
    p.add_argument("--quiet-timeout", type=float, default=600.0, help="longest such wait, s")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if args.num_requests < 1:
        p.error("--num-requests must be at least 1")
    if args.concurrency is not None and args.concurrency < 1:
        p.error("--concurrency must be at least 1")
    if args.pin_gateway is not None and args.spawn_stack is None:
        p.error("--pin-gateway needs --spawn-stack")
    if args.lean_client and args.request_rate is not None:
        p.error("--lean-client drives a closed loop only")
    if args.vs_transformers_serve and args.api != "openai":
        p.error("--vs-transformers-serve compares the OpenAI API: add --api openai")
    if args.workers < 1 or args.worker_concurrency < 1:
        p.error("--workers and --worker-concurrency must be at least 1")
    if args.request_rate is not None and args.request_rate <= 0:
        p.error("--request-rate must be > 0")
    if args.max_tokens is not None and not (args.spawn_stack or args.engine_baseline):
        p.error(
            "--max-tokens only acts with --spawn-stack or --engine-baseline (the API has no "
            "max_tokens field; set max_new_tokens in the stack's models.json)"
        )
    if args.spawn_stack:
        args.api_key = args.api_key or DEFAULT_SPAWN_KEY
    elif not args.api_key:
        p.error("--api-key (or MEDGEMMA_API_KEY) is needed for a running stack")
    return args
