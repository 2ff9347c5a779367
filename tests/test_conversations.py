"""Conversation history: the gateway's ConversationStore and the worker's ConversationWriter.

Both sides run against one fake Redis server (async client for the gateway, sync client for the
worker), as they share one Redis in production.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import types
from collections.abc import Awaitable, Callable
from typing import TypeVar

import fakeredis
import pytest

import worker.runtime.conversation
from gateway.services.conversations import ConversationStore
from shared.keys import Keys, owner_tag
from shared.protocol import ChatMessage, ConversationRef, TextPart
from worker.runtime.conversation import ConversationWriter

T = TypeVar("T")
TTL_S = 3600
ALICE = "alice@example.org"
BOB = "bob@example.org"


@pytest.fixture
def writer(redis: fakeredis.FakeRedis) -> ConversationWriter:
    return ConversationWriter(redis, Keys(), ttl_s=TTL_S)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> itertools.count[float]:
    """The writer's clock: each turn is stored one second after the previous one."""
    ticks = itertools.count(1_700_000_000.0, 1.0)
    fake = types.SimpleNamespace(time=lambda: next(ticks))
    monkeypatch.setattr(worker.runtime.conversation, "time", fake)
    return ticks


def run_store(server: fakeredis.FakeServer, fn: Callable[[ConversationStore], Awaitable[T]]) -> T:
    """Run ``fn`` with a ConversationStore on an async client of ``server`` (own event loop)."""

    async def main() -> T:
        redis = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
        try:
            return await fn(ConversationStore(redis, Keys(), ttl_s=3600))
        finally:
            await redis.aclose()

    return asyncio.run(main())


def _msg(role: str, text: str) -> ChatMessage:
    return ChatMessage(role=role, content=[TextPart(text=text)])  # type: ignore[arg-type]


def _store_turn(
    redis: fakeredis.FakeRedis, writer: ConversationWriter, user: str, cid: str, q: str, a: str
) -> None:
    pipe = redis.pipeline(transaction=True)
    writer.append_turn(pipe, ConversationRef(user_id=user, conversation_id=cid), _msg("user", q), a)
    pipe.execute()


# --- the lock ----------------------------------------------------------------------------------


def test_lock_is_exclusive(server: fakeredis.FakeServer) -> None:
    async def go(store: ConversationStore) -> tuple[bool, bool, bool]:
        first = await store.lock(ALICE, "c1", "job-aaaaaaaa", TTL_S)
        second = await store.lock(ALICE, "c1", "job-bbbbbbbb", TTL_S)
        other_conversation = await store.lock(ALICE, "c2", "job-bbbbbbbb", TTL_S)
        return first is not None, second is not None, other_conversation is not None

    assert run_store(server, go) == (True, False, True)


def test_only_the_holder_releases_the_lock(
    server: fakeredis.FakeServer, redis: fakeredis.FakeRedis, writer: ConversationWriter
) -> None:
    lock_key = Keys().conversation_lock(ALICE, "c1")
    ref = ConversationRef(user_id=ALICE, conversation_id="c1")

    async def take(store: ConversationStore) -> bool:
        return await store.lock(ALICE, "c1", "job-holder1", TTL_S) is not None

    assert run_store(server, take)
    assert 0 < redis.ttl(lock_key) <= TTL_S

    # Another job's id releases nothing, on either side.
    writer.release(ref, "job-intruder")
    run_store(server, lambda s: s.unlock(ALICE, "c1", "job-intruder"))
    assert redis.get(lock_key) == "job-holder1"
    assert run_store(server, lambda s: s.lock(ALICE, "c1", "job-other1", TTL_S)) is None

    # The worker, holding the job id, releases it; a new turn can then lock.
    writer.release(ref, "job-holder1")
    assert redis.get(lock_key) is None
    assert run_store(server, lambda s: s.lock(ALICE, "c1", "job-next1", TTL_S)) == []

    # The gateway's unlock with the right id works too.
    run_store(server, lambda s: s.unlock(ALICE, "c1", "job-next1"))
    assert redis.get(lock_key) is None


# --- turns and history ----------------------------------------------------------------------


def test_written_turn_reads_back_in_order(
    server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    writer: ConversationWriter,
    clock: itertools.count[float],
) -> None:
    _store_turn(redis, writer, ALICE, "c1", "What is a fever?", "A raised temperature.")
    _store_turn(redis, writer, ALICE, "c1", "And a cough?", "A reflex.")
    history = run_store(server, lambda s: s.history(ALICE, "c1"))
    assert [(m.role, m.text) for m in history] == [
        ("user", "What is a fever?"),
        ("assistant", "A raised temperature."),
        ("user", "And a cough?"),
        ("assistant", "A reflex."),
    ]


def test_unknown_conversation_has_no_history(server: fakeredis.FakeServer) -> None:
    assert run_store(server, lambda s: s.history(ALICE, "never")) == []


def test_list_is_most_recent_first(
    server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    writer: ConversationWriter,
    clock: itertools.count[float],
) -> None:
    _store_turn(redis, writer, ALICE, "old", "q", "a")
    _store_turn(redis, writer, ALICE, "middle", "q", "a")
    _store_turn(redis, writer, ALICE, "new", "q", "a")
    _store_turn(redis, writer, ALICE, "old", "q2", "a2")  # used again: now the newest
    rows = run_store(server, lambda s: s.list(ALICE))
    assert [r.conversation_id for r in rows] == ["old", "new", "middle"]
    assert [r.messages for r in rows] == [4, 2, 2]
    assert rows[0].updated_at > rows[1].updated_at > rows[2].updated_at


def test_list_hides_expired_conversations(
    server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    writer: ConversationWriter,
    clock: itertools.count[float],
) -> None:
    keys = Keys()
    _store_turn(redis, writer, ALICE, "keep", "q", "a")
    _store_turn(redis, writer, ALICE, "gone", "q", "a")
    redis.pexpire(keys.conversation(ALICE, "gone"), 1)
    deadline = time.monotonic() + 2
    while redis.exists(keys.conversation(ALICE, "gone")) and time.monotonic() < deadline:
        time.sleep(0.005)
    rows = run_store(server, lambda s: s.list(ALICE))
    assert [r.conversation_id for r in rows] == ["keep"]
    # and the index forgets it, so it never comes back
    assert redis.zrange(keys.conversations(ALICE), 0, -1) == ["keep"]


def test_users_with_the_same_conversation_id_are_separate(
    server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    writer: ConversationWriter,
    clock: itertools.count[float],
) -> None:
    _store_turn(redis, writer, ALICE, "shared-id", "alice asks", "alice answer")
    _store_turn(redis, writer, BOB, "shared-id", "bob asks", "bob answer")

    async def go(store: ConversationStore) -> tuple[list[str], list[str], int, int]:
        a = [m.text for m in await store.history(ALICE, "shared-id")]
        b = [m.text for m in await store.history(BOB, "shared-id")]
        return a, b, len(await store.list(ALICE)), len(await store.list(BOB))

    alice, bob, n_alice, n_bob = run_store(server, go)
    assert alice == ["alice asks", "alice answer"]
    assert bob == ["bob asks", "bob answer"]
    assert (n_alice, n_bob) == (1, 1)

    # One user's lock does not block the other.
    # (and the lock hands each their own history)
    taken = run_store(server, lambda s: s.lock(ALICE, "shared-id", "job-alice1", TTL_S))
    assert [m.text for m in taken or []] == alice
    taken = run_store(server, lambda s: s.lock(BOB, "shared-id", "job-bob0001", TTL_S))
    assert [m.text for m in taken or []] == bob

    # Bob deleting his does not touch Alice's.
    assert run_store(server, lambda s: s.delete(BOB, "shared-id"))
    assert [m.text for m in run_store(server, lambda s: s.history(ALICE, "shared-id"))] == alice


def test_user_ids_never_appear_in_key_names(
    redis: fakeredis.FakeRedis, writer: ConversationWriter, clock: itertools.count[float]
) -> None:
    _store_turn(redis, writer, ALICE, "c1", "q", "a")
    names = list(redis.scan_iter("*"))
    assert names
    assert all(ALICE not in n for n in names)
    assert all(owner_tag(ALICE) in n for n in names)


def test_delete(
    server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    writer: ConversationWriter,
    clock: itertools.count[float],
) -> None:
    _store_turn(redis, writer, ALICE, "c1", "q", "a")
    _store_turn(redis, writer, ALICE, "c2", "q", "a")

    async def go(store: ConversationStore) -> tuple[bool, bool, list[str], int]:
        first = await store.delete(ALICE, "c1")
        again = await store.delete(ALICE, "c1")
        listed = [r.conversation_id for r in await store.list(ALICE)]
        left = len(await store.history(ALICE, "c1"))
        return first, again, listed, left

    deleted, again, listed, left = run_store(server, go)
    assert deleted is True
    assert again is False
    assert listed == ["c2"]
    assert left == 0
    assert redis.zscore(Keys().conversations(ALICE), "c1") is None


def test_every_key_has_a_ttl(
    server: fakeredis.FakeServer,
    redis: fakeredis.FakeRedis,
    writer: ConversationWriter,
    clock: itertools.count[float],
) -> None:
    run_store(server, lambda s: s.lock(ALICE, "c1", "job-aaaaaaaa", 600))
    _store_turn(redis, writer, ALICE, "c1", "q", "a")
    _store_turn(redis, writer, BOB, "c9", "q", "a")
    names = list(redis.scan_iter("*"))
    assert len(names) == 5  # two conversations, two indexes, one lock
    for name in names:
        assert redis.ttl(name) > 0, name
