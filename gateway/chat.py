"""One pipeline behind every front door: build the job, lock the conversation, submit.

Both APIs (the seed's ``/medgemma`` and, later, OpenAI's) call :meth:`ChatService.start`;
they differ only in how they parse requests and format events.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from gateway.auth import Principal
from gateway.conversations import ConversationStore
from gateway.errors import APIError
from gateway.jobs import JobService
from gateway.relay import Subscription
from shared.errors import ErrorCode
from shared.protocol import ChatMessage, ConversationRef, Job, SamplingParams, TextPart
from shared.registry import ModelEntry


def new_id(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(16).replace("-", "a").replace("_", "b")


@dataclass
class Turn:
    job: Job
    sub: Subscription
    conversation_id: str | None


class ChatService:
    def __init__(
        self,
        jobs: JobService,
        conversations: ConversationStore,
        *,
        queue_timeout_s: float,
        max_generation_s: float,
    ) -> None:
        self.jobs = jobs
        self.conversations = conversations
        self._queue_timeout_s = queue_timeout_s
        self._lock_ttl_s = int(queue_timeout_s + max_generation_s) + 1

    @contextlib.asynccontextmanager
    async def start(
        self,
        principal: Principal,
        entry: ModelEntry,
        *,
        new: ChatMessage,
        system: str | None,
        sampling: SamplingParams,
        conversation_id: str | None,
        earlier: Sequence[ChatMessage] = (),
    ) -> AsyncIterator[Turn]:
        """Submit one turn. With ``conversation_id`` the stored history is the context and
        the finished turn is stored; without it the turn is stateless (``earlier`` is the
        context the client sent)."""
        job_id = new_id()
        history: list[ChatMessage] = list(earlier)
        ref: ConversationRef | None = None
        if conversation_id is not None:
            ref = ConversationRef(user_id=principal.user_id, conversation_id=conversation_id)
            locked = await self.conversations.lock(
                principal.user_id, conversation_id, job_id, self._lock_ttl_s
            )
            if not locked:
                raise APIError(
                    409,
                    ErrorCode.CONVERSATION_BUSY,
                    "This conversation is still answering the previous message; wait for it "
                    "to finish, then send the next one.",
                    param="conversation_id",
                )
        enqueued = False
        try:
            if ref is not None:
                history = await self.conversations.history(principal.user_id, ref.conversation_id)
            messages: list[ChatMessage] = []
            if system:
                messages.append(ChatMessage(role="system", content=[TextPart(text=system)]))
            messages += history
            messages.append(new)
            now = time.time()
            job = Job(
                job_id=job_id,
                model=entry.model_name,
                messages=messages,
                sampling=sampling,
                conversation=ref,
                enqueued_at=now,
                start_deadline=now + self._queue_timeout_s,
            )
            async with self.jobs.submit(job, entry.queue) as sub:
                enqueued = True  # from now on the worker releases the lock
                yield Turn(job=job, sub=sub, conversation_id=conversation_id)
        finally:
            if ref is not None and not enqueued:
                with contextlib.suppress(RedisError, OSError):
                    await self.conversations.unlock(principal.user_id, ref.conversation_id, job_id)
