"""Does background work delay a clinician? Interactive time to first token, with and without a
flood of background requests on one worker.

Spawns the stack (Redis, one worker, the gateway; ``bench/spawn.py``'s ``SpawnedStack``) and
runs three phases on it, one after the other, with the same interactive probe: one clinician
asking a short question, waiting for the whole answer, then asking the next.

* ``alone`` — the probe only.
* ``background flood`` — ``--flood`` clients keep background requests running the whole phase
  (``<model>@background``, the alias a front end's task model uses), each as long as a title
  or a summary may get (``--flood-tokens``).
* ``same flood, interactive`` — the same clients send the same requests as interactive work:
  what a clinician gets when every request is equal (the stack before priorities).

Reported: the probe's time to first token (p50, p90) in each phase and the ratios to
``alone``, where it went (``bench/stages.py``: gateway, queue and delivery, engine, relay), and
how many background answers finished during the flood (starved or not).

    python bench/priorities.py --spawn-stack demo --worker-concurrency 4 --out report.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the project's packages importable
    sys.path.insert(0, str(ROOT))

from bench import clients, entries, spawn, stages, stats, workload  # noqa: E402

QUESTION = "What are the first steps in treating a patient with suspected sepsis?"
FLOOD_TEXT = (
    "Summarise this conversation in one title of at most ten words: a patient with chest pain "
    "and a cough for three days, fever 38.2, white cells 12.4, CRP 85."
)


async def _flood_client(
    client: httpx.AsyncClient, model: str, tokens: int, stop: asyncio.Event, done: list[float]
) -> None:
    while not stop.is_set():
        res = await clients.stream_openai(
            client,
            workload.openai_body(model, FLOOD_TEXT, max_tokens=tokens),
            0,
            time.perf_counter(),
        )
        if res.ok:
            done.append(time.perf_counter())
        else:
            await asyncio.sleep(0.5)  # (an error: do not spin)


async def phase(
    base_url: str, key: str, model: str, args: argparse.Namespace, flood_model: str | None
) -> tuple[dict[str, Any], list[clients.RequestResult]]:
    limits = httpx.Limits(max_connections=args.flood + 8)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(
        base_url=base_url, headers=headers, timeout=args.request_timeout, limits=limits
    ) as client:
        stop = asyncio.Event()
        flood_done: list[float] = []
        flood = [
            asyncio.create_task(
                _flood_client(client, flood_model, args.flood_tokens, stop, flood_done)
            )
            for _ in range(args.flood)
            if flood_model is not None
        ]
        if flood:
            await asyncio.sleep(args.flood_head_start)  # the flood is running when probes start
        ttfts: list[float] = []
        probes: list[clients.RequestResult] = []
        errors = 0
        started = time.perf_counter()
        for i in range(args.warmup + args.probes):
            res = await clients.stream_openai(
                client,
                workload.openai_body(model, QUESTION, max_tokens=args.probe_tokens),
                i,
                time.perf_counter(),
            )
            if i >= args.warmup:
                probes.append(res)
                if res.ok and res.ttft_s is not None:
                    ttfts.append(res.ttft_s)
                else:
                    errors += 1
            await asyncio.sleep(args.think_s)
        elapsed = time.perf_counter() - started
        stop.set()
        for task in flood:
            task.cancel()
        for task in flood:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return {
        "ttft_ms": stats.describe(ttfts, 1000.0),
        "probe_errors": errors,
        "flood_answers_finished": sum(1 for t in flood_done if t >= started),
        "duration_s": round(elapsed, 1),
    }, probes


def _stages_line(breakdown: dict[str, Any]) -> str:
    if not breakdown["matched_jobs"]:
        return f"{'':>24}  no job timings matched"
    parts = ", ".join(f"{s} {breakdown[f'{s}_ms']['p50']:.1f}" for s in stages.STAGES)
    return f"{'':>24}  stage p50s (ms): {parts}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--spawn-stack", default="demo", help="demo, loadtest, or a model folder")
    p.add_argument("--worker-concurrency", type=int, default=4)
    p.add_argument("--flood", type=int, default=8, help="background clients")
    p.add_argument("--flood-tokens", type=int, default=256, help="max_tokens of each")
    p.add_argument("--flood-head-start", type=float, default=5.0)
    p.add_argument("--probes", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--probe-tokens", type=int, default=32)
    p.add_argument("--think-s", type=float, default=1.0, help="pause between two probes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument(
        "--skip-equal-flood",
        action="store_true",
        help="leave out the third phase (the flood sent as interactive work)",
    )
    p.add_argument("--keep-workdir", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    # The other options SpawnedStack and resolve_model read: bench/serve.py's defaults.
    return spawn.with_stack_defaults(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {
        "machine": spawn.machine_info(),
        "source": spawn.source_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "phases": {},
    }
    with spawn.temp_workdir(args.keep_workdir) as workdir:
        registry, model = entries.resolve_model(args.spawn_stack, args, workdir)
        stack = spawn.SpawnedStack(registry, model, workdir, args)
        try:
            phases = {
                "alone": None,
                "background flood": f"{model}@background",
                "same flood, interactive": model,
            }
            if args.skip_equal_flood:
                del phases["same flood, interactive"]
            for name, flood_model in phases.items():
                result, probes = asyncio.run(
                    phase(stack.base_url, args.api_key, model, args, flood_model)
                )
                result["stages"] = stages.breakdown_from_redis(stack.redis_url, probes)
                report["phases"][name] = result
                t = result["ttft_ms"]
                print(
                    f"{name:>24}: TTFT p50 {t['p50']:.0f} ms, p90 {t['p90']:.0f} ms "
                    f"({t['n']} probes, {result['probe_errors']} errors); "
                    f"{result['flood_answers_finished']} flood answers finished",
                    flush=True,
                )
                print(_stages_line(result["stages"]), flush=True)
        finally:
            stack.stop()
    alone = report["phases"]["alone"]["ttft_ms"]["p50"]
    for name in report["phases"]:
        if name == "alone":
            continue
        ratio = report["phases"][name]["ttft_ms"]["p50"] / alone
        report["phases"][name]["p50_vs_alone"] = round(ratio, 2)
        print(f"{name:>24}: p50 TTFT {ratio:.2f}x alone")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
