"""``python -m worker``: load one model, then consume its Celery queue.

The model is loaded in this process before Celery starts, once, and the Celery pool is
``threads`` (no fork, so a CUDA context stays valid; see ../shared/NOTES.md). The worker only
announces itself (heartbeat) once Celery is ready to consume, so the gateway never reports a
model as available while its weights are still loading. Run it with ``exec`` in containers so
SIGTERM reaches Celery, which then finishes running jobs before it exits.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from celery import signals
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError
from redis.retry import Retry

from shared.keys import Keys
from shared.logs import configure_logging
from shared.protocol import LINES, WorkerHeartbeat, celery_queue
from shared.redis_url import credentials_refused, sync_redis
from shared.registry import RegistryError, load_registry
from worker.engines.base import GenerationEngine
from worker.runtime.cancel import CancelWatcher
from worker.runtime.celery_app import create_celery
from worker.runtime.heartbeat import Heartbeat
from worker.runtime.lease import LeaseKeeper
from worker.runtime.runner import JobRunner, RunnerConfig
from worker.runtime.token_writer import TokenWriter
from worker.settings import WorkerSettings
from worker.torch_env import prepare_cpu_torch

# A command that meets a dropped connection (a Redis restart, a failover) is retried for
# about 1.8 s (0.05, 0.1, ... capped at 0.5 s), well inside the job's lease: a running
# answer rides out a short outage. Writes are safe to retry: token writes are idempotent by
# their stream id (worker/runtime/events.py), everything else is fenced or compare-and-set. A reply
# that does not come (a cut link: every packet dropped) is not retried: after
# WORKER_REDIS_TIMEOUT_S the job stops and is left to the gateway to hand over.
RIDE_OUT = Retry(
    ExponentialBackoff(cap=0.5, base=0.05), retries=6, supported_errors=(ConnectionError,)
)

logger = logging.getLogger("worker")


GIL_SWITCH_INTERVAL_S = 0.001


def _version() -> str:
    try:
        return version("medgemma-serve")
    except PackageNotFoundError:
        return "dev"


def _gpu_free_bytes(device: str) -> int | None:
    if not device.startswith("cuda"):
        return None
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def main() -> int:
    settings = WorkerSettings()
    configure_logging(settings.worker_log_level)
    try:
        registry = load_registry(settings.models_file)
    except RegistryError as exc:
        logger.error("%s", exc)
        return 2
    entry = registry.get(settings.worker_model)
    if entry is None:
        names = ", ".join(m.model_name for m in registry.models)
        logger.error(
            "WORKER_MODEL=%r is not in %s (known: %s)",
            settings.worker_model,
            registry.source,
            names,
        )
        return 2
    refused = credentials_refused(settings.redis_url)  # before loading gigabytes of weights
    if refused:
        logger.error("%s", refused)
        return 2
    # torch is imported from here on, after its process-wide settings (worker/torch_env.py).
    prepare_cpu_torch(settings.worker_device, settings.worker_compile != "off")
    from worker.engines.factory import EngineOptions, build_engine
    from worker.engines.loadtest import LoadTestEngine
    from worker.weights.errors import ModelLoadError
    from worker.weights.hub import hf_token_from_env
    from worker.weights.loader import load_model

    if settings.worker_torch_threads:
        import torch

        torch.set_num_threads(settings.worker_torch_threads)
    engine: GenerationEngine
    device, quantization = "none", "none"
    if entry.serving.engine == "loadtest":
        logger.warning(
            "%s uses the LOAD-TEST engine: no model, fixed-rate tokens", entry.model_name
        )
        engine = LoadTestEngine(
            entry.serving.loadtest_tokens_per_s, first_token_s=entry.serving.loadtest_first_token_s
        )
    else:
        try:
            loaded = load_model(
                entry,
                registry,
                device=settings.worker_device,
                cpu_quantization=settings.worker_cpu_quantization,
                hf_token=hf_token_from_env(),
            )
        except ModelLoadError as exc:
            logger.error("cannot load %s [%s]: %s", entry.model_name, exc.code, exc)
            return 3
        engine = build_engine(
            loaded,
            context_length=entry.serving.context_length,
            options=EngineOptions(
                concurrency=settings.worker_concurrency,
                batching=settings.worker_batching,
                batch_tokens=settings.worker_batch_tokens,
                compile=settings.worker_compile != "off",
                cache=settings.worker_cache,
                cuda_graphs=settings.worker_batch_cuda_graphs,
            ),
        )
        device, quantization = loaded.device, loaded.quantization_label
    # Compile and capture now: the worker announces itself only once Celery consumes.
    engine.warmup()
    # What is loaded and compiled by now lives as long as the process (~850k objects for the
    # demo model): keep it out of the collector's full scans. transformers' batch manager runs
    # one at every stop (between batches on a CPU), which held the GIL for ~0.44 s here, and
    # the single-stream job that followed a batch paid it in its first token.
    gc.collect()
    gc.freeze()
    # A thread that wants the GIL waits for the holder's switch interval (5 ms by default),
    # once per hand-over. When a clinician's job interrupts a batch of background work, the
    # batch's thread and the paused jobs' threads all wake at once, and the clinician's first
    # token waited up to ~19 ms for them (in-process, demo model: 1 ms here cut the interrupt
    # to 1-3 ms once raised). The worker's threads are mostly waiting on I/O or in torch, which
    # releases the GIL, so shorter slices cost little.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    # Every job thread shares these clients: one connection each at most, plus the cancel
    # listener, heartbeat, lease and token-writer threads.
    pool = settings.worker_concurrency + 5
    timeouts: dict[str, Any] = {
        "socket_timeout": settings.worker_redis_timeout_s,
        "socket_connect_timeout": settings.worker_redis_timeout_s,
        "socket_keepalive": True,
    }
    redis = sync_redis(
        settings.redis_url,
        max_connections=pool,
        decode_responses=True,
        health_check_interval=30,
        retry=RIDE_OUT,
        **timeouts,
    )
    keys = Keys(settings.key_prefix)
    cancels = CancelWatcher(redis, keys)
    leases = LeaseKeeper(
        redis,
        keys,
        settings.worker_id,
        ttl_s=settings.worker_lease_ttl_s,
        done_ttl_s=settings.job_ttl_s,
    )
    blobs = sync_redis(
        settings.redis_url,
        max_connections=pool,
        health_check_interval=30,
        retry=RIDE_OUT,
        **timeouts,
    )
    writer = TokenWriter(redis, max_deltas=settings.worker_coalesce_max_tokens)
    writer.start()
    runner = JobRunner(
        redis,
        blobs,
        keys,
        engine,
        entry,
        RunnerConfig(
            worker_id=settings.worker_id,
            job_ttl_s=settings.job_ttl_s,
            conversation_ttl_s=settings.conversation_ttl_s,
            claim_ttl_s=int(settings.worker_lease_ttl_s) + 1,
            background_slots=settings.background_slots,
        ),
        cancels=cancels,
        leases=leases,
        writer=writer,
    )
    started = time.time()

    def snapshot() -> WorkerHeartbeat:
        return WorkerHeartbeat(
            worker_id=settings.worker_id,
            model=entry.model_name,
            device=device,
            quantization=quantization,
            jobs_running=runner.jobs_running,
            concurrency=settings.worker_concurrency,
            gpu_memory_free_bytes=_gpu_free_bytes(device),
            version=_version(),
            started_at=started,
            sent_at=time.time(),
        )

    def broken() -> str | None:
        """What of this worker's own threads has died, if anything."""
        if not engine.healthy():
            return "the engine's batch threads died"
        if not cancels.alive():
            return "the cancel listener died"
        if not leases.alive():
            return "the lease keeper died"
        if not writer.alive():
            return "the token writer died"
        return None

    heartbeat = Heartbeat(
        redis,
        keys,
        snapshot=snapshot,
        healthy=broken,
        interval_s=settings.heartbeat_interval_s,
        ttl_s=settings.heartbeat_ttl_s,
    )

    def on_ready(**_: Any) -> None:
        cancels.start()
        leases.start()
        heartbeat.start()
        logger.info(
            "worker %s serving %s on queue %s", settings.worker_id, entry.model_name, entry.queue
        )

    def on_shutdown(**_: Any) -> None:
        heartbeat.stop()
        cancels.stop()
        leases.stop()

    signals.worker_ready.connect(on_ready, weak=False)
    signals.worker_shutdown.connect(on_shutdown, weak=False)

    app = create_celery(
        settings.redis_url,
        runner,
        shutdown_grace_s=settings.worker_shutdown_grace_s,
        intakes={
            celery_queue(entry.queue, "background"): runner.accepts_background,
            celery_queue(entry.queue, "promoted"): runner.accepts_promoted,
        },
    )
    try:
        app.worker_main(
            [
                "worker",
                "--queues",  # read in the order of shared.protocol.LINES
                ",".join(celery_queue(entry.queue, line) for line in LINES),
                "--pool",
                "threads",
                "--concurrency",
                str(settings.worker_concurrency),
                "--hostname",
                f"{entry.model_name}@{settings.worker_id}",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                *(["--disable-prefetch"] if settings.worker_disable_prefetch else []),
                "--loglevel",
                settings.worker_log_level,
            ]
        )
    finally:
        writer.stop()
        engine.close()  # the batch manager's thread would keep the process alive
    return 0


if __name__ == "__main__":
    sys.exit(main())
