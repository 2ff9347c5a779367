"""bench/stages.py: the TTFT breakdown of bench/serve.py comes from the jobs' done events in
Redis (their ``timing``), not from the wording of log lines. Fake Redis, no stack."""

from __future__ import annotations

import fakeredis
import pytest

from bench.clients import RequestResult
from bench.stages import STAGES, read_timings, stage_breakdown
from shared.errors import ErrorInfo
from shared.keys import Keys
from shared.protocol import (
    DoneEvent,
    ErrorEvent,
    JobTiming,
    TokenEvent,
    Usage,
    encode_event,
)

KEYS = Keys()
USAGE = Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)
TIMING = JobTiming(enqueued_at=1000.010, started_at=1000.030, first_token_at=1000.045)


def _log(r: fakeredis.FakeRedis, job_id: str, *events: TokenEvent | DoneEvent | ErrorEvent) -> None:
    for event in events:
        r.xadd(KEYS.job_log(job_id), {"e": encode_event(event)}, id=f"{event.seq}-0")


@pytest.fixture
def redis() -> fakeredis.FakeRedis:
    r = fakeredis.FakeRedis()  # bytes, as bench/stages.py's own client
    _log(
        r,
        "done",
        TokenEvent(job_id="done", seq=1, text="a"),
        TokenEvent(job_id="done", seq=2, text="b"),
        DoneEvent(job_id="done", seq=3, finish_reason="length", usage=USAGE, timing=TIMING),
    )
    _log(r, "old", DoneEvent(job_id="old", seq=1, finish_reason="stop", usage=USAGE))
    error = ErrorInfo(message="lost", type="server_error", code="worker_lost")
    _log(r, "failed", ErrorEvent(job_id="failed", seq=1, error=error))
    _log(r, "running", TokenEvent(job_id="running", seq=1, text="a"))
    return r


def test_reads_the_timing_of_each_finished_job_in_one_go(redis: fakeredis.FakeRedis) -> None:
    timings = read_timings(redis, ["done", "old", "failed", "running", "missing", "done"])
    # Only a job whose log ends with a done event that carries its timing.
    assert timings == {"done": TIMING}


def test_stages_add_up_to_the_client_ttft() -> None:
    ok = RequestResult(index=0, started_s=0.0, sent_at=1000.000, ok=True, job_id="j", ttft_s=0.050)
    failed = RequestResult(index=1, started_s=0.0, sent_at=1000.0, job_id="j", ttft_s=0.05)
    unknown = RequestResult(index=2, started_s=0.0, sent_at=1000.0, ok=True, job_id="x")
    out = stage_breakdown([ok, failed, unknown], {"j": TIMING})
    assert out["matched_jobs"] == 1
    p50 = {name: out[f"{name}_ms"]["p50"] for name in STAGES}
    assert p50 == pytest.approx(
        {
            "client_to_job_created": 10.0,
            "job_created_to_worker_start": 20.0,
            "engine_first_token": 15.0,
            "after_first_token": 5.0,
        },
        abs=1e-6,
    )
    assert sum(p50.values()) == pytest.approx(50.0)
    assert "done event" in out["note"]


def test_a_job_without_a_first_token_is_left_out() -> None:
    res = RequestResult(index=0, started_s=0.0, sent_at=1000.0, ok=True, job_id="j", ttft_s=0.05)
    timing = JobTiming(enqueued_at=1000.01, started_at=1000.03)
    assert stage_breakdown([res], {"j": timing})["matched_jobs"] == 0
