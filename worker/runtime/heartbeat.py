"""Announces a live worker in Redis so the gateway knows which models can be served.

Every ``heartbeat_interval_s`` the worker writes its :class:`WorkerHeartbeat` to
``{p}:worker:{id}`` (with a TTL) and its id into ``{p}:workers:{model}`` scored by the time.
The gateway counts ids with a fresh score: no Celery broadcast per request, and a worker that
dies disappears within ``heartbeat_ttl_s``. Stale ids are pruned by every heartbeat.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

from shared.keys import Keys
from shared.protocol import WorkerHeartbeat

logger = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        snapshot: Callable[[], WorkerHeartbeat],
        interval_s: float,
        ttl_s: float,
        healthy: Callable[[], str | None] = lambda: None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._snapshot = snapshot
        self._healthy = healthy  # None, or what is broken
        self._withdrawn = False
        self._interval_s = interval_s
        self._ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        hb = self._snapshot()
        zkey = self._keys.workers(hb.model)
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._keys.worker(hb.worker_id), hb.model_dump_json(), px=int(self._ttl_s * 1000))
        pipe.zadd(zkey, {hb.worker_id: hb.sent_at})
        pipe.zremrangebyscore(zkey, "-inf", hb.sent_at - self._ttl_s)
        pipe.expire(zkey, int(self._ttl_s * 10) + 1)
        pipe.execute()

    def _run(self) -> None:
        while not self._stop.is_set():
            broken = self._healthy()
            if broken is not None:
                # A worker whose own threads died cannot serve: withdraw it, once, for good;
                # the gateway stops sending it work (and hands its jobs over).
                if not self._withdrawn:
                    logger.error("worker unhealthy (%s): withdrawing its heartbeat", broken)
                    self._withdraw()
                    self._withdrawn = True
            else:
                try:
                    self.beat()
                except RedisError as exc:
                    logger.warning("heartbeat failed: %s", type(exc).__name__)
            self._stop.wait(self._interval_s)

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and withdraw this worker at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._withdraw()

    def _withdraw(self) -> None:
        try:
            hb = self._snapshot()
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(self._keys.workers(hb.model), hb.worker_id)
            pipe.delete(self._keys.worker(hb.worker_id))
            pipe.execute()
        except RedisError as exc:
            logger.warning("could not withdraw heartbeat: %s", type(exc).__name__)
