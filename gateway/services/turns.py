"""One pipeline behind every front door: build the job, lock the conversation, submit.

Both APIs (the seed's ``/medgemma`` and OpenAI's) parse their request into one typed
:class:`TurnRequest` and call :meth:`TurnService.start`; they differ only in how they parse
requests and format events. The capability checks both need are here too.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from redis.asyncio.client import Pipeline

from gateway.core.errors import APIError
from gateway.services.apikeys import Principal
from gateway.services.conversations import ConversationStore
from gateway.services.giveback import GiveBack, Release
from gateway.services.images import RawImage
from gateway.services.jobs import JobService
from gateway.services.relay import Subscription
from shared.errors import ErrorCode
from shared.keys import owner_tag
from shared.protocol import (
    ChatMessage,
    ConversationRef,
    ImagePart,
    Job,
    JobMeta,
    Priority,
    SamplingParams,
    SlotRef,
    TextPart,
)
from shared.registry import ModelEntry


def new_id(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(16).replace("-", "a").replace("_", "b")


Part = str | RawImage


@dataclass(frozen=True)
class PendingMessage:
    """A message as a front door parsed it: text and validated images, not yet stored."""

    role: Literal["system", "user", "assistant"]
    parts: Sequence[Part]


@dataclass(frozen=True)
class TurnRequest:
    """One new turn as either API asks for it."""

    principal: Principal
    entry: ModelEntry
    new: PendingMessage  # the user's new message
    sampling: SamplingParams
    api: Literal["medgemma", "openai"]
    system: str | None = None
    conversation_id: str | None = None  # the stored history is the context, the turn is kept
    earlier: Sequence[PendingMessage] = ()  # the context of a stateless turn
    include_usage: bool = False
    priority: Priority = "interactive"


@dataclass
class Turn:
    job: Job
    sub: Subscription
    conversation_id: str | None


def check_streaming(entry: ModelEntry, stream: bool) -> None:
    """400 if a stream is asked of a model that cannot stream."""
    if stream and not entry.capabilities.stream:
        raise APIError(
            400,
            ErrorCode.UNSUPPORTED_CAPABILITY,
            f"Model {entry.model_name!r} cannot stream; set stream to false.",
            param="stream",
        )


def check_images(entry: ModelEntry, count: int, *, param: str = "image") -> None:
    """400 if images are sent to a model that does not read them."""
    if count and not entry.capabilities.image:
        raise APIError(
            400,
            ErrorCode.UNSUPPORTED_CAPABILITY,
            f"Model {entry.model_name!r} does not read images; send text only or pick a "
            "model with the image capability.",
            param=param,
        )


class TurnService:
    def __init__(
        self,
        jobs: JobService,
        conversations: ConversationStore,
        *,
        queue_timeout_s: float,
        max_generation_s: float,
        max_images: int,
        turn_ttl_s: int,
        background_max_wait_s: float = 30.0,
        give_back: GiveBack | None = None,
    ) -> None:
        self.jobs = jobs
        self._give_back = give_back if give_back is not None else GiveBack()
        self.conversations = conversations
        self._max_images = max_images
        self._image_ttl_s = turn_ttl_s
        self._queue_timeout_s = queue_timeout_s
        self._max_generation_s = max_generation_s
        self._lock_ttl_s = turn_ttl_s
        self._background_max_wait_s = background_max_wait_s

    @contextlib.asynccontextmanager
    async def start(self, turn: TurnRequest, *, slot: SlotRef | None = None) -> AsyncIterator[Turn]:
        """Submit one turn. With ``conversation_id`` the stored history is the context and
        the finished turn is stored; without it the turn is stateless (``earlier`` is the
        context the client sent). ``slot`` (the stream slot this turn holds) travels with
        the job: the terminal step releases it."""
        principal, entry, conversation_id = turn.principal, turn.entry, turn.conversation_id
        self._check_images(entry, [turn.new, *turn.earlier])
        job_id = new_id()
        ref: ConversationRef | None = None
        stored: list[ChatMessage] | None = None
        if conversation_id is not None:
            ref = ConversationRef(user_id=principal.user_id, conversation_id=conversation_id)
            try:
                stored = await self.conversations.lock(
                    principal.user_id, conversation_id, job_id, self._lock_ttl_s
                )
            except BaseException:
                # The lock may have been taken with its reply lost: give it back (the
                # release only deletes a lock that names this job).
                self._give_back.later("conversation lock", self._unlocker(ref, job_id))
                raise
            if stored is None:
                raise APIError(
                    409,
                    ErrorCode.CONVERSATION_BUSY,
                    "This conversation is still answering the previous message; wait for it "
                    "to finish, then send the next one.",
                    param="conversation_id",
                )
        enqueued = False
        try:
            store = _ImageStore(job_id, self.jobs.image_key)
            history = stored if stored is not None else [store.message(m) for m in turn.earlier]
            messages: list[ChatMessage] = []
            if turn.system:
                messages.append(ChatMessage(role="system", content=[TextPart(text=turn.system)]))
            messages += history
            messages.append(store.message(turn.new))
            await self._store_images(store)
            now = time.time()
            yields_until = (
                now + self._background_max_wait_s if turn.priority == "background" else None
            )
            meta = JobMeta(
                job_id=job_id,
                owner=owner_tag(principal.user_id),
                model=entry.model_name,
                api=turn.api,
                conversation_id=conversation_id,
                created=int(time.time()),
                include_usage=turn.include_usage,
                yields_until=yields_until,
            )
            job = Job(
                job_id=job_id,
                model=entry.model_name,
                messages=messages,
                sampling=turn.sampling,
                conversation=ref,
                slot=slot,
                enqueued_at=now,
                start_deadline=now + self._queue_timeout_s,
                max_generation_s=self._max_generation_s,
                priority=turn.priority,
                yields_until=yields_until,
            )

            def remember(pipe: Pipeline) -> None:
                if ref is not None:
                    self.conversations.add_job(pipe, ref.user_id, ref.conversation_id, job_id)

            async with self.jobs.submit(
                job, entry.queue, max_queue=entry.serving.max_queue, meta=meta, also=remember
            ) as sub:
                enqueued = True  # from now on the worker releases the lock
                yield Turn(job=job, sub=sub, conversation_id=conversation_id)
        finally:
            if not enqueued:
                await self._release(ref, job_id, len(store.raw))

    async def _release(self, ref: ConversationRef | None, job_id: str, images: int) -> None:
        """Give back what a turn that was never enqueued holds: the conversation's lock and
        the images stored for it (retried in the background while Redis is unreachable)."""
        if ref is not None:
            await self._give_back.now_or_later("conversation lock", self._unlocker(ref, job_id))
        if images:
            await self._give_back.now_or_later(
                "turn's images", lambda: self.jobs.discard_images(job_id, images)
            )

    def _unlocker(self, ref: ConversationRef, job_id: str) -> Release:
        return lambda: self.conversations.unlock(ref.user_id, ref.conversation_id, job_id)

    def _check_images(self, entry: ModelEntry, messages: Sequence[PendingMessage]) -> None:
        count = sum(isinstance(p, RawImage) for m in messages for p in m.parts)
        check_images(entry, count)
        if count > self._max_images:
            raise APIError(
                400,
                ErrorCode.TOO_MANY_IMAGES,
                f"{count} images sent; at most {self._max_images} per request.",
                param="image",
            )

    async def _store_images(self, store: _ImageStore) -> None:
        if store.raw:
            await self.jobs.store_images(store.job_id, store.raw, self._image_ttl_s)


class _ImageStore:
    """Turns pending messages into job messages, numbering their images for storage."""

    def __init__(self, job_id: str, key: Callable[[str, int], str]) -> None:
        self.job_id = job_id
        self._key = key
        self.raw: list[RawImage] = []

    def message(self, m: PendingMessage) -> ChatMessage:
        parts: list[TextPart | ImagePart] = []
        for p in m.parts:
            if isinstance(p, RawImage):
                parts.append(
                    ImagePart(
                        key=self._key(self.job_id, len(self.raw)),
                        mime_type=p.mime_type,
                        sha256=p.sha256,
                    )
                )
                self.raw.append(p)
            else:
                parts.append(TextPart(text=p))
        return ChatMessage(role=m.role, content=parts)
