"""The report: printed tables, and the JSON written to ``--out``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.clients import RequestResult

FOREIGN_CPU_WARN_PCT = 5.0
MAX_SAVED_GAPS = 20_000


def per_request_rows(results: Sequence[RequestResult]) -> list[dict[str, Any]]:
    """Per-request rows for the report; past MAX_SAVED_GAPS inter-token gaps in all, the gaps
    are left out (the summary's percentiles were computed from all of them)."""
    rows = [asdict(r) for r in results]
    if sum(len(r["itl_s"]) for r in rows) <= MAX_SAVED_GAPS:
        return rows
    return [{**r, "itl_s": None} for r in rows]


def write_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out}")


def _fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


# (label, key) of each row of the latency tables
LATENCY_ROWS = tuple((k, f"{k}_ms") for k in ("ttft", "itl", "tpot", "e2e"))
ENGINE_ROWS = (
    ("ttft (first on_text)", "ttft_ms"),
    ("first token id", "engine_first_token_ms"),
    *LATENCY_ROWS[1:],
)
STAGE_ROWS = (
    ("client -> job created", "client_to_job_created_ms"),
    ("job created -> started", "job_created_to_worker_start_ms"),
    ("engine first token", "engine_first_token_ms"),
    ("after first token", "after_first_token_ms"),
)


def print_table(title: str, section: dict[str, Any], rows: Sequence[tuple[str, str]]) -> None:
    """One row per (label, key) of ``section``: each a :func:`bench.stats.describe` result."""
    cols = ["n", "mean", "p50", "p90", "p99", "min", "max"]
    print(f"\n{title}")
    print(f"  {'metric':<24}" + "".join(f"{c:>10}" for c in cols))
    for label, key in rows:
        stats = section[key]
        print(f"  {label:<24}" + "".join(f"{_fmt(stats.get(c)):>10}" for c in cols))


def print_report(report: dict[str, Any]) -> None:
    _print_cpu(report)
    _print_stack(report)
    base = report.get("engine_baseline")
    if base:
        print(
            f"\n== engine in-process: {base['model_class']} on {base['device']} "
            f"({base.get('dtype', '-')}), {base['runs']} runs after {base['warmup']} warm-up, "
            f"{base['torch_threads']} torch threads"
        )
        print_table("  engine latency (ms)", base, ENGINE_ROWS)
    bd = report.get("worker_breakdown")
    if bd:
        title = f"  stack TTFT along the way, from the jobs' done events ({bd['matched_jobs']} jobs"
        print_table(title + ", ms)", bd, STAGE_ROWS)
    if report.get("overhead"):
        _print_overhead(report)
    if report.get("transformers_serve"):
        _print_transformers_serve(report)


def _print_cpu(report: dict[str, Any]) -> None:
    cpu = report["cpu"]
    phases = [k for k in ("baseline", "load") if k in cpu]
    print(
        "\n== CPU, % of all cores (machine / ours / foreign): "
        + "  ".join(
            f"{k} {cpu[k]['machine_busy_pct']:.0f}/{cpu[k]['own_busy_pct']:.0f}/"
            f"{cpu[k]['foreign_busy_pct']:.0f}"
            for k in phases
        )
    )
    cores = cpu.get("load", {}).get("cores_used")
    if cores:
        print(
            "  load phase, cores used per process: "
            + "  ".join(f"{name} {v:.2f}" for name, v in cores.items() if v is not None)
        )
    per_token = cpu.get("load", {}).get("cpu_us_per_token")
    if per_token:
        print(
            "  CPU per token received, us: "
            + "  ".join(f"{name} {v:.1f}" for name, v in per_token.items())
        )
    system = cpu.get("load", {}).get("system_share")
    if system:
        print(
            "  of which system (kernel) time, %: "
            + "  ".join(f"{name} {100 * v:.0f}" for name, v in system.items() if v is not None)
        )
    mem = report.get("gateway_memory_kib")
    if mem:
        print(
            f"  gateway memory: {mem.get('VmRSS', 0) / 1024:.0f} MiB now, "
            f"{mem.get('VmHWM', 0) / 1024:.0f} MiB peak"
        )
    if any(cpu[k]["foreign_busy_pct"] > FOREIGN_CPU_WARN_PCT for k in phases):
        print(
            f"  WARNING: other processes used more than {FOREIGN_CPU_WARN_PCT:g}% of the CPU "
            "during a phase; the figures below are skewed. Run again on a quiet machine."
        )


def _print_stack(report: dict[str, Any]) -> None:
    s = report["stack"]["summary"]
    print(
        f"\n== stack: {report['config']['base_url']}  model {report['config']['model']}  "
        f"({report['config']['mode']})"
    )
    print(
        f"  completed {s['completed']}/{s['requests']}  failed {s['failed']}  errors "
        f"{s['errors'] or '{}'}  duration {s['duration_s']:.2f} s"
    )
    print(
        f"  request throughput {_fmt(s['request_throughput_rps'], 3)} req/s  output "
        f"{_fmt(s['output_token_throughput_tok_s'], 1)} tok/s  prompt tokens "
        f"{s['prompt_tokens']}  completion tokens p50 {_fmt(s['completion_tokens']['p50'])}"
    )
    print_table("  stack latency (ms)", s, LATENCY_ROWS)


def _print_overhead(report: dict[str, Any]) -> None:
    ov = report["overhead"]
    closed_one = (
        report["config"]["request_rate"] is None and (report["config"]["concurrency"] or 1) == 1
    )
    print(
        "\n== overhead (medians of this run)"
        + ("" if closed_one else ": NOT like for like, the engine ran one request at a time")
    )
    for key in ("ttft", "e2e"):
        print(
            f"  {key.upper():<5} stack p50 {_fmt(ov[f'{key}_stack_p50_ms'])} ms  engine p50 "
            f"{_fmt(ov[f'{key}_engine_p50_ms'])} ms  overhead "
            f"{_fmt(ov[f'{key}_overhead_ms'])} ms  ratio {_fmt(ov[f'{key}_ratio'], 2)}x  "
            f"(min vs min: {_fmt(ov[f'{key}_overhead_min_ms'])} ms)"
        )
    print(
        f"  same prompt tokens: {ov['same_prompt']} ({ov['prompt_tokens_stack']} / "
        f"{ov['prompt_tokens_engine']})  same greedy answer: {ov['same_answer']}  "
        "completion tokens "
        f"stack {ov['completion_tokens_stack_p50']} / engine "
        f"{ov['completion_tokens_engine_p50']}"
    )


def _print_transformers_serve(report: dict[str, Any]) -> None:
    hf = report["transformers_serve"]
    t = hf["summary"]
    print(
        f"\n== transformers serve, same load (continuous batching "
        f"{hf['continuous_batching']}): completed {t['completed']}/{t['requests']}  "
        f"errors {t['errors'] or '{}'}  output {_fmt(t['output_token_throughput_tok_s'])} "
        f"tok/s  cores: "
        + "  ".join(f"{k} {v:.2f}" for k, v in hf["cpu"].get("cores_used", {}).items())
    )
    rows = [row for row in LATENCY_ROWS if row[0] != "tpot"]
    print_table("  transformers serve latency (ms)", t, rows)
    vs = report["vs_transformers_serve"]
    print(
        f"  stack / transformers serve: output tok/s {_fmt(vs['throughput_ratio'], 2)}x, "
        f"TTFT p50 {_fmt(vs['ttft_p50_ratio'], 2)}x, E2E p50 {_fmt(vs['e2e_p50_ratio'], 2)}x;"
        f" prompt tokens {vs['prompt_tokens']}, completion p50 "
        f"{vs['completion_tokens_p50']}, same greedy answer {vs['same_answer']}"
    )
