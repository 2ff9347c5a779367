"""What the fleet looks like right now, read from Redis: workers, queues, per model.

Used at scrape time by ``GET /metrics`` (the Redis-derived gauges) and by ``GET /admin/fleet``.
Everything here comes from keys the stack already writes:

* **workers** — the ids in ``{p}:workers:{model}`` with a fresh score (the same rule that makes
  a model "available") and each one's last :class:`WorkerHeartbeat` (``{p}:worker:{id}``):
  device, quantization, jobs running, free GPU memory, version. Worker-side figures reach the
  gateway this way, so the gateway is the only scrape target.
* **queue depth** — :meth:`QueueBook.depth`: jobs booked and not yet taken by a worker.
* **Celery queue length** — ``LLEN`` of the model's Celery lists (interactive and background)
  plus their priority lists
  (kombu's Redis transport keeps ``queue`` and ``queue\\x06\\x16N``; counting the bare list
  alone misses prioritised messages — kombu #422). It is a cross-check of the queue book:
  messages Celery holds that no worker has taken, including those of jobs whose clients
  stopped waiting.
* **drain rate** — :meth:`QueueBook.drain_rate`, jobs started per second over the last minute.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from pydantic import ValidationError
from redis.asyncio import Redis

from gateway.services.queue_book import QueueBook
from shared.keys import Keys
from shared.protocol import LINES, WorkerHeartbeat, celery_queue
from shared.registry import Registry

logger = logging.getLogger(__name__)

PRIORITY_SEP = "\x06\x16"  # kombu.transport.redis.Channel.sep
PRIORITY_LISTS = range(1, 10)  # kombu's default steps are 3, 6, 9; count every possible one


def celery_lists(queue: str) -> list[str]:
    """The Redis lists that hold a model queue's waiting messages: the Celery queue of each of
    its lines, every kombu priority of each included."""
    return [
        name
        for q in (celery_queue(queue, line) for line in LINES)
        for name in [q] + [f"{q}{PRIORITY_SEP}{n}" for n in PRIORITY_LISTS]
    ]


@dataclass(frozen=True)
class WorkerView:
    heartbeat: WorkerHeartbeat
    age_s: float  # seconds since the heartbeat was sent


@dataclass
class ModelFleet:
    model: str
    queue: str
    live_workers: int
    workers: list[WorkerView] = field(default_factory=list)
    queue_depth: int = 0
    celery_queue_length: int = 0
    drain_rate: float = 0.0


async def read_fleet(
    redis: Redis, keys: Keys, registry: Registry, book: QueueBook, *, heartbeat_ttl_s: float
) -> list[ModelFleet]:
    """One view per model of the registry (admin-only models included). Raises RedisError."""
    now = time.time()
    models = registry.models
    lists = [celery_lists(entry.queue) for entry in models]
    pipe = redis.pipeline(transaction=False)
    for entry, names in zip(models, lists, strict=True):
        pipe.zrangebyscore(keys.workers(entry.model_name), now - heartbeat_ttl_s, "+inf")
        for name in names:
            pipe.llen(name)
    replies = iter(await pipe.execute())
    out: list[ModelFleet] = []
    for entry, names in zip(models, lists, strict=True):
        ids = [str(x) for x in next(replies)]  # the zset read, then the queue's lists
        lengths = [next(replies) for _ in names]
        out.append(
            ModelFleet(
                model=entry.model_name,
                queue=entry.queue,
                live_workers=len(ids),
                workers=await _heartbeats(redis, keys, ids, now),
                queue_depth=await book.depth(entry.model_name),
                celery_queue_length=sum(int(n) for n in lengths),
                drain_rate=await book.drain_rate(entry.model_name),
            )
        )
    return out


async def _heartbeats(redis: Redis, keys: Keys, ids: list[str], now: float) -> list[WorkerView]:
    if not ids:
        return []
    raws = await redis.mget([keys.worker(i) for i in ids])
    views = []
    for worker_id, raw in zip(ids, raws, strict=True):
        if raw is None:  # expired between the two reads: the worker just left
            continue
        try:
            hb = WorkerHeartbeat.model_validate_json(raw)
        except ValidationError:
            logger.warning("unreadable heartbeat of worker %s (other protocol version?)", worker_id)
            continue
        views.append(WorkerView(heartbeat=hb, age_s=max(0.0, now - hb.sent_at)))
    return sorted(views, key=lambda v: v.heartbeat.worker_id)
