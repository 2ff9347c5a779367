"""Operations: Prometheus metrics at /metrics, the admin fleet view, the ``medgemma-ops`` CLI.

The unit tests time a stream with made-up timestamps; the integration tests drive the real
stack and read the metrics as Prometheus would parse them.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from gateway import cli
from gateway.services.audit import AuditRecord
from gateway.services.metrics import Metrics, is_failure
from shared.errors import ErrorInfo
from shared.protocol import DoneEvent, ErrorEvent, QueuedEvent, TokenEvent, Usage
from tests.stack import ADMIN_KEY, USER_KEY, Stack, ask, sse_events

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample as {(sample name, labels): value}, via Prometheus's own text parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def has(samples: Samples, name: str, **labels: str) -> bool:
    want = set(labels.items())
    return any(n == name and want <= lbl for (n, lbl) in samples)


def record(outcome: str, status: int, action: str = "chat.openai") -> AuditRecord:
    return AuditRecord(
        user_id="u", role="user", action=action, model="m", outcome=outcome, client=None,
        status=status,
    )  # fmt: skip


# -- unit --------------------------------------------------------------------------------------


def test_a_stream_is_timed_from_arrival_submission_and_tokens() -> None:
    m = Metrics()
    timer = m.stream("m", started=100.0)
    timer.opened()
    timer.submitted(100.5)
    timer.event(QueuedEvent(job_id="j", position=1, eta_s=1.0), 101.0)  # the gateway's own
    timer.event(TokenEvent(job_id="j", seq=1, text="a"), 102.0)
    timer.event(TokenEvent(job_id="j", seq=2, text="b"), 102.25)
    usage = Usage(prompt_tokens=5, completion_tokens=2, total_tokens=7)
    timer.event(DoneEvent(job_id="j", seq=3, finish_reason="stop", usage=usage), 102.5)
    s = parse(m.render().decode())
    assert total(s, "medgemma_active_streams") == 1
    timer.closed()
    timer.closed()  # idempotent
    s = parse(m.render().decode())
    assert total(s, "medgemma_active_streams") == 0
    assert total(s, "medgemma_time_to_first_token_seconds_sum", model="m") == 2.0
    assert total(s, "medgemma_queue_wait_seconds_sum", model="m") == 1.5  # to the first token
    assert total(s, "medgemma_queue_wait_seconds_count", model="m") == 1
    assert total(s, "medgemma_inter_token_latency_seconds_sum", model="m") == 0.25
    assert total(s, "medgemma_tokens_generated_total", model="m") == 2


def test_background_work_is_timed_apart_from_the_clinicians() -> None:
    """A title that waited behind clinicians by design does not show in their latency."""
    m = Metrics()
    for priority, ttft in (("interactive", 0.2), ("background", 9.0)):
        timer = m.stream("m", started=0.0, priority=priority)
        timer.submitted(0.0)
        timer.event(TokenEvent(job_id="j", seq=1, text="a"), ttft)
    s = parse(m.render().decode())
    assert total(s, "medgemma_time_to_first_token_seconds_sum", priority="interactive") == 0.2
    assert total(s, "medgemma_time_to_first_token_seconds_sum", priority="background") == 9.0
    assert total(s, "medgemma_queue_wait_seconds_count", model="m", priority="interactive") == 1


def test_gateway_made_errors_are_not_queue_waits_and_resumes_only_count_as_open() -> None:
    m = Metrics()
    timer = m.stream("m", started=0.0)
    timer.submitted(0.0)
    lost = ErrorInfo(message="lost", type="server_error", code="worker_timeout")
    timer.event(ErrorEvent(job_id="j", seq=1, error=lost), 30.0)
    resumed = m.stream("m", started=0.0, new_turn=False)
    resumed.opened()
    resumed.event(TokenEvent(job_id="j", seq=5, text="x"), 1.0)
    s = parse(m.render().decode())
    assert total(s, "medgemma_queue_wait_seconds_count") == 0
    assert total(s, "medgemma_time_to_first_token_seconds_count") == 0
    assert total(s, "medgemma_active_streams") == 1


def test_requests_are_counted_per_outcome_and_apps_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request(record("ok", 200))
    a.observe_request(record("error:worker_lost", 200))  # an error event in a 200 stream
    a.observe_request(record("error:prompt_too_long", 400, "chat.medgemma"))
    a.observe_request(record("ok", 200, "conversation.list"))  # not a chat request
    s = parse(a.render().decode())
    assert total(s, "medgemma_requests_total", model="m", api="openai", outcome="ok") == 1
    assert total(s, "medgemma_requests_total") == 3
    assert total(parse(b.render().decode()), "medgemma_requests_total") == 0
    assert a.recent_errors()["m"] == {"requests": 3, "errors": 1, "error_rate": 0.3333}


@pytest.mark.parametrize(
    ("outcome", "status", "failed"),
    [
        ("ok", 200, False),
        ("cancelled", 200, False),
        ("client_left", 200, False),
        ("denied:429", 429, False),
        ("error:invalid_request", 422, False),
        ("error:worker_timeout", 200, True),
        ("error:queue_timeout", 503, True),
        ("error:500", 500, True),
    ],
)
def test_only_the_services_own_failures_count_as_errors(
    outcome: str, status: int, failed: bool
) -> None:
    assert is_failure(record(outcome, status)) is failed


# -- integration -------------------------------------------------------------------------------


def scrape(stack: Stack) -> Samples:
    with stack.client(key=None) as c:  # no key: Prometheus has none
        r = c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert "alice" not in r.text  # no user ids in labels
    return parse(r.text)


def scrape_until(stack: Stack, ok: Any, timeout_s: float = 5.0) -> Samples:
    """The audit record (and so the request count) is written just after a response ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(stack)
        if ok(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@pytest.mark.integration
def test_metrics_after_a_streamed_and_a_plain_answer(stack: Stack) -> None:
    before = scrape(stack)
    ok_before = total(before, "medgemma_requests_total", model="tiny-gemma", outcome="ok")
    with stack.client() as c:
        resp, events = sse_events(c, "/medgemma", ask("What is sepsis?"))
        assert resp.status_code == 200 and events[-1].event == "done"
        r = c.post("/medgemma", json={**ask("What is a fever?"), "stream": False})
        assert r.status_code == 200

    def counted(s: Samples) -> bool:
        ok = total(s, "medgemma_requests_total", model="tiny-gemma", outcome="ok")
        return ok >= ok_before + 2

    s = scrape_until(stack, counted)
    assert counted(s)
    assert total(s, "medgemma_requests_total", model="tiny-gemma", api="medgemma") >= 2
    assert total(s, "medgemma_time_to_first_token_seconds_count", model="tiny-gemma") >= 1
    assert total(s, "medgemma_queue_wait_seconds_count", model="tiny-gemma") >= 2
    assert has(s, "medgemma_inter_token_latency_seconds_count", model="tiny-gemma")
    assert total(s, "medgemma_tokens_generated_total", model="tiny-gemma") > 0
    assert total(s, "medgemma_live_workers", model="tiny-gemma") >= 1
    assert total(s, "medgemma_live_workers", model="ghost-model") == 0
    assert has(s, "medgemma_queue_depth", model="tiny-gemma")
    assert has(s, "medgemma_celery_queue_length", model="tiny-gemma")
    assert has(s, "medgemma_worker_jobs_running", model="tiny-gemma")
    assert not has(s, "medgemma_worker_gpu_memory_free_bytes")  # CPU workers report none
    assert total(s, "medgemma_redis_up") == 1
    assert has(s, "medgemma_active_streams")


@pytest.mark.integration
def test_celery_queue_length_counts_the_priority_lists(stack: Stack) -> None:
    # ghost-model has no worker: nothing consumes its Celery lists while the test looks.
    redis = Redis.from_url(stack.redis_url)
    lists = ["ghost-model", "ghost-model\x06\x163", "ghost-model\x06\x169"]
    try:
        for name in lists:
            redis.lpush(name, "{}")
        s = scrape(stack)
        assert total(s, "medgemma_celery_queue_length", model="ghost-model") == 3
    finally:
        redis.delete(*lists)
        redis.close()


@pytest.mark.integration
def test_fleet_is_for_admins_only(stack: Stack) -> None:
    with stack.client(ADMIN_KEY) as c:
        r = c.get("/admin/fleet")
    assert r.status_code == 200
    body = r.json()
    tiny = next(m for m in body["models"] if m["model"] == "tiny-gemma")
    assert tiny["live_workers"] >= 1 and tiny["queue_depth"] >= 0
    assert tiny["drain_rate_per_s"] > 0 and tiny["celery_queue_length"] >= 0
    worker = tiny["workers"][0]
    assert worker["heartbeat_age_s"] < 10
    assert worker["device"] == "cpu" and worker["quantization"] == "none"
    assert worker["jobs_running"] >= 0 and worker["version"]
    assert worker["gpu_memory_free_bytes"] is None
    assert body["error_window_s"] == 300 and "error_rate" in body["recent"]

    with stack.client(USER_KEY) as c:
        denied = c.get("/admin/fleet")
        unknown = c.get("/admin/no-such-route")
    assert denied.status_code == 404
    assert denied.json() == unknown.json()  # indistinguishable from a path that does not exist
    with stack.client(key=None) as c:
        assert c.get("/admin/fleet").status_code == 401


@pytest.mark.integration
def test_cli_prints_the_fleet(stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fleet", "--url", stack.base_url, "--api-key", ADMIN_KEY]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "WORKERS", "QUEUED"]
    row = next(line.split() for line in lines if line.startswith("tiny-gemma "))
    assert int(row[1]) >= 1
    assert any("WORKER" in line and "GPU FREE" in line for line in lines)
    assert any(line.startswith("tiny-gemma") and " cpu " in line for line in lines)
    assert "errors in the last 300 s" in out

    assert cli.main(["fleet", "--url", stack.base_url, "--api-key", USER_KEY]) == 1
    assert "not an admin key" in capsys.readouterr().err
    assert cli.main(["fleet", "--url", "http://127.0.0.1:9", "--api-key", ADMIN_KEY]) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err
