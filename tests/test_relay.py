"""The relay against a real redis-server: no first event is lost, resume is exact, a slow
reader falls back to the log, and every stream shares one pub/sub connection."""

from __future__ import annotations

from collections.abc import Iterator

import anyio
import pytest
from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from gateway.services import relay as relay_module
from gateway.services.relay import Relay
from shared.keys import Keys
from shared.protocol import Usage
from tests.stack import lone_redis
from worker.runtime.events import EventPublisher

pytestmark = pytest.mark.integration
KEYS = Keys("t")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with lone_redis(tmp_path_factory.mktemp("relay-redis")) as url:
        yield url


def publish(url: str, job_id: str, texts: list[str], *, done: bool = True) -> None:
    pub = EventPublisher(Redis.from_url(url, decode_responses=True), KEYS, job_id, ttl_s=60)
    for t in texts:
        pub.token(t)
    if done:
        pub.done(
            "stop",
            Usage(prompt_tokens=1, completion_tokens=len(texts), total_tokens=1 + len(texts)),
            disclaimer=None,
        )


async def collect(
    relay: Relay,
    job_id: str,
    *,
    publish_first: list[str] | None = None,
    url: str = "",
    after: int = 0,
) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    async with relay.subscribe(job_id) as sub:
        if publish_first is not None:
            # The "worker" answers the instant the subscription exists, before anyone reads.
            publish(url, job_id, publish_first)
        async for ev in relay.events(sub, after_seq=after, first_timeout_s=5, idle_timeout_s=5):
            out.append((ev.seq, getattr(ev, "text", ev.type)))
    return out


def run_with_relay(url: str, fn):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        redis = AsyncRedis.from_url(url, decode_responses=True)
        relay = Relay(redis, KEYS)
        await relay.start()
        try:
            return await fn(relay, redis)
        finally:
            await relay.stop()
            await redis.aclose()

    return anyio.run(main)


def test_first_events_published_immediately_are_not_lost(redis_url: str) -> None:
    got = run_with_relay(
        redis_url,
        lambda relay, _r: collect(
            relay, "job-immediate", publish_first=["a", "b", "c"], url=redis_url
        ),
    )
    assert got == [(1, "a"), (2, "b"), (3, "c"), (4, "done")]


def test_events_published_before_subscribing_come_from_the_log(redis_url: str) -> None:
    publish(redis_url, "job-early", ["x", "y"])
    got = run_with_relay(redis_url, lambda relay, _r: collect(relay, "job-early"))
    assert got == [(1, "x"), (2, "y"), (3, "done")]


def test_resume_after_an_event_id_returns_exactly_the_rest(redis_url: str) -> None:
    publish(redis_url, "job-resume", ["1", "2", "3", "4"])
    got = run_with_relay(redis_url, lambda relay, _r: collect(relay, "job-resume", after=2))
    assert got == [(3, "3"), (4, "4"), (5, "done")]


def test_a_reader_whose_queue_overflows_loses_nothing(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_module, "QUEUE_BOUND", 4)
    texts = [f"t{i}" for i in range(50)]
    got = run_with_relay(
        redis_url, lambda relay, _r: collect(relay, "job-flood", publish_first=texts, url=redis_url)
    )
    assert [s for s, _ in got] == list(range(1, 52))
    assert [t for _, t in got[:-1]] == texts


def test_silence_ends_in_a_timeout(redis_url: str) -> None:
    async def wait(relay: Relay, _r: AsyncRedis) -> None:
        async with relay.subscribe("job-silent") as sub:
            async for _ in relay.events(sub, first_timeout_s=0.3, idle_timeout_s=0.3):
                pass

    with pytest.raises(TimeoutError):
        run_with_relay(redis_url, wait)


def test_many_streams_share_one_pubsub_connection(redis_url: str) -> None:
    async def many(relay: Relay, redis: AsyncRedis) -> tuple[int, list[int]]:
        import contextlib

        async with contextlib.AsyncExitStack() as stack:
            subs = [
                await stack.enter_async_context(relay.subscribe(f"job-many-{i}")) for i in range(50)
            ]
            clients = await redis.client_list()
            pubsub_conns = sum(1 for c in clients if int(c.get("sub", 0)) > 0)
            for i in range(50):
                publish(redis_url, f"job-many-{i}", [str(i)])
            lens = []
            for sub in subs:
                evs = [e async for e in relay.events(sub, first_timeout_s=5, idle_timeout_s=5)]
                lens.append(len(evs))
        return pubsub_conns, lens

    conns, lens = run_with_relay(redis_url, many)
    assert conns == 1
    assert lens == [2] * 50


def run_coalescing(url: str, fn, limit: int = 8):  # type: ignore[no-untyped-def]
    async def main():  # type: ignore[no-untyped-def]
        redis = AsyncRedis.from_url(url, decode_responses=True)
        relay = Relay(redis, KEYS, coalesce=limit)
        await relay.start()
        try:
            return await fn(relay)
        finally:
            await relay.stop()
            await redis.aclose()

    return anyio.run(main)


def test_a_reader_behind_gets_the_waiting_tokens_joined_and_resumes_exactly(
    redis_url: str,
) -> None:
    texts = [f"t{i} " for i in range(50)]
    publish(redis_url, "job-behind", texts)  # all written before the reader looks
    got = run_coalescing(redis_url, lambda relay: collect(relay, "job-behind"))
    # Runs of at most 8 token events, each carrying its run's text and last sequence number.
    assert [s for s, _ in got] == [8, 16, 24, 32, 40, 48, 50, 51]
    assert "".join(t for _, t in got[:-1]) == "".join(texts) and got[-1] == (51, "done")
    # A client that resumes after a joined event's id continues exactly after its text.
    rest = run_coalescing(redis_url, lambda relay: collect(relay, "job-behind", after=16))
    assert "".join(t for _, t in rest[:-1]) == "".join(texts[16:])


def test_live_tokens_that_pile_up_are_joined_and_one_that_keeps_up_is_not(
    redis_url: str,
) -> None:
    pub = EventPublisher(
        Redis.from_url(redis_url, decode_responses=True), KEYS, "job-pile", ttl_s=60
    )

    async def read(relay: Relay) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        async with relay.subscribe("job-pile") as sub:
            pub.token("a ")
            events = relay.events(sub, first_timeout_s=5, idle_timeout_s=5)
            async for ev in events:
                out.append((ev.seq, getattr(ev, "text", ev.type)))
                if ev.seq < 5:  # keeping up: the next token comes after this one was read
                    pub.token(f"{'bcde'[ev.seq - 1]} ")
                elif ev.seq == 5:  # falls behind: twenty tokens and the end pile up
                    for i in range(20):
                        pub.token(f"p{i} ")
                    usage = Usage(prompt_tokens=1, completion_tokens=25, total_tokens=26)
                    pub.done("stop", usage, disclaimer=None)
                    with anyio.fail_after(5):  # the relay's reader has queued them all
                        while sub.queue.qsize() < 21:  # noqa: ASYNC110 - a queue size
                            await anyio.sleep(0.01)
        return out

    got = run_coalescing(redis_url, read)
    assert got[:5] == [(1, "a "), (2, "b "), (3, "c "), (4, "d "), (5, "e ")]
    piled = got[5:-1]
    assert "".join(t for _, t in piled) == "".join(f"p{i} " for i in range(20))
    assert len(piled) == 3 and [s for s, _ in piled] == [13, 21, 25]  # 8 + 8 + 4
    assert got[-1] == (26, "done")


def run_on_resp2(url: str, fn, *, health_check_s: int = 0):  # type: ignore[no-untyped-def]
    """As the gateway runs it: subscriptions on a RESP2 connection of their own."""

    async def main():  # type: ignore[no-untyped-def]
        redis = AsyncRedis.from_url(url, decode_responses=True)
        listen = AsyncRedis.from_url(
            url, decode_responses=True, protocol=2, health_check_interval=health_check_s
        )
        relay = Relay(redis, KEYS, listen=listen)
        await relay.start()
        try:
            return await fn(relay, redis)
        finally:
            await relay.stop()
            await listen.aclose()
            await redis.aclose()

    return anyio.run(main)


def test_a_resp2_subscription_connection_relays_every_event(redis_url: str) -> None:
    texts = [f"w{i} " for i in range(30)]
    got = run_on_resp2(
        redis_url,
        lambda relay, _r: collect(relay, "job-resp2", publish_first=texts, url=redis_url),
    )
    assert [s for s, _ in got] == list(range(1, 32))
    assert [t for _, t in got[:-1]] == texts


def test_a_stream_whose_events_keep_coming_within_the_timeout_never_times_out(
    redis_url: str,
) -> None:
    """Each wait has its own deadline: events 0.15 s apart under a 0.4 s idle timeout go on
    for 1.5 s, several times the timeout, and end with the job."""
    pub = EventPublisher(
        Redis.from_url(redis_url, decode_responses=True), KEYS, "job-steady", ttl_s=60
    )

    async def steady(relay: Relay, _r: AsyncRedis) -> list[int]:
        seqs: list[int] = []

        async def produce() -> None:
            for i in range(10):
                await anyio.sleep(0.15)
                pub.token(f"s{i} ")
            usage = Usage(prompt_tokens=1, completion_tokens=10, total_tokens=11)
            pub.done("stop", usage, disclaimer=None)

        async with relay.subscribe("job-steady") as sub, anyio.create_task_group() as tg:
            tg.start_soon(produce)
            async for ev in relay.events(sub, first_timeout_s=0.4, idle_timeout_s=0.4):
                seqs.append(ev.seq)
        return seqs

    assert run_with_relay(redis_url, steady) == list(range(1, 12))


def test_the_blocked_subscription_connection_is_still_health_checked(redis_url: str) -> None:
    """The relay's reader blocks on its connection, so redis-py never gets to ping it; the
    relay does, once per health-check interval, and the stream after it still works."""

    async def idle_then_stream(relay: Relay, redis: AsyncRedis) -> tuple[list[str], int]:
        async with relay.subscribe("job-idle"):
            with anyio.fail_after(10):
                while True:
                    subscribed = [c for c in await redis.client_list() if int(c.get("sub", 0)) > 0]
                    if subscribed and subscribed[0]["cmd"] == "ping":
                        break
                    await anyio.sleep(0.1)
        got = await collect(relay, "job-after-ping", publish_first=["x "], url=redis_url)
        return [t for _, t in got], len(subscribed)

    texts, conns = run_on_resp2(redis_url, idle_then_stream, health_check_s=1)
    assert texts == ["x ", "done"] and conns == 1
