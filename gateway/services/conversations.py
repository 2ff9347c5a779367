"""Conversation history in Redis, owned by one user each.

Keys are built from a hash of the owner's user id (see :mod:`shared.keys`), so one user can
never address another's conversation: for anyone else it simply does not exist (404). A turn
holds ``...:lock`` (value: its job id) from enqueue until the worker stores the answer, so two
concurrent turns on one conversation cannot interleave; the second gets 409. Workers append
finished turns (see ``worker/runtime/conversation.py``); the gateway reads, lists and deletes.
"""

from __future__ import annotations

from typing import cast

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from shared.keys import DONE_PREFIX, Keys
from shared.protocol import ChatMessage

#: How long a cancel request of an erased conversation's job stays readable by a late worker.
CANCEL_TTL_S = 3600

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ConversationSummary(BaseModel):
    conversation_id: str
    updated_at: float
    messages: int


class ConversationStore:
    def __init__(self, redis: Redis, keys: Keys, *, ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_s = ttl_s
        self._release = redis.register_script(_RELEASE)

    async def history(self, user_id: str, conversation_id: str) -> list[ChatMessage]:
        raw = await self._redis.lrange(self._keys.conversation(user_id, conversation_id), 0, -1)
        return [ChatMessage.model_validate_json(r) for r in raw]

    async def lock(
        self, user_id: str, conversation_id: str, job_id: str, ttl_s: int
    ) -> list[ChatMessage] | None:
        """Take the conversation's turn lock for ``job_id`` and read its history, in one
        round trip; None if another turn holds the lock. (A finished turn appends its answer
        and releases the lock in one transaction, so a lock taken here sees that answer.)"""
        pipe = self._redis.pipeline(transaction=True)
        pipe.set(self._keys.conversation_lock(user_id, conversation_id), job_id, nx=True, ex=ttl_s)
        pipe.lrange(self._keys.conversation(user_id, conversation_id), 0, -1)
        locked, raw = await pipe.execute()
        if not locked:
            return None
        return [ChatMessage.model_validate_json(r) for r in raw]

    def add_job(self, pipe: Pipeline, user_id: str, conversation_id: str, job_id: str) -> None:
        """Queue the commands that remember the job, so erasing the conversation also erases
        the job's event log."""
        key = self._keys.conversation_jobs(user_id, conversation_id)
        pipe.sadd(key, job_id)
        pipe.expire(key, self._ttl_s)

    async def unlock(self, user_id: str, conversation_id: str, job_id: str) -> None:
        key = self._keys.conversation_lock(user_id, conversation_id)
        await self._release(keys=[key], args=[job_id])

    async def list(self, user_id: str) -> list[ConversationSummary]:
        index = self._keys.conversations(user_id)
        rows = cast(
            list[tuple[str, float]], await self._redis.zrevrange(index, 0, -1, withscores=True)
        )
        pipe = self._redis.pipeline(transaction=False)
        for cid, _score in rows:
            pipe.llen(self._keys.conversation(user_id, cid))
        counts = await pipe.execute()
        gone = [cid for (cid, _s), n in zip(rows, counts, strict=True) if n == 0]
        if gone:  # expired conversations leave the index lazily
            await self._redis.zrem(index, *gone)
        return [
            ConversationSummary(conversation_id=cid, updated_at=score, messages=n)
            for (cid, score), n in zip(rows, counts, strict=True)
            if n
        ]

    async def delete(self, user_id: str, conversation_id: str) -> bool:
        """Erase the conversation and every trace of its jobs (event logs, records).

        A turn still running is cancelled (its worker stores nothing of it) and the turn lock
        goes too, so the conversation id is free at once. The running job's claim is kept:
        its worker keeps its lease and ends the job with a cancelled event instead of looking
        lost."""
        key = self._keys.conversation(user_id, conversation_id)
        jobs_key = self._keys.conversation_jobs(user_id, conversation_id)
        job_ids = sorted(cast(set[str], await self._redis.smembers(jobs_key)))
        claims = (
            await self._redis.mget([self._keys.job_claim(j) for j in job_ids]) if job_ids else []
        )
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(key)
        pipe.zrem(self._keys.conversations(user_id), conversation_id)
        pipe.delete(jobs_key)
        pipe.delete(self._keys.conversation_lock(user_id, conversation_id))
        for job_id, holder in zip(job_ids, claims, strict=True):
            if holder is not None and str(holder).startswith(DONE_PREFIX):  # finished: erase all
                pipe.delete(*self._keys.job_keys(job_id))
                continue
            claim = self._keys.job_claim(job_id)  # queued or running: cancel it
            pipe.delete(*[k for k in self._keys.job_keys(job_id) if k != claim])
            pipe.set(self._keys.job_cancel(job_id), "1", ex=CANCEL_TTL_S)
            pipe.publish(self._keys.cancel_channel, job_id)
        results = await pipe.execute()
        # Found if it had stored turns, or a first turn that is still running.
        return bool(results[0]) or bool(results[3]) or bool(job_ids)
