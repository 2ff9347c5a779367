"""What one token event costs Redis: the worker's fenced write, as the worker sends it.

Starts a redis-server of its own, claims a job, and writes ``--tokens`` token events through
the worker's own :class:`~worker.runtime.events.EventPublisher` and
:class:`~worker.runtime.token_writer.TokenWriter` (never joined: one event per token, as a
writer that keeps up sends them), ``--jobs`` jobs at once. Reports Redis's CPU time per event
(``INFO cpu``, user + sys) and the wall time per event. Run it from two checkouts, one after
the other, to compare two versions of the write (its script is imported from the tree the
command runs in):

    python bench/emit_cost.py --tokens 20000 --jobs 4 --out docs/bench/emit_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make the project's packages importable
    sys.path.insert(0, str(ROOT))

from redis import Redis  # noqa: E402

from bench.spawn import machine_info, source_info  # noqa: E402
from devstack.processes import free_port, start_redis  # noqa: E402
from shared.keys import Keys  # noqa: E402
from worker.runtime.events import EventPublisher  # noqa: E402
from worker.runtime.token_writer import TokenWriter  # noqa: E402

KEYS = Keys()


def _redis_cpu_s(client: Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def one_round(
    client: Redis, writer: TokenWriter, tokens: int, jobs: int, tag: str
) -> dict[str, float]:
    """``jobs`` threads write ``tokens`` events in all; Redis CPU and wall time per event."""
    pubs = []
    for j in range(jobs):
        job_id = f"bench-{tag}-{j}"
        client.set(KEYS.job_claim(job_id), "w-bench", px=600_000)
        pubs.append(EventPublisher(client, KEYS, job_id, ttl_s=600, owner="w-bench", writer=writer))
    each = tokens // jobs

    def write(pub: EventPublisher) -> None:
        for i in range(each):
            pub.token(f"tok{i} ")
        writer.flush(pub._outbox)

    threads = [threading.Thread(target=write, args=(p,)) for p in pubs]
    cpu0, t0 = _redis_cpu_s(client), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - t0, _redis_cpu_s(client) - cpu0
    written = sum(client.xlen(KEYS.job_log(p.job_id)) for p in pubs)
    assert written == each * jobs, (written, each * jobs)
    client.delete(*[KEYS.job_log(p.job_id) for p in pubs])
    return {
        "redis_cpu_us_per_event": 1e6 * cpu / written,
        "wall_us_per_event": 1e6 * wall / written,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=20_000, help="events per round")
    parser.add_argument("--jobs", type=int, default=4, help="jobs writing at once")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        port = free_port()
        proc = start_redis(port, Path(workdir))
        client = Redis(port=port, decode_responses=True)
        writer = TokenWriter(client, max_deltas=0)  # one event per token
        writer.start()
        try:
            one_round(client, writer, args.tokens // 4, args.jobs, "warmup")
            rounds = [
                one_round(client, writer, args.tokens, args.jobs, str(r))
                for r in range(args.rounds)
            ]
        finally:
            writer.stop()
            client.close()
            proc.stop()
    result = {
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "source": source_info(),
        "rounds": rounds,
        **{
            f"{key}_median": statistics.median(r[key] for r in rounds)
            for key in ("redis_cpu_us_per_event", "wall_us_per_event")
        },
    }
    print(json.dumps({k: v for k, v in result.items() if k.endswith("median")}, indent=1))  # noqa: T201
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
