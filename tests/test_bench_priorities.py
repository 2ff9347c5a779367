"""bench/priorities.py end to end at toy size, so the benchmark cannot rot: it spawns the real
stack (Redis, a load-test worker, the gateway), runs its three phases, and its report splits
each probe's time to first token into stages that add up to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import priorities
from bench.stages import STAGES

pytestmark = pytest.mark.integration


def test_the_priorities_benchmark_reports_each_phase_and_where_its_time_went(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report.json"
    rc = priorities.main(
        [
            "--spawn-stack=loadtest",
            "--worker-concurrency=4",
            "--flood=2",
            "--flood-tokens=16",
            "--flood-head-start=0.5",
            "--probes=3",
            "--warmup=0",
            "--probe-tokens=4",
            "--think-s=0.05",
            f"--out={out}",
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    phases = report["phases"]
    assert list(phases) == ["alone", "background flood", "same flood, interactive"]
    for name, phase in phases.items():
        assert phase["probe_errors"] == 0, name
        assert phase["ttft_ms"]["n"] == 3, name
        stages = phase["stages"]
        assert stages["matched_jobs"] == 3, name  # every probe's job timing was found
        # Per probe the stages add up to its TTFT, so their means add up to the mean TTFT.
        total = sum(stages[f"{s}_ms"]["mean"] for s in STAGES)
        assert total == pytest.approx(phase["ttft_ms"]["mean"], abs=0.5), name
        if name != "alone":
            # (How many flood answers finish depends on timing: the probes pause them.)
            assert isinstance(phase["flood_answers_finished"], int), name
            assert phase["p50_vs_alone"] > 0, name
