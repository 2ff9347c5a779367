"""Leases on running jobs: how a dead worker's jobs are noticed and handed over.

A worker claims a job with ``SET {p}:job:{id}:claim <worker> NX PX <ttl>`` and a background
thread renews every claim it holds about once a second, only while it still owns it (a Lua
compare-and-renew). If the worker dies, the claim lapses within the lease TTL; the gateway
following the job sees that and re-enqueues it, and another worker claims it and continues.
If a worker that was only slow finds its claim taken, it marks the job *lost* and stops
without publishing anything more: never two workers generating one job. (Its late events
could not land anyway: the event log only accepts increasing ids.)

A finished job's claim is replaced by ``done:<worker>`` with the job's TTL, so a late duplicate
of the job is skipped, not run again.
"""

from __future__ import annotations

import logging
import threading
import time

from redis import Redis
from redis.exceptions import RedisError

from shared.keys import DONE_PREFIX, Keys

logger = logging.getLogger(__name__)

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_FINISH = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[3] .. ARGV[1], 'EX', ARGV[2])
end
return 0
"""


class LeaseKeeper:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        worker_id: str,
        *,
        ttl_s: float,
        done_ttl_s: int,
        interval_s: float = 1.0,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.worker_id = worker_id
        self._ttl_ms = int(ttl_s * 1000)
        self._done_ttl_s = done_ttl_s
        self._interval_s = interval_s
        self._held: set[str] = set()
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewed_at = time.monotonic()  # the last time every held claim was renewed
        self._renew = redis.register_script(_RENEW)
        self._finish = redis.register_script(_FINISH)

    def acquire(self, job_id: str) -> bool:
        ok = self._redis.set(self._keys.job_claim(job_id), self.worker_id, nx=True, px=self._ttl_ms)
        if ok:
            with self._lock:
                if not self._held:
                    self._renewed_at = time.monotonic()
                self._held.add(job_id)
        return bool(ok)

    def lost(self, job_id: str) -> bool:
        return job_id in self._lost

    def forfeit(self, job_id: str) -> None:
        """Record that the claim was found taken (a fenced write said so) before a renewal did."""
        with self._lock:
            if job_id in self._held:
                self._lost.add(job_id)

    def release(self, job_id: str, *, finished: bool) -> None:
        """Stop renewing; a finished job keeps a ``done:`` marker so it never runs again."""
        with self._lock:
            self._held.discard(job_id)
            self._lost.discard(job_id)
        if finished:
            try:
                self._finish(
                    keys=[self._keys.job_claim(job_id)],
                    args=[self.worker_id, self._done_ttl_s, DONE_PREFIX],
                )
            except RedisError as exc:
                logger.warning("job %s: could not mark done: %s", job_id, type(exc).__name__)

    def renew_all(self) -> None:
        """Renew every held lease in one round trip (one script call each, pipelined): a
        worker running hundreds of jobs must renew them all well within the lease TTL."""
        with self._lock:
            held = list(self._held)
        if not held:
            return
        pipe = self._redis.pipeline(transaction=False)
        for job_id in held:
            self._renew(
                keys=[self._keys.job_claim(job_id)],
                args=[self.worker_id, self._ttl_ms],
                client=pipe,
            )
        try:
            results = pipe.execute()
        except RedisError as exc:
            silent_s = time.monotonic() - self._renewed_at
            if silent_s < self._ttl_ms / 1000:
                logger.warning("lease renewal failed: %s", type(exc).__name__)
                return
            # Not renewed for a whole lease: the claims have lapsed in Redis (or will before
            # any write lands); the jobs are the gateway's to hand over. Stop them here.
            logger.warning(
                "leases lapsed: Redis unreachable for %.1fs (%s); stopping %d job(s)",
                silent_s,
                type(exc).__name__,
                len(held),
            )
            with self._lock:
                self._lost.update(j for j in held if j in self._held)
            return
        self._renewed_at = time.monotonic()
        for job_id, ok in zip(held, results, strict=True):
            if not ok:
                logger.warning("job %s: lease lost; another worker continues it", job_id)
                with self._lock:
                    self._lost.add(job_id)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.renew_all()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
