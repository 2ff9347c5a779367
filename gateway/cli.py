"""``medgemma-ops fleet``: the fleet at a glance, from ``GET /admin/fleet``.

Runs as the ``medgemma-ops`` console script or ``python -m gateway.cli``; it is installed with
the gateway (``docker compose exec gateway medgemma-ops fleet``) and needs only the standard
library. The admin key comes from ``--api-key`` or, better (a command line is visible to other
users in ``ps``), from ``MEDGEMMA_API_KEY``. Exit status: 0 ok, 1 the gateway refused or could
not be reached (the line says why), 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
DEFAULT_URL = "http://127.0.0.1:8000"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgemma-ops", description="Operate a MedGemma serving stack."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fleet = commands.add_parser(
        "fleet",
        help="workers, queues and recent errors per model",
        description="Print workers, queues and recent errors per model (GET /admin/fleet).",
    )
    fleet.add_argument(
        "--url",
        default=os.environ.get("MEDGEMMA_URL", DEFAULT_URL),
        help=f"the gateway (default: MEDGEMMA_URL, else {DEFAULT_URL})",
    )
    fleet.add_argument(
        "--api-key",
        default=os.environ.get("MEDGEMMA_API_KEY"),
        help="an admin API key (default: MEDGEMMA_API_KEY)",
    )
    fleet.add_argument("--json", action="store_true", help="print the raw JSON instead")
    fleet.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    return parser


def fetch_fleet(url: str, api_key: str, timeout_s: float) -> dict[str, Any]:
    req = urllib.request.Request(
        url.rstrip("/") + "/admin/fleet", headers={"Authorization": f"Bearer {api_key}"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        body: dict[str, Any] = json.load(resp)
    return body


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def render(fleet: dict[str, Any]) -> str:
    """The fleet as two tables: models (queues, errors) and workers."""
    models = [["MODEL", "WORKERS", "QUEUED", "CELERY", "DRAIN/S", "ERRORS"]]
    workers = [["MODEL", "WORKER", "AGE", "DEVICE", "QUANT", "JOBS", "GPU FREE", "VERSION"]]
    for m in fleet["models"]:
        recent = m["recent"]
        errors = "-" if not recent["requests"] else f"{recent['errors']}/{recent['requests']}"
        models.append(
            [
                m["model"],
                str(m["live_workers"]),
                str(m["queue_depth"]),
                str(m["celery_queue_length"]),
                f"{m['drain_rate_per_s']:.2f}",
                errors,
            ]
        )
        for w in m["workers"]:
            workers.append(
                [
                    m["model"],
                    w["worker_id"],
                    f"{w['heartbeat_age_s']:.1f}s",
                    w["device"],
                    w["quantization"],
                    f"{w['jobs_running']}/{w['concurrency']}",
                    _gib(w["gpu_memory_free_bytes"]),
                    w["version"],
                ]
            )
    window = int(fleet["error_window_s"])
    total = fleet["recent"]
    rate = "-" if total["error_rate"] is None else f"{100 * total['error_rate']:.1f}%"
    lines = _table(models)
    lines += ["", *(_table(workers) if len(workers) > 1 else ["no live workers"])]
    lines += ["", f"errors in the last {window} s: {total['errors']}/{total['requests']} ({rate})"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.api_key:
        print("an admin API key is needed: set MEDGEMMA_API_KEY or pass --api-key", file=sys.stderr)
        return EXIT_USAGE
    try:
        fleet = fetch_fleet(args.url, args.api_key, args.timeout)
    except urllib.error.HTTPError as exc:
        why = {401: "the API key is not valid", 404: "the API key is not an admin key"}
        print(f"{args.url}: HTTP {exc.code}: {why.get(exc.code, exc.reason)}", file=sys.stderr)
        return EXIT_PROBLEM
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"{args.url}: cannot reach the gateway: {reason}", file=sys.stderr)
        return EXIT_PROBLEM
    print(json.dumps(fleet, indent=2) if args.json else render(fleet))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
