"""Supervised threads: when the batch's dispatcher dies, the requests in the batch end with an
error at once (not after the 120 s result timeout) and the engine reports itself unhealthy; an
unhealthy worker withdraws its heartbeat, so the gateway stops sending it work."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import fakeredis
import pytest

from shared.keys import Keys
from shared.protocol import ChatMessage, SamplingParams, TextPart, WorkerHeartbeat
from tests.engines import load_tiny, make_engine, one_torch_thread, tiny_entry  # noqa: F401
from worker.engines.batching import BatchUnavailable
from worker.runtime.heartbeat import Heartbeat

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_dead_dispatcher_fails_the_batch_at_once(tiny_gemma_dir: Path) -> None:
    loaded = load_tiny(tiny_entry(tiny_gemma_dir), tiny_gemma_dir)
    engine = make_engine(loaded, 512, concurrency=2, batching="always")
    engine.warmup()
    try:
        assert engine.healthy()
        batch = engine.batch
        assert batch is not None
        started = threading.Event()
        outcome: list[BaseException | str] = []

        def ask() -> None:
            chat = [ChatMessage(role="user", content=[TextPart(text="Tell me about fever.")])]
            try:
                engine.generate(
                    chat,
                    SamplingParams(temperature=0.0, max_new_tokens=400),
                    on_text=lambda _t: started.set(),
                )
                outcome.append("finished")
            except BaseException as exc:  # noqa: BLE001 - what the job sees
                outcome.append(exc)

        job = threading.Thread(target=ask)
        job.start()
        assert started.wait(30), "no token from the batch"

        def broken(timeout: float | None = None) -> None:
            raise RuntimeError("injected: the dispatcher's read fails")

        batch._manager.get_result = broken  # the dispatcher's next read kills it
        killed_at = time.monotonic()
        job.join(timeout=10)
        assert not job.is_alive(), "the request still waits on a dead batch"
        assert time.monotonic() - killed_at < 5
        assert len(outcome) == 1 and isinstance(outcome[0], BatchUnavailable), outcome
        assert not engine.healthy()
    finally:
        engine.close()


def test_an_unhealthy_worker_withdraws_its_heartbeat() -> None:
    redis = fakeredis.FakeRedis(decode_responses=True)
    keys = Keys("mg")
    state: dict[str, str | None] = {"broken": None}

    def snapshot() -> WorkerHeartbeat:
        now = time.time()
        return WorkerHeartbeat(
            worker_id="w1",
            model="m",
            device="cpu",
            quantization="none",
            jobs_running=0,
            concurrency=1,
            version="t",
            started_at=now,
            sent_at=now,
        )

    hb = Heartbeat(
        redis,
        keys,
        snapshot=snapshot,
        interval_s=0.05,
        ttl_s=5,
        healthy=lambda: state["broken"],
    )
    hb.start()
    try:
        assert redis.zscore(keys.workers("m"), "w1") is not None
        state["broken"] = "the lease keeper died"
        deadline = time.monotonic() + 5
        while redis.zscore(keys.workers("m"), "w1") is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert redis.zscore(keys.workers("m"), "w1") is None
        assert redis.get(keys.worker("w1")) is None
    finally:
        hb.stop()
