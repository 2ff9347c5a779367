"""Hears cancellations and turns them into a local flag the engine checks between steps.

The gateway cancels a job by setting ``{p}:job:{id}:cancel`` and publishing the id on
``{p}:cancel``. One listener thread per worker process subscribes to that channel and marks
the job if it runs here; the engine's stopping criterion reads the mark between decoding
steps, so there is no Redis round trip per token, and no process is killed (Celery's
``revoke(terminate=True)`` would kill the process and does not work on the threads pool). A
job cancelled before it started is seen by :meth:`CancelWatcher.cancelled_before_start`.
"""

from __future__ import annotations

import logging
import threading

from redis import Redis
from redis.exceptions import RedisError

from shared.keys import Keys

logger = logging.getLogger(__name__)


class CancelWatcher:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self._running: set[str] = set()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._listen, name="cancel-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self._keys.cancel_channel)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg["type"] == "message":
                        self._mark(str(msg["data"]))
            except (RedisError, OSError) as exc:
                logger.warning("cancel listener lost Redis (%s); retrying", type(exc).__name__)
                self._stop.wait(1.0)
            finally:
                pubsub.close()

    def _mark(self, job_id: str) -> None:
        with self._lock:
            if job_id in self._running:
                self._cancelled.add(job_id)
                logger.info("job %s: cancel received", job_id)

    def begin(self, job_id: str) -> None:
        with self._lock:
            self._running.add(job_id)
        # A cancel published just before begin() is caught by the key.
        if self.cancelled_before_start(job_id):
            self._mark(job_id)

    def end(self, job_id: str) -> None:
        with self._lock:
            self._running.discard(job_id)
            self._cancelled.discard(job_id)

    def is_cancelled(self, job_id: str) -> bool:
        return job_id in self._cancelled  # a set lookup: cheap enough for every step

    def cancelled_before_start(self, job_id: str) -> bool:
        try:
            return bool(self._redis.exists(self._keys.job_cancel(job_id)))
        except RedisError:
            return False
