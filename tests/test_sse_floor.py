"""bench/sse_floor.py at toy size, so the floor benchmark cannot rot: every answer arrives
whole through the lean client, and the server's CPU per frame is reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_floor_benchmark_serves_every_frame_and_reports_its_cost(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "sse_floor.py"), "--concurrency", "20",
         "--max-tokens", "40", "--tokens-per-s", "200", "--ramp-up", "0", "--out", str(out)],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip
    report = json.loads(out.read_text())
    summary = report["summary"]
    assert summary["completed"] == summary["requests"] == 20
    assert summary["completion_tokens"]["p50"] == 40  # read from the done frame's usage
    assert summary["token_events_per_request"]["p50"] == 40  # one frame per token
    # (CPU is counted in clock ticks: a toy load may round to 0)
    assert isinstance(report["server_us_per_token"], float)
    assert "server" in report["cpu"]["system_share"]
