"""Settings of a worker process (environment variables ``WORKER_*`` plus the common ones)."""

from __future__ import annotations

import os
import socket
from typing import Literal

from pydantic import Field

from shared.settings import CommonSettings


def _default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class WorkerSettings(CommonSettings):
    worker_model: str = Field(
        default="medgemma-4b", description="The models.json entry this worker serves."
    )
    worker_device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="auto picks the first CUDA GPU, else the CPU."
    )
    worker_concurrency: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Jobs one worker runs at once (Celery threads; with a model, the batch size).",
    )
    worker_batching: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: with WORKER_CONCURRENCY > 1, text jobs share the model through "
        "continuous batching (images and seeded requests run one at a time); off: every job "
        "runs one at a time.",
    )
    worker_batch_tokens: int = Field(
        default=512,
        ge=16,
        description="Continuous batching: most tokens (prompt chunks + one per running "
        "answer) in one forward pass; longer prompts are prefilled in several steps.",
    )
    worker_cpu_quantization: Literal["none", "registry"] = Field(
        default="none",
        description="On a CPU, 'none' runs unquantized (faster here, see docs/BENCHMARKS.md); "
        "'registry' applies the registry's 8bit/4bit as on a GPU.",
    )
    worker_id: str = Field(
        default_factory=_default_worker_id, description="Unique name of this worker."
    )
    worker_lease_ttl_s: float = Field(
        default=3.0,
        gt=0.5,
        description="A worker's lease on a running job; renewed every second. If the worker "
        "dies, its jobs are handed over to another worker once the lease lapses.",
    )
    worker_shutdown_grace_s: float = Field(
        default=120.0,
        ge=0,
        description="On SIGTERM, how long running generations may go on before they are "
        "cancelled (keep it below compose's stop_grace_period).",
    )
    worker_log_level: str = Field(default="INFO", description="Python log level.")
