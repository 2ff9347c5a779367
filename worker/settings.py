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
        default=8,
        ge=1,
        le=1024,
        description="Jobs one worker runs at once (Celery threads; with a model, the batch "
        "size). 1 serves one answer at a time.",
    )
    worker_background_slots: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Most background jobs (titles, tags, other front-end tasks) one worker "
        "runs at once, so interactive work always finds room; 0: half of "
        "WORKER_CONCURRENCY (at least 1). A worker takes background work only while it runs "
        "no interactive job, and a running background job pauses while interactive work runs "
        "beside it (for GATEWAY_BACKGROUND_MAX_WAIT_S at most in all). Background work that "
        "waited that long in line is taken before other work, still into these slots.",
    )
    worker_batching: Literal["auto", "always", "off"] = Field(
        default="auto",
        description="auto: with WORKER_CONCURRENCY > 1, a job that finds the worker idle "
        "decodes alone (compiled, fastest for one stream) and jobs that find it busy share "
        "the model through continuous batching; always: every text job goes through the "
        "batch; off: every job decodes alone, one at a time. Images and seeded requests "
        "always decode alone.",
    )
    worker_compile: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Compile the single-stream decoding step (torch.compile; CUDA graphs on "
        "a GPU). auto = on: 1.5x eager on the 2-core CPU in docs/BENCHMARKS.md, paid for "
        "with about 45 s of compiling at start there. off: eager decoding, instant start.",
    )
    worker_cache: Literal["auto", "static", "dynamic"] = Field(
        default="auto",
        description="KV cache of single-stream decoding. auto: static (built once, sized to "
        "the model's context, the shape CUDA graphs need) on a GPU when compiling; dynamic on "
        "a CPU, where a static cache measured slower (every step attends over all of it).",
    )
    worker_torch_threads: int = Field(
        default=0,
        ge=0,
        le=512,
        description="torch's CPU threads (0: torch's default, one per core). Lower it when the "
        "worker shares its cores with a busy process: oversubscribed, CPU decoding slowed "
        "about 10x on the development machine.",
    )
    worker_batch_cuda_graphs: bool = Field(
        default=True,
        description="On a GPU, capture the continuous-batching steps as CUDA graphs (padded "
        "to transformers' interval presets, captured at start).",
    )
    worker_batch_tokens: int | None = Field(
        default=None,
        ge=16,
        description="Continuous batching: most tokens (prompt chunks + one per running "
        "answer) in one forward pass; longer prompts are prefilled in several steps. "
        "Default: 512 on a GPU, 128 on a CPU (same tokens/s as 512 there, time to first "
        "token 193 vs 276 ms at 8 streams; docs/BENCHMARKS.md).",
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
    worker_coalesce_max_tokens: int = Field(
        default=16,
        ge=0,
        le=1024,
        description="Most tokens one token event may carry. One thread writes every running "
        "job's tokens, one pipelined round trip per flush; when Redis falls behind (a busy "
        "batch, a distant link) a job's tokens of the last round trip go out as one event. "
        "0: never joined (one event per token, still pipelined).",
    )
    worker_redis_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Longest a worker waits for one Redis reply. A worker cut off from Redis "
        "(a link that drops every packet) stops its jobs after this (their leases lapse and "
        "the gateway hands them over) instead of generating for nobody.",
    )
    worker_disable_prefetch: bool = Field(
        default=True,
        description="Take a job off the queue only when a slot is free (Celery's "
        "worker_disable_prefetch), so no job waits behind a busy worker while another is idle. "
        "Cost measured in docs/BENCHMARKS.md.",
    )
    worker_shutdown_grace_s: float = Field(
        default=120.0,
        ge=0,
        description="On SIGTERM, how long running generations may go on before they are "
        "cancelled (keep it below compose's stop_grace_period).",
    )
    worker_log_level: str = Field(default="INFO", description="Python log level.")

    @property
    def background_slots(self) -> int:
        return self.worker_background_slots or max(1, self.worker_concurrency // 2)
