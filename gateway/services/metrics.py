"""Prometheus metrics, served by the gateway at ``GET /metrics``.

**One scrape target: the gateway.** Workers run no HTTP server. What operators need from them
(device, free GPU memory, jobs running) already reaches Redis in their heartbeats, and the
gateway reads those at scrape time, so Prometheus scrapes one address however many GPU workers
join or leave, on whichever hosts, and no worker port is opened across the network. With
several gateway processes, scrape each: the request and stream metrics are per process (sum
them); the Redis-derived gauges are the same in each (take ``max``).

Each app has its own ``CollectorRegistry``, never prometheus-client's global one (tests build
several apps in one process). Three sources feed it:

* the audit middleware (:meth:`Metrics.observe_request`), once per chat request after its
  response or stream has ended: ``medgemma_requests_total{model,api,outcome}``, the outcome as
  the audit record has it: ``ok``, ``cancelled``, ``client_left``, ``error:<code>``,
  ``denied:<status>`` (model ``unknown`` when the request failed before a model was chosen);
* the :class:`StreamTimer` of each new turn, which
  :class:`~gateway.services.following.JobStream` calls on every event with a monotonic timestamp:

  - ``medgemma_time_to_first_token_seconds{model,priority}``: request arrival (the audit
    middleware) → the first token event handed to the client (to the SSE response; for a
    non-stream answer, when the gateway receives it). ``priority`` is the request's class,
    ``interactive`` or ``background``, so a clinicians' latency objective is not blurred by
    front ends' titles and summaries, which wait behind them by design;
  - ``medgemma_inter_token_latency_seconds{model}``: between consecutive token events;
  - ``medgemma_queue_wait_seconds{model,priority}``: the job's submission → the first event from the
    worker of any kind. That is queue time **plus prefill** (the worker's first event is
    usually the first token); errors the gateway itself makes (worker lost or silent) are not
    observed;
  - ``medgemma_tokens_generated_total{model}``: completion tokens from each ``done`` event;
  - ``medgemma_active_streams``: open SSE responses, resumed streams included;

* Redis, read at scrape time by :meth:`Metrics.refresh` (prometheus-client's ``collect()`` is
  synchronous and cannot use the app's async Redis client, so the route computes these first
  and sets gauges just before rendering): ``medgemma_queue_depth{model}``,
  ``medgemma_celery_queue_length{model}``, ``medgemma_live_workers{model}``,
  ``medgemma_worker_gpu_memory_free_bytes{worker,model}``,
  ``medgemma_worker_jobs_running{worker,model}`` and ``medgemma_redis_up``. Per-worker series
  are rebuilt at each scrape, so a worker that left disappears.

Label values are bounded: model names come from the registry, outcomes from error codes and
HTTP statuses, worker ids from live heartbeats. No user id, conversation or text is a label.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from gateway.services.audit import AuditRecord
from gateway.services.fleet import ModelFleet
from gateway.services.supervision import Interrupted, StreamEvent
from shared.errors import ErrorCode
from shared.protocol import DoneEvent, ErrorEvent, Priority, QueuedEvent, TokenEvent

ERROR_WINDOW_S = 300.0
# Errors the gateway makes itself: they say nothing about how long the queue took.
_GATEWAY_ERRORS = frozenset(
    {ErrorCode.WORKER_TIMEOUT.value, ErrorCode.WORKER_LOST.value, ErrorCode.REDIS_UNAVAILABLE.value}
)
_TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 30, 60, 120)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5)
_QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


def is_failure(record: AuditRecord) -> bool:
    """A request the service failed: an error event in a 200 stream, or a 5xx. Client errors
    (400, 409, 422, ...), denials (401, 404, 429), cancellations and clients that left are not
    failures of the service."""
    return record.outcome.startswith("error:") and not 400 <= record.status < 500


class Metrics:
    """The gateway's metrics in their own registry, and a short memory of recent outcomes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "medgemma_requests",
            "Chat requests by model, API and outcome (ok, cancelled, client_left, "
            "error:<code>, denied:<status>), counted when the response or stream ends.",
            ["model", "api", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "medgemma_time_to_first_token_seconds",
            "Request arrival to the first token event handed to the client, by the request's "
            "class (interactive, background).",
            ["model", "priority"],
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "medgemma_inter_token_latency_seconds",
            "Time between consecutive token events of one answer.",
            ["model"],
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "medgemma_queue_wait_seconds",
            "Job submission to the worker's first event: queue time plus prefill, by the "
            "request's class (interactive, background).",
            ["model", "priority"],
            buckets=_QUEUE_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "medgemma_tokens_generated",
            "Completion tokens generated (from each answer's done event).",
            ["model"],
            registry=r,
        )
        self.active_streams = Gauge(
            "medgemma_active_streams", "Open SSE responses of this gateway process.", registry=r
        )
        self.queue_depth = Gauge(
            "medgemma_queue_depth",
            "Jobs waiting for a worker, from the gateway's queue book.",
            ["model"],
            registry=r,
        )
        self.celery_queue_length = Gauge(
            "medgemma_celery_queue_length",
            "Messages in the model's Celery queue lists (all priorities) not yet taken.",
            ["model"],
            registry=r,
        )
        self.live_workers = Gauge(
            "medgemma_live_workers", "Workers with a fresh heartbeat.", ["model"], registry=r
        )
        self.gpu_free = Gauge(
            "medgemma_worker_gpu_memory_free_bytes",
            "Free GPU memory a worker last reported (absent for CPU workers).",
            ["worker", "model"],
            registry=r,
        )
        self.jobs_running = Gauge(
            "medgemma_worker_jobs_running",
            "Generations a worker last reported running.",
            ["worker", "model"],
            registry=r,
        )
        self.redis_up = Gauge(
            "medgemma_redis_up", "1 if the last scrape could read Redis, else 0.", registry=r
        )
        # (monotonic time, model, failed) of recent chat requests, for /admin/fleet.
        self._recent: deque[tuple[float, str, bool]] = deque(maxlen=100_000)

    # -- fed by the audit middleware and the streams ------------------------------------------

    def observe_request(self, record: AuditRecord) -> None:
        """Count one finished request (the audit middleware calls this for every request)."""
        if not record.action.startswith("chat."):
            return
        model = record.model or "unknown"
        api = record.action.removeprefix("chat.")
        self.requests.labels(model=model, api=api, outcome=record.outcome).inc()
        self._recent.append((time.monotonic(), model, is_failure(record)))

    def stream(
        self,
        model: str,
        started: float,
        *,
        priority: Priority = "interactive",
        new_turn: bool = True,
    ) -> StreamTimer:
        """A timer for one stream. ``started``: the request's arrival (monotonic). A resumed
        stream (``new_turn=False``) only counts as an open stream."""
        return StreamTimer(self, model, started, priority=priority, new_turn=new_turn)

    def recent_errors(self, window_s: float = ERROR_WINDOW_S) -> dict[str, dict[str, Any]]:
        """Per model: chat requests and failures (see :func:`is_failure`) that ended in the
        last ``window_s`` seconds, in this gateway process."""
        since = time.monotonic() - window_s
        counts: dict[str, list[int]] = {}
        for at, model, failed in self._recent:
            if at >= since:
                row = counts.setdefault(model, [0, 0])
                row[0] += 1
                row[1] += failed
        return {
            model: {"requests": n, "errors": e, "error_rate": round(e / n, 4)}
            for model, (n, e) in sorted(counts.items())
        }

    # -- read from Redis at scrape time -------------------------------------------------------

    def refresh(self, fleet: list[ModelFleet] | None) -> None:
        """Set the Redis-derived gauges from ``fleet`` (None: Redis could not be read, the
        gauges are dropped rather than left stale). Synchronous, so a concurrent scrape never
        renders a half-set state."""
        for gauge in (
            self.queue_depth,
            self.celery_queue_length,
            self.live_workers,
            self.gpu_free,
            self.jobs_running,
        ):
            gauge.clear()
        self.redis_up.set(0 if fleet is None else 1)
        for m in fleet or []:
            self.queue_depth.labels(model=m.model).set(m.queue_depth)
            self.celery_queue_length.labels(model=m.model).set(m.celery_queue_length)
            self.live_workers.labels(model=m.model).set(m.live_workers)
            for w in m.workers:
                hb = w.heartbeat
                self.jobs_running.labels(worker=hb.worker_id, model=m.model).set(hb.jobs_running)
                if hb.gpu_memory_free_bytes is not None:
                    labels = {"worker": hb.worker_id, "model": m.model}
                    self.gpu_free.labels(**labels).set(hb.gpu_memory_free_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class StreamTimer:
    """Times one stream; :class:`~gateway.services.following.JobStream` calls it (its
    ``observer``)."""

    def __init__(
        self, metrics: Metrics, model: str, started: float, *, priority: Priority, new_turn: bool
    ) -> None:
        self._m = metrics
        self._model = model
        self._ttft = metrics.ttft.labels(model=model, priority=priority)
        self._queue_wait = metrics.queue_wait.labels(model=model, priority=priority)
        self._started = started
        self._new_turn = new_turn
        self._submitted: float | None = None
        self._last_token: float | None = None
        self._open = False
        self._itl = metrics.itl.labels(model=model)  # (looked up once: it is per token)

    def submitted(self, at: float) -> None:
        """The job is on its queue."""
        self._submitted = at

    def event(self, event: StreamEvent, at: float) -> None:
        if not self._new_turn or isinstance(event, QueuedEvent):
            return
        if self._submitted is not None and not (
            isinstance(event, ErrorEvent | Interrupted) and event.error.code in _GATEWAY_ERRORS
        ):
            self._queue_wait.observe(max(0.0, at - self._submitted))
            self._submitted = None  # observed once: the first event from the worker
        if isinstance(event, TokenEvent):
            if self._last_token is None:
                self._ttft.observe(max(0.0, at - self._started))
            else:
                self._itl.observe(max(0.0, at - self._last_token))
            self._last_token = at
        elif isinstance(event, DoneEvent):
            self._m.tokens.labels(model=self._model).inc(event.usage.completion_tokens)

    def opened(self) -> None:
        if not self._open:
            self._open = True
            self._m.active_streams.inc()

    def closed(self) -> None:
        if self._open:
            self._open = False
            self._m.active_streams.dec()
