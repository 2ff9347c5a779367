"""One place that turns ``REDIS_URL`` into clients: plain Redis, TLS, password, or Sentinel.

``redis://[:password@]host:port/db`` and ``rediss://`` (TLS) are redis-py's own URLs.
For failover through Redis Sentinel, redis-py has no URL form, so this project defines one:

    sentinel://[:password@]host1:26379,host2:26379/db?master=mymaster

(the password is the data nodes'; add ``&sentinel_password=...`` if the sentinels need one).
Clients then ask the sentinels for the current master on every (re)connect, so a failover is
followed by the gateway, the workers and Celery (kombu's Redis transport speaks Sentinel too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.exceptions import AuthenticationError, RedisError


class RedisUrlError(ValueError):
    """REDIS_URL cannot be understood; the message says what is wrong."""


@dataclass(frozen=True)
class SentinelTarget:
    sentinels: list[tuple[str, int]]
    master: str
    db: int
    password: str | None
    sentinel_password: str | None


def parse_sentinel(url: str) -> SentinelTarget | None:
    """The Sentinel target of a ``sentinel://`` URL, or None for a plain Redis URL."""
    if not url.startswith("sentinel://"):
        return None
    parts = urlsplit(url)
    netloc = parts.netloc
    password = None
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        password = unquote(auth.split(":", 1)[1]) if ":" in auth else unquote(auth)
    sentinels = []
    for node in netloc.split(","):
        host, _, port = node.rpartition(":")
        if not host or not port.isdigit():
            raise RedisUrlError(f"REDIS_URL: sentinel {node!r} must be host:port")
        sentinels.append((host, int(port)))
    query = parse_qs(parts.query)
    master = (query.get("master") or [""])[0]
    if not master:
        raise RedisUrlError("REDIS_URL: a sentinel:// URL needs ?master=<name of the master>")
    path = parts.path.strip("/")
    return SentinelTarget(
        sentinels=sentinels,
        master=master,
        db=int(path) if path.isdigit() else 0,
        password=password,
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


class _BlockingSentinelSyncPool(
    redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool
):
    """Sentinel's master lookup with the blocking pool's bound (threads wait for a connection)."""


def sync_redis(
    url: str,
    *,
    max_connections: int | None = None,
    pool_timeout_s: float = 10.0,
    **kwargs: Any,
) -> redis.Redis:
    """A client for ``url``. With ``max_connections`` (a process whose threads share the
    client), its pool is bounded and blocking: a thread that finds every connection busy
    waits up to ``pool_timeout_s``, where redis-py's default pool would raise."""
    target = parse_sentinel(url)
    if target is None:
        if max_connections is None:
            return redis.Redis.from_url(url, **kwargs)
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout_s, **kwargs
        )
        return redis.Redis.from_pool(pool)
    sentinel = redis.sentinel.Sentinel(
        target.sentinels,
        sentinel_kwargs={"password": target.sentinel_password},
        password=target.password,
        db=target.db,
        **kwargs,
    )
    if max_connections is None:
        master: redis.Redis = sentinel.master_for(target.master)
    else:
        master = sentinel.master_for(
            target.master,
            connection_pool_class=_BlockingSentinelSyncPool,
            max_connections=max_connections,
            timeout=pool_timeout_s,
        )
    return master


class _BlockingSentinelPool(
    redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool
):
    """Sentinel's master lookup with the blocking pool's bound: waits for a free connection."""


def async_redis(
    url: str, *, max_connections: int, pool_timeout_s: float, **kwargs: Any
) -> redis.asyncio.Redis:
    """An asyncio client whose pool holds at most ``max_connections``; a command that finds
    them all busy waits up to ``pool_timeout_s`` for one (then ``ConnectionError``), rather
    than failing at once as redis-py's default pool does past its (unbounded-looking) 100."""
    target = parse_sentinel(url)
    if target is None:
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout_s, **kwargs
        )
        return redis.asyncio.Redis.from_pool(pool)
    sentinel = redis.asyncio.sentinel.Sentinel(
        target.sentinels,
        sentinel_kwargs={"password": target.sentinel_password},
        password=target.password,
        db=target.db,
        **kwargs,
    )
    master: redis.asyncio.Redis = sentinel.master_for(
        target.master,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=pool_timeout_s,
    )
    return master


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL and the transport options it needs for ``url``."""
    target = parse_sentinel(url)
    if target is None:
        return url, {}
    auth = f":{target.password}@" if target.password else ""
    broker = ";".join(f"sentinel://{auth}{h}:{p}/{target.db}" for h, p in target.sentinels)
    options: dict[str, Any] = {"master_name": target.master}
    if target.sentinel_password:
        options["sentinel_kwargs"] = {"password": target.sentinel_password}
    return broker, options


def credentials_refused(url: str) -> str | None:
    """A message if Redis refuses the credentials in ``url``, else None.

    Checked once at start-up so a wrong password is one clear line, not minutes of
    reconnect attempts (Celery) or a traceback (the gateway's start-up). Other failures
    (Redis not up yet) return None: the clients keep reconnecting."""
    where = urlsplit(url)
    try:
        with sync_redis(url, socket_connect_timeout=5, socket_timeout=5) as probe:
            probe.ping()
    except AuthenticationError as exc:
        return (
            f"Redis at {where.hostname}:{where.port or 6379} refused the credentials in "
            f"REDIS_URL ({exc}); set the right password (redis://:PASSWORD@host:port/db)"
        )
    except (RedisError, OSError):
        return None
    return None
