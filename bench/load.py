"""The load loops and their summary.

``--concurrency N`` alone is a closed loop: N clients, each sends its next request when the
previous answer has ended. ``--request-rate R`` is an open loop: requests start at Poisson
arrival times (:func:`bench.workload.arrival_gaps`), whether or not earlier ones have finished;
``--concurrency`` then caps how many are in flight. ``--warmup`` requests run one at a time
before the measured ones and are reported apart. ``--lean-client`` runs the closed loop with
:func:`bench.clients.stream_counted` (aiohttp), its clients' starts spread over ``--ramp-up``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import aiohttp
import httpx

from bench.clients import (
    OPENAI_MARKERS,
    SEED_MARKERS,
    RequestResult,
    stream_counted,
    stream_one,
    stream_openai,
)
from bench.stats import describe
from bench.workload import arrival_gaps

Results = tuple[list[RequestResult], list[RequestResult], float]


async def run_load(args: argparse.Namespace, body: dict[str, Any]) -> Results:
    """Warm-up requests, then the measured ones. Returns (warmup, measured, duration_s)."""
    conc = args.concurrency or (1 if args.request_rate is None else args.num_requests)
    timeout = httpx.Timeout(args.request_timeout, connect=10.0)
    limits = httpx.Limits(max_connections=conc + 1, max_keepalive_connections=conc + 1)
    headers = {"Authorization": f"Bearer {args.api_key}"}
    if args.lean_client:
        return await _run_load_counted(args, body, conc, headers)
    stream = stream_openai if args.api == "openai" else stream_one
    async with httpx.AsyncClient(
        base_url=args.base_url, headers=headers, timeout=timeout, limits=limits
    ) as client:
        warm: list[RequestResult] = []
        for i in range(args.warmup):
            warm.append(await stream(client, body, -1 - i, time.perf_counter()))
        results: list[RequestResult] = []
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            results.append(await stream(client, body, i, t0))

        if args.request_rate is None:
            jobs = [asyncio.create_task(task) for task in _closed_loop(one, args, conc)]
        else:
            sem = asyncio.Semaphore(conc)
            gaps = arrival_gaps(args.request_rate, args.seed)

            async def open_request(i: int) -> None:
                async with sem:
                    await one(i)

            jobs = []
            for i in range(args.num_requests):
                jobs.append(asyncio.create_task(open_request(i)))
                if i < args.num_requests - 1:
                    await asyncio.sleep(next(gaps))
        duration = await _bounded(jobs, args.max_duration, t0)
    results.sort(key=lambda r: r.index)
    return warm, results, duration


async def _run_load_counted(
    args: argparse.Namespace, body: dict[str, Any], conc: int, headers: dict[str, str]
) -> Results:
    """:func:`run_load` with :func:`stream_counted` (closed loop only)."""
    openai = args.api == "openai"
    url = f"{args.base_url}/v1/chat/completions" if openai else f"{args.base_url}/medgemma"
    markers = OPENAI_MARKERS if openai else SEED_MARKERS
    timeout = aiohttp.ClientTimeout(total=args.request_timeout, connect=10.0)
    connector = aiohttp.TCPConnector(limit=conc + 1)
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=connector
    ) as session:
        warm = [
            await stream_counted(session, url, body, -1 - i, time.perf_counter(), markers)
            for i in range(args.warmup)
        ]
        results: list[RequestResult] = []
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            results.append(await stream_counted(session, url, body, i, t0, markers))

        # Clients start spread over --ramp-up seconds, so a thousand streams do not all
        # arrive in the same millisecond.
        jobs = [asyncio.create_task(task) for task in _closed_loop(one, args, conc, args.ramp_up)]
        duration = await _bounded(jobs, args.max_duration, t0)
    results.sort(key=lambda r: r.index)
    return warm, results, duration


def _closed_loop(
    one: Callable[[int], Awaitable[None]],
    args: argparse.Namespace,
    conc: int,
    ramp_up_s: float = 0.0,
) -> list[Coroutine[Any, Any, None]]:
    """``conc`` clients sharing the request numbers: each sends its next request when its
    previous answer has ended; client k starts ``ramp_up_s * k / conc`` s late."""
    counter = iter(range(args.num_requests))

    async def client(delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        for i in counter:
            await one(i)

    return [client(ramp_up_s * k / conc) for k in range(conc)]


async def _bounded(jobs: list[asyncio.Task[None]], max_duration: float, t0: float) -> float:
    """Wait for the load's tasks, at most ``--max-duration`` s; the phase's duration."""
    try:
        await asyncio.wait_for(asyncio.gather(*jobs), max_duration)
    except TimeoutError:
        print(f"stopped after --max-duration {max_duration:g} s", file=sys.stderr)
    return time.perf_counter() - t0


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict[str, Any]:
    """p50/p90/p99 (and mean) of TTFT, ITL, TPOT and E2E over the successful requests;
    request and output token throughput over the phase's wall time."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    errors = Counter(r.error_code for r in results if not r.ok)
    return {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(errors),
        "duration_s": duration_s,
        "request_throughput_rps": len(ok) / duration_s if duration_s > 0 else None,
        "output_token_throughput_tok_s": out_tokens / duration_s if duration_s > 0 else None,
        "completion_tokens_total": out_tokens,
        "completion_tokens": describe([float(r.completion_tokens or 0) for r in ok]),
        "token_events_per_request": describe([float(r.token_events) for r in ok]),
        "prompt_tokens": ok[0].prompt_tokens if ok else None,
        "ttft_ms": describe(ttft, 1000.0),
        "itl_ms": describe(itl, 1000.0),
        "tpot_ms": describe(tpot, 1000.0),
        "e2e_ms": describe(e2e, 1000.0),
        "distinct_answers": len({r.text_sha256 for r in ok}),
    }
