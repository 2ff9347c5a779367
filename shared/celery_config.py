"""Celery options both sides use, and why each is set.

The gateway only sends tasks (by name: it never imports the worker); workers consume one queue
per model. Options chosen for long GPU jobs on Redis:

* ``task_acks_late = False`` — a job is acknowledged when a worker takes it. With late acks,
  Redis redelivers any job still unacknowledged after ``visibility_timeout``, so a long
  generation would run twice and stream its tokens twice (celery #5935). A job lost with a
  dead worker is instead detected by the job's claim/lease and answered with an error event.
* ``visibility_timeout`` is set high all the same (it only matters for unacked messages).
* ``worker_prefetch_multiplier = 1`` and, in workers, ``--disable-prefetch``
  (``WORKER_DISABLE_PREFETCH``, on by default): a worker takes a job off the queue only when
  one of its slots is free, so no job waits behind a busy worker while another is idle (with
  early acks, prefetch alone is no bound: an acknowledged job stops counting, and a busy
  worker held the next job; ``tests/test_prefetch.py``). Celery re-reads the queue only when
  the consumer's loop wakes, so the worker wakes it every 20 ms (``worker/runtime/celery_app.py``);
  measured, the cost is then +0.8 ms p50 time to first token at 8 streams on 8 slots and
  +18 ms (4.5%) when jobs queue (docs/BENCHMARKS.md), instead of +600 ms without the timer.
* ``queue_order_strategy`` = :class:`LineOrder`: a worker reads its model's lines in a fixed
  order (``shared.protocol.LINES``): promoted background work, then interactive, then
  background, so a waiting clinician's job is taken before any background work that has not
  waited its share (kombu's default rotates between queues; its ``"priority"`` order is the
  order they were added, which the worker's intake changes as it stops and resumes reading one).
* JSON only, no result backend: results travel as token events on pub/sub, not through
  Celery's result store, and nothing in Redis is a pickle.
* Publishing retries briefly and then fails, so the gateway can answer 503 during a Redis
  outage instead of hanging.
"""

from __future__ import annotations

from typing import Any

from kombu.utils.scheduling import priority_cycle

from shared.protocol import line_rank
from shared.redis_url import celery_broker

VISIBILITY_TIMEOUT_S = 6 * 3600


class LineOrder(priority_cycle):
    """kombu's queue order for a Redis consumer (``queue_order_strategy``, imported by name):
    the queues it reads now, by their line, whatever order they were added in."""

    def consume(self, n: int) -> list[str]:
        return sorted(self.items[:n], key=line_rank)


def celery_options(redis_url: str) -> dict[str, Any]:
    broker_url, transport = celery_broker(redis_url)
    return {
        "broker_url": broker_url,
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": False,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {
            "visibility_timeout": VISIBILITY_TIMEOUT_S,
            "queue_order_strategy": f"{__name__}:{LineOrder.__name__}",
            **transport,
        },
        "broker_connection_retry_on_startup": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0.0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "enable_utc": True,
    }
