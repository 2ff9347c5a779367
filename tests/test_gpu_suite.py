"""bench/gpu_suite.py at toy size on the CPU: every measurement of the GPU suite runs and lands
in its JSON, so the script still works the day a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_gpu_suite_smoke_measures_every_config(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["configs"]) == {"bf16", "8bit-torchao"}
    labels = {}
    for name, result in report["configs"].items():
        assert "error" not in result, (name, result)
        labels[name] = result["quantization"]
        assert result["batch1"]["tok_s"] > 0
        assert result["batch1"]["paths"] == ["single"]
        for n in (2, 4):
            assert result[f"c{n}"]["tokens"] > 0
            assert "batch" in " ".join(result[f"c{n}"]["paths"]), result[f"c{n}"]
        assert result["ttft_long"]["prompt_tokens"] >= 100
        assert result["ttft_long"]["ms"] > 0
        assert result["weight_gib"] > 0
    assert labels == {"bf16": "none", "8bit-torchao": "8bit-torchao"}
    # One table row per configuration on stdout.
    assert "8bit-torchao" in proc.stdout and "batch-1 tok/s" in proc.stdout
