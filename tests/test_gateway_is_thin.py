"""The gateway never imports an ML package: building and serving its app loads no torch,
transformers, bitsandbytes or accelerate (it sends jobs to workers by task name)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys
from fastapi.testclient import TestClient
from gateway.app import create_app
from gateway.core.settings import GatewaySettings
app = create_app(GatewaySettings(gateway_env="development"))
TestClient(app).get("/healthz")
ml = ("torch", "transformers", "bitsandbytes", "accelerate")
print(sorted(m for m in ml if m in sys.modules))
"""


def test_the_gateway_loads_no_ml_package() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
