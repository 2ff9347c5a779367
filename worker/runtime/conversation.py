"""The worker's side of conversation history: append a finished turn, release the turn lock.

The gateway holds a per-conversation lock (``{p}:conv:...:lock`` = job id) while a turn runs,
so two concurrent turns cannot interleave. The worker appends the user's message and the
answer in the same transaction as the ``done`` event, so a client that sees ``done`` can read
the stored turn at once. The lock is released only by the job that holds it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from redis import Redis

from shared.keys import Keys
from shared.protocol import ChatMessage, ConversationRef, TextPart

if TYPE_CHECKING:
    from redis.client import Pipeline

# Delete the key only if it still holds this job's id (another turn may own it by now).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ConversationWriter:
    def __init__(self, redis: Redis, keys: Keys, *, ttl_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_s = ttl_s
        self._release = redis.register_script(_RELEASE)

    def append_turn(
        self, pipe: Pipeline, ref: ConversationRef, user: ChatMessage, answer: str
    ) -> None:
        """Queue the commands that store one finished turn on ``pipe``."""
        key = self._keys.conversation(ref.user_id, ref.conversation_id)
        assistant = ChatMessage(role="assistant", content=[TextPart(text=answer)])
        pipe.rpush(key, user.without_images().model_dump_json(), assistant.model_dump_json())
        pipe.expire(key, self._ttl_s)
        index = self._keys.conversations(ref.user_id)
        pipe.zadd(index, {ref.conversation_id: time.time()})
        pipe.expire(index, self._ttl_s)

    def release(self, ref: ConversationRef, job_id: str, pipe: Pipeline | None = None) -> None:
        """Release the turn lock if this job holds it (idempotent). With ``pipe``, as part of
        that transaction: the lock is free by the time a client sees the terminal event."""
        lock = self._keys.conversation_lock(ref.user_id, ref.conversation_id)
        self._release(keys=[lock], args=[job_id], client=pipe or self._redis)
