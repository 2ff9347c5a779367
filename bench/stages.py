"""Where a request's time to first token goes, from the times the stack records as data.

Every job's ``done`` event carries ``timing`` (:class:`shared.protocol.JobTiming`, Unix times):
``enqueued_at`` (the gateway created the job), ``started_at`` (the worker started it, after its
claim) and ``first_token_at`` (the engine's first token). The event is the last entry of the
job's log in Redis (``Keys().job_log(job_id)``, field ``e``), so after a load phase one
pipeline of ``XREVRANGE log + - COUNT 1`` reads them all. With the client's own send time
(``sent_at``, wall clock) and TTFT, each request's TTFT splits into four stages that add up to
it; every process runs on this machine, so all the times come from one clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis
from pydantic import ValidationError

from bench.clients import RequestResult
from bench.stats import describe
from shared.keys import Keys
from shared.protocol import DoneEvent, JobTiming, decode_event

STAGES = (
    "client_to_job_created",
    "job_created_to_worker_start",
    "engine_first_token",
    "after_first_token",
)

NOTE = (
    "From each job's done event (its timing: enqueued_at, started_at, first_token_at, Unix "
    "times, read from the job's log in Redis) and the client's send time and TTFT; the stages "
    "add up to the TTFT. client_to_job_created = request sent to the gateway creating the job "
    "(HTTP, auth, validation, rate limit, conversation lock and history, images); "
    "job_created_to_worker_start = that to the worker starting the job (the gateway's worker "
    "check, subscribe and job records, the Celery send, the queue and Celery delivery, the "
    "worker's claim and image loading); engine_first_token = the worker's start to the "
    "engine's first token (started_at + the engine's first_token_s); after_first_token = the "
    "rest (prompt encoding, Redis publish, relay, SSE, client)."
)


def read_timings(client: redis.Redis, job_ids: Iterable[str]) -> dict[str, JobTiming]:
    """The ``timing`` of each job whose log ends with a ``done`` event that carries one."""
    ids = list(dict.fromkeys(job_ids))
    keys = Keys()
    pipe = client.pipeline(transaction=False)
    for jid in ids:
        pipe.xrevrange(keys.job_log(jid), "+", "-", count=1)
    out: dict[str, JobTiming] = {}
    for jid, rows in zip(ids, pipe.execute(), strict=True):
        if not rows:
            continue
        _entry_id, fields = rows[0]
        raw = fields.get(b"e", fields.get("e"))
        if raw is None:
            continue
        try:
            event = decode_event(raw)
        except ValidationError:
            continue
        if isinstance(event, DoneEvent) and event.timing is not None:
            out[jid] = event.timing
    return out


def stage_breakdown(
    results: Sequence[RequestResult], timings: dict[str, JobTiming]
) -> dict[str, Any]:
    """Split each successful request's TTFT along its way through the stack (ms)."""
    stages: dict[str, list[float]] = {name: [] for name in STAGES}
    for r in results:
        t = timings.get(r.job_id) if r.job_id else None
        if not r.ok or r.ttft_s is None or t is None or t.first_token_at is None:
            continue
        stages["client_to_job_created"].append(t.enqueued_at - r.sent_at)
        stages["job_created_to_worker_start"].append(t.started_at - t.enqueued_at)
        stages["engine_first_token"].append(t.first_token_at - t.started_at)
        stages["after_first_token"].append(r.ttft_s - (t.first_token_at - r.sent_at))
    return {
        "matched_jobs": len(stages["engine_first_token"]),
        **{f"{k}_ms": describe(v, 1000.0) for k, v in stages.items()},
        "note": NOTE,
    }


def breakdown_from_redis(redis_url: str, results: Sequence[RequestResult]) -> dict[str, Any]:
    """:func:`stage_breakdown` with the timings read from the stack's Redis at ``redis_url``."""
    client = redis.Redis.from_url(redis_url)
    try:
        timings = read_timings(client, [r.job_id for r in results if r.job_id])
    finally:
        client.close()
    return stage_breakdown(results, timings)
