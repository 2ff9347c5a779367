"""Per-key rate limits on a fake Redis server: a sliding minute and concurrent streams, shared
by every gateway process (two RateLimiters on one server), with a clock the tests move."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import fakeredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.services.ratelimit import RateLimited, RateLimiter
from shared.keys import owner_tag

T = TypeVar("T")
ALICE = "alice@example.org"
BOB = "bob@example.org"
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def run(fn: Callable[[fakeredis.FakeServer, Clock], Awaitable[T]]) -> T:
    """Run ``fn`` on a fresh fake server and clock, in its own event loop."""

    async def main() -> T:
        return await fn(fakeredis.FakeServer(), Clock())

    return anyio.run(main)


async def hit(rl: RateLimiter, user_id: str) -> None:
    """Count one request (no stream slot)."""
    await rl.admit(user_id, stream=False)


def limiter(
    server: fakeredis.FakeServer,
    clock: Clock,
    *,
    rpm: int = 0,
    streams: int = 0,
    stream_ttl_s: int = 600,
    network_delay_s: float = 0.0,
) -> RateLimiter:
    redis = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    if network_delay_s:
        # fakeredis answers without suspending; a real Redis reply takes a trip to the loop,
        # which is where a cancelled task gets cancelled again.
        zrem = redis.zrem

        async def slow_zrem(name: str, *values: str) -> int:
            await asyncio.sleep(network_delay_s)
            return int(await zrem(name, *values))

        setattr(redis, "zrem", slow_zrem)  # noqa: B010
    return RateLimiter(
        redis,
        "mg",
        requests_per_minute=rpm,
        concurrent_streams=streams,
        stream_ttl_s=stream_ttl_s,
        clock=clock,
    )


async def all_keys_have_ttl(server: fakeredis.FakeServer) -> list[str]:
    redis = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    keys = sorted(str(k) for k in await redis.keys("*"))
    for key in keys:
        assert await redis.pttl(key) > 0, key
    return keys


# --- requests per minute -----------------------------------------------------------------------


def test_the_request_over_the_limit_waits_for_the_window() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        rl = limiter(server, clock, rpm=3)
        for dt in (0.0, 10.0, 20.0):
            clock.now = T0 + dt
            await rl.admit(ALICE, stream=False)
        clock.now = T0 + 30.0
        with pytest.raises(RateLimited) as err:
            await rl.admit(ALICE, stream=False)
        assert err.value.limit == "requests_per_minute"
        assert err.value.retry_after_s == 30  # the first request leaves the window at T0+60
        assert "3 requests per minute" in err.value.message
        clock.now = T0 + 59.5
        with pytest.raises(RateLimited) as err:
            await rl.admit(ALICE, stream=False)
        assert err.value.retry_after_s == 1  # never 0
        await rl.admit(BOB, stream=False)  # another key has its own window
        clock.now = T0 + 60.0
        await hit(rl, ALICE)  # the first request left; the refused ones were not counted
        with pytest.raises(RateLimited) as err:
            await rl.admit(ALICE, stream=False)
        assert err.value.retry_after_s == 10  # now the T0+10 request is the one to wait for

    run(go)


def test_two_gateways_share_the_count() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        a, b = limiter(server, clock, rpm=4), limiter(server, clock, rpm=4)
        await a.admit(ALICE, stream=False)
        await b.admit(ALICE, stream=False)
        await asyncio.gather(a.admit(ALICE, stream=False), b.admit(ALICE, stream=False))
        for gw in (a, b):
            with pytest.raises(RateLimited) as err:
                await gw.admit(ALICE, stream=False)
            assert 1 <= err.value.retry_after_s <= 60

    run(go)


def test_concurrent_hits_never_exceed_the_limit() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        gateways = [limiter(server, clock, rpm=10) for _ in range(3)]
        results = await asyncio.gather(
            *(hit(gateways[n % 3], ALICE) for n in range(30)), return_exceptions=True
        )
        assert sum(r is None for r in results) == 10
        assert all(isinstance(r, RateLimited) for r in results if r is not None)

    run(go)


# --- concurrent streams ------------------------------------------------------------------------


def test_the_stream_over_the_limit_is_refused_until_one_ends() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        a, b = limiter(server, clock, streams=2), limiter(server, clock, streams=2)
        async with await a.admit(ALICE, stream=True):
            async with await b.admit(ALICE, stream=True):
                with pytest.raises(RateLimited) as err:
                    async with await a.admit(ALICE, stream=True):
                        pytest.fail("a third stream ran")
                assert err.value.limit == "concurrent_streams"
                assert 1 <= err.value.retry_after_s <= 5
                async with await a.admit(BOB, stream=True):
                    pass
                assert await all_keys_have_ttl(server) == [f"mg:rl:{owner_tag(ALICE)}:streams"]
            async with await b.admit(ALICE, stream=True):  # the inner one ended: its slot is free
                pass
        assert await all_keys_have_ttl(server) == []  # released slots leave nothing behind

    run(go)


def test_an_exception_in_the_block_frees_the_slot() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        rl = limiter(server, clock, streams=1)
        with pytest.raises(RuntimeError):
            async with await rl.admit(ALICE, stream=True):
                raise RuntimeError("generation failed")
        async with await rl.admit(ALICE, stream=True):
            pass

    run(go)


def test_cancellation_frees_the_slot() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        rl = limiter(server, clock, streams=1, network_delay_s=0.01)
        started = asyncio.Event()

        async def client() -> None:
            async with await rl.admit(ALICE, stream=True):
                started.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(client())
        await started.wait()
        task.cancel()  # asyncio: the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await task
        with anyio.move_on_after(0.05):  # anyio: cancellation that keeps cancelling
            async with await rl.admit(ALICE, stream=True):
                await anyio.sleep(60)
        async with await rl.admit(ALICE, stream=True):
            pass

    run(go)


def test_a_slot_of_a_dead_gateway_expires() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        dead, alive = (
            limiter(server, clock, streams=1, stream_ttl_s=300),
            limiter(server, clock, streams=1, stream_ttl_s=300),
        )
        holder = await dead.admit(ALICE, stream=True)
        await holder.__aenter__()  # and never exits: the process died mid-stream
        clock.now = T0 + 100
        with pytest.raises(RateLimited) as err:
            async with await alive.admit(ALICE, stream=True):
                pass
        assert err.value.retry_after_s == 5  # capped: streams usually end well before the TTL
        clock.now = T0 + 299
        with pytest.raises(RateLimited) as err:
            async with await alive.admit(ALICE, stream=True):
                pass
        assert err.value.retry_after_s == 1
        clock.now = T0 + 300
        async with await alive.admit(ALICE, stream=True):
            pass

    run(go)


# --- both --------------------------------------------------------------------------------------


def test_zero_disables_and_keys_are_opaque_with_ttls() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        off = limiter(server, clock, rpm=0, streams=0)
        for _ in range(1000):
            await off.admit(ALICE, stream=False)
        async with await off.admit(ALICE, stream=True), await off.admit(ALICE, stream=True):
            pass
        assert await all_keys_have_ttl(server) == []

        on = limiter(server, clock, rpm=5, streams=2, stream_ttl_s=900)
        await on.admit(ALICE, stream=False)
        async with await on.admit(ALICE, stream=True), await on.admit(ALICE, stream=True):
            keys = await all_keys_have_ttl(server)
            assert keys == [f"mg:rl:{owner_tag(ALICE)}:{k}" for k in ("rpm", "streams")]
            assert not any("alice" in k for k in keys)
            redis = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
            assert 59_000 < await redis.pttl(keys[0]) <= 60_000
            assert 899_000 < await redis.pttl(keys[1]) <= 900_000

    run(go)


def test_one_call_takes_both_limits_or_neither() -> None:
    """admit() counts the request and takes a stream slot in one round trip; refused by the
    stream limit, the request is not counted against the minute either."""

    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        rl = limiter(server, clock, rpm=2, streams=1, stream_ttl_s=900)
        async with await rl.admit(ALICE, stream=True):
            with pytest.raises(RateLimited) as err:
                await rl.admit(ALICE, stream=True)
            assert err.value.limit == "concurrent_streams"
            await rl.admit(ALICE, stream=False)  # the refused one did not use up the minute
            with pytest.raises(RateLimited) as err:
                await rl.admit(ALICE, stream=False)
            assert err.value.limit == "requests_per_minute"
        clock.now = T0 + 60
        async with await rl.admit(ALICE, stream=True):  # the slot was released on exit
            pass

    run(go)


def test_bad_settings_are_refused() -> None:
    server, clock = fakeredis.FakeServer(), Clock()
    with pytest.raises(ValueError):
        limiter(server, clock, rpm=-1)
    with pytest.raises(ValueError):
        limiter(server, clock, streams=1, stream_ttl_s=0)


async def _slot_tokens(server: fakeredis.FakeServer) -> list[str]:
    redis = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    keys = [k async for k in redis.scan_iter("mg:rl:*:streams")]
    return [t for k in keys for t in await redis.zrange(k, 0, -1)]


async def _until_no_slot(server: fakeredis.FakeServer, timeout_s: float) -> None:
    with anyio.fail_after(timeout_s):
        while await _slot_tokens(server):  # noqa: ASYNC110 - polls Redis, no event to wait on
            await anyio.sleep(0.05)


def test_a_slot_released_during_an_outage_is_given_back_when_redis_returns() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        rl = limiter(server, clock, streams=1)
        async with await rl.admit(ALICE, stream=True):
            server.connected = False  # Redis goes away while the stream runs: no release
        server.connected = True  # it is back (a restart with AOF keeps the slot)
        assert await _slot_tokens(server)
        await _until_no_slot(server, 5)
        async with await rl.admit(ALICE, stream=True):  # the user's slot is free again
            pass

    run(go)


def test_a_take_whose_reply_was_lost_gives_its_slot_back() -> None:
    async def go(server: fakeredis.FakeServer, clock: Clock) -> None:
        rl = limiter(server, clock, streams=1)
        take = rl._take

        async def reply_lost(**kwargs: Any) -> Any:
            await take(**kwargs)  # the script runs...
            raise RedisConnectionError("Connection closed by server.")  # ...its reply is lost

        rl._take = reply_lost  # type: ignore[assignment]
        with pytest.raises(RedisConnectionError):
            await rl.admit(ALICE, stream=True)
        rl._take = take
        await _until_no_slot(server, 5)
        async with await rl.admit(ALICE, stream=True):
            pass

    run(go)
