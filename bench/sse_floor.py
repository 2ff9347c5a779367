"""The floor under the relay: what uvicorn alone costs per SSE frame on this machine.

A bare ASGI app (no FastAPI, no middleware, no Redis, no JSON decoding) answers
``POST /medgemma`` with the seed API's frames, one ``event: token`` frame every
``1 / --tokens-per-s`` seconds per stream, then ``event: done``. It runs in its own uvicorn
process with the gateway's settings (uvloop, httptools), optionally pinned to one core, and
``bench/serve.py``'s lean client drives it from this process on the other cores. The
server's CPU time over the load, divided by the tokens the clients received, is the cost of
one frame through uvicorn and the kernel: the part of the gateway's CPU per relayed token
(``bench/serve.py``) that no change to the gateway's own code can remove.

    python bench/sse_floor.py --pin-server 0 --concurrency 300 --max-tokens 150 \\
        --tokens-per-s 10 --out docs/bench/sse_floor_300x10.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the project's packages importable
    sys.path.insert(0, str(ROOT))

from bench.load import run_load, summarize  # noqa: E402
from bench.options import cpu_set  # noqa: E402
from bench.options import parse_args as serve_args  # noqa: E402
from bench.spawn import machine_info, source_info  # noqa: E402
from bench.stats import CpuMeter, cpu_per_token, memory_kib, pin  # noqa: E402
from devstack.processes import free_port, listening, wait_for  # noqa: E402

_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]


def make_app(tokens: int, interval_s: float) -> Any:
    """The bare ASGI app: ``tokens`` frames per answer, ``interval_s`` apart."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:  # the request body, unread
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
        for i in range(1, tokens + 1):
            await asyncio.sleep(interval_s)
            frame = f'id: {i}\r\nevent: token\r\ndata: {{"text": "tok{i} "}}\r\n\r\n'
            await send({"type": "http.response.body", "body": frame.encode(), "more_body": True})
        usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
        done = f"id: {tokens + 1}\r\nevent: done\r\ndata: {json.dumps({'usage': usage})}\r\n\r\n"
        await send({"type": "http.response.body", "body": done.encode(), "more_body": False})

    return app


def serve(port: int, tokens: int, interval_s: float) -> None:
    import uvicorn

    app = make_app(tokens, interval_s)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=300)
    p.add_argument("--max-tokens", type=int, default=150)
    p.add_argument("--tokens-per-s", type=float, default=10.0)
    p.add_argument("--ramp-up", type=float, default=5.0)
    p.add_argument("--pin-server", type=cpu_set, default=None, metavar="CPUS", help="e.g. 0")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # the server
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve, args.max_tokens, 1.0 / args.tokens_per_s)
        return 0

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--max-tokens", str(args.max_tokens),
         "--tokens-per-s", str(args.tokens_per_s)],
    )  # fmt: skip
    try:
        wait_for(lambda: listening("127.0.0.1", port), 30, "the bare uvicorn server to listen")
        if args.pin_server is not None:
            pin(server.pid, args.pin_server)
            pin(os.getpid(), set(os.sched_getaffinity(0)) - args.pin_server)
        load_args = serve_args(
            [
                "--base-url", f"http://127.0.0.1:{port}", "--api-key", "none",
                "--lean-client", "--concurrency", str(args.concurrency),
                "--num-requests", str(args.concurrency), "--warmup", "1",
                "--ramp-up", str(args.ramp_up),
            ]
        )  # fmt: skip
        meter = CpuMeter([server.pid], ["server"])
        warm, results, duration = asyncio.run(run_load(load_args, {"user_message": []}))
        load = meter.stop()
        received = sum(r.completion_tokens or 0 for r in (*warm, *results))
        report: dict[str, Any] = {
            "benchmark": "sse_floor",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv),
            "machine": machine_info(),
            "source": source_info(),
            "cpu": load,
            "server_us_per_token": (cpu_per_token(load, received) or {}).get("server"),
            "server_memory_kib": memory_kib(server.pid),
            "summary": summarize(results, duration),
        }
    finally:
        server.terminate()
        server.wait(10)
    summary = report["summary"]
    print(
        f"{summary['completed']}/{summary['requests']} answers, "
        f"{summary['output_token_throughput_tok_s']:.0f} tok/s; server CPU per frame "
        f"{report['server_us_per_token']:.1f} us, of which kernel "
        f"{100 * (load['system_share']['server'] or 0):.0f}%"
    )
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
