"""Celery options both sides use, and why each is set.

The gateway only sends tasks (by name: it never imports the worker); workers consume one queue
per model. Options chosen for long GPU jobs on Redis:

* ``task_acks_late = False`` — a job is acknowledged when a worker takes it. With late acks,
  Redis redelivers any job still unacknowledged after ``visibility_timeout``, so a long
  generation would run twice and stream its tokens twice (celery #5935). A job lost with a
  dead worker is instead detected by the job's claim/lease and answered with an error event.
* ``visibility_timeout`` is set high all the same (it only matters for unacked messages).
* ``worker_prefetch_multiplier = 1`` — a worker reserves only as many jobs as it can run, so
  jobs queue in Redis (where any free worker can take them), not inside one busy worker. With
  early acks this is not a hard bound (an acknowledged job stops counting against the prefetch
  limit), so when every slot of every worker is busy a worker may hold a job it cannot start
  yet. ``worker_disable_prefetch`` closes that gap but, measured, made every job start about
  200 ms later (the consumer stops polling while full and resumes on a timer), so it is off:
  ``bench/serve.py`` saw one such held job among 1,000 streams on exactly 1,000 slots.
* JSON only, no result backend: results travel as token events on pub/sub, not through
  Celery's result store, and nothing in Redis is a pickle.
* Publishing retries briefly and then fails, so the gateway can answer 503 during a Redis
  outage instead of hanging.
"""

from __future__ import annotations

from typing import Any

from shared.redis_url import celery_broker

VISIBILITY_TIMEOUT_S = 6 * 3600


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
        "broker_transport_options": {"visibility_timeout": VISIBILITY_TIMEOUT_S, **transport},
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
