"""``python -m worker.healthcheck``: exit 0 if a worker on this host sent a fresh heartbeat.

Used by the container's healthcheck. The worker's id starts with the host name (see
``worker.settings``), so any fresh ``{p}:worker:{hostname}-*`` key means this container's worker
is loaded and consuming.
"""

from __future__ import annotations

import socket
import sys

from redis.exceptions import RedisError

from shared.redis_url import sync_redis
from worker.settings import WorkerSettings


def main() -> int:
    settings = WorkerSettings()
    pattern = f"{settings.key_prefix}:worker:{socket.gethostname()}-*"
    try:
        redis = sync_redis(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
        found = next(iter(redis.scan_iter(pattern, count=1000)), None)
    except RedisError as exc:
        sys.stderr.write(f"unhealthy: Redis unreachable ({type(exc).__name__})\n")
        return 1
    if found is None:
        sys.stderr.write("unhealthy: no fresh heartbeat from this host's worker\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
