"""The typed, versioned messages that cross Redis.

* :class:`Job` — what the gateway enqueues (Celery task ``medgemma.generate``, one queue per
  model). It holds the whole prompt, so a worker needs nothing else to run it.
* :data:`JobEvent` — what a worker emits for a job: ``token`` (a text delta), ``done`` (finish
  reason and usage) or ``error`` (code and message). Each carries the job id and a per-job
  sequence number starting at 1; the gateway uses it as the SSE ``id`` and to drop duplicates
  when it merges the live channel with the replay log.
* :class:`WorkerHeartbeat` — what a worker announces every few seconds.

Every message has a version field ``v``. A change that old readers would misread bumps it.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from shared.errors import ErrorInfo
from shared.keys import Keys

PROTOCOL_VERSION: Final = 1
GENERATE_TASK = "medgemma.generate"

#: A job's class. ``background`` work (a front end's titles, tags, suggestions) goes to its
#: own Celery queue, which workers read after the interactive one and only while they run no
#: interactive job; it may also pause in the worker for interactive work (worker/runtime/runner.py).
Priority = Literal["interactive", "background"]
PRIORITIES: Final[tuple[Priority, ...]] = ("interactive", "background")

#: The Celery lines of one model, in the order a worker reads them. ``promoted``: background work
#: that waited its share (``Job.promoted``), taken before anything else but only into a
#: background slot, so a flood that never ends cannot starve it nor take the clinicians' slots.
Line = Literal["promoted", "interactive", "background"]
LINES: Final[tuple[Line, ...]] = ("promoted", "interactive", "background")


def celery_queue(queue: str, line: Line) -> str:
    """The Celery queue of a model's ``queue`` for jobs of ``line``."""
    return queue if line == "interactive" else f"{queue}@{line}"


def line_rank(celery_queue_name: str) -> int:
    """Where a Celery queue of :func:`celery_queue` comes in :data:`LINES` (a worker reads the
    lower first; see ``shared.celery_config.LineOrder``)."""
    _, at, line = celery_queue_name.rpartition("@")
    return LINES.index(line) if at and line in LINES else LINES.index("interactive")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = PROTOCOL_VERSION


# --- the job ----------------------------------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text"] = "text"
    text: str


class ImagePart(BaseModel):
    """An image of the prompt. The bytes travel separately: the gateway stores them once under
    ``key`` (``{p}:job:{id}:image:{n}``, with a TTL) so the job message stays small; the worker
    reads them and deletes them when the job ends. In stored conversation history an image is
    replaced by the text ``[image]`` (the bytes are not kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["image"] = "image"
    key: str
    mime_type: Literal["image/png", "image/jpeg"]
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]
IMAGE_PLACEHOLDER = "[image]"


class ChatMessage(BaseModel):
    """One turn of a conversation as the worker's chat template sees it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Literal["system", "user", "assistant"]
    content: list[ContentPart]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))

    @property
    def images(self) -> list[ImagePart]:
        return [p for p in self.content if isinstance(p, ImagePart)]

    def without_images(self) -> ChatMessage:
        """This message as conversation history keeps it: images become ``[image]``."""
        if not self.images:
            return self
        parts: list[TextPart | ImagePart] = [
            p if isinstance(p, TextPart) else TextPart(text=IMAGE_PLACEHOLDER) for p in self.content
        ]
        return ChatMessage(role=self.role, content=parts)


class SamplingParams(BaseModel):
    """How to decode. ``temperature == 0`` means greedy decoding."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(default=512, ge=1)
    # No limit was asked for (an OpenAI request without max_tokens): max_new_tokens is only
    # the room kept for the answer when old turns are trimmed; the answer may run on to the
    # end of the context, bounded by the generation time limit.
    open_ended: bool = False
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class ConversationRef(BaseModel):
    """Where the worker appends the finished turn (the last user message and the answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: str
    conversation_id: str


class SlotRef(BaseModel):
    """The stream slot (a rate limiter's sorted-set member) the turn holds: whichever side
    ends the job releases it in the terminal step, even if the gateway that took it is gone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    member: str


class Job(_Message):
    """One generation, enqueued by the gateway and run by exactly one worker."""

    job_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    sampling: SamplingParams = SamplingParams()
    conversation: ConversationRef | None = None
    slot: SlotRef | None = None
    enqueued_at: float = Field(description="Unix time the gateway enqueued the job.")
    start_deadline: float = Field(
        description="Unix time after which a worker must not start the job: nobody waits for "
        "it any more. The worker answers with an error event instead."
    )
    handover: int = Field(
        default=0,
        ge=0,
        description="0 for the first run; n when re-enqueued after the n-th worker running it "
        "was lost. The new worker continues from the text already in the job's event log.",
    )
    max_generation_s: float | None = Field(
        default=None,
        gt=0,
        description="Longest the worker may generate (GATEWAY_MAX_GENERATION_S); it then ends "
        "the answer with finish_reason 'length'. The gateway sizes the turn lock, the images' "
        "and the stream slot's TTLs beyond it.",
    )
    priority: Priority = "interactive"
    yields_until: float | None = Field(
        default=None,
        description="For background work: Unix time until which it waits in line behind "
        "interactive work (GATEWAY_BACKGROUND_MAX_WAIT_S after enqueueing); a job still "
        "waiting then is promoted. Once running, it pauses for interactive work for at most as "
        "long again in all (share_s), so nothing starves.",
    )
    promoted: bool = Field(
        default=False,
        description="Background work sent again once past its yields_until, on its model's "
        "promoted line: workers take it first, into a background slot, even beside "
        "interactive work (for which it still pauses, up to share_s in all).",
    )

    @property
    def share_s(self) -> float | None:
        """Background work: how long it gives way to interactive work, in line (until
        ``yields_until``) and, in all, paused in a worker; None for interactive work."""
        if self.yields_until is None:
            return None
        return max(0.0, self.yields_until - self.enqueued_at)

    @property
    def line(self) -> Line:
        """The Celery line this job waits in."""
        if self.priority == "interactive":
            return "interactive"
        return "promoted" if self.promoted else "background"


# --- events -----------------------------------------------------------------------------------


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    cost: float = Field(default=0.0, ge=0.0, description="From the registry's billing prices.")


class _Event(_Message):
    job_id: str
    seq: int = Field(ge=1)


class TokenEvent(_Event):
    """The text of one or more tokens (joined when the writer or the relay fell behind)."""

    type: Literal["token"] = "token"
    text: str


class JobTiming(BaseModel):
    """When a job passed each stage, in Unix time, as the worker saw it: for benchmarks and
    operators (read from the job's log), never shown to API clients."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enqueued_at: float = Field(description="The gateway created the job (Job.enqueued_at).")
    started_at: float = Field(description="The worker started it, after its claim.")
    first_token_at: float | None = Field(
        default=None, description="The engine produced its first token (None: no token)."
    )


class DoneEvent(_Event):
    type: Literal["done"] = "done"
    finish_reason: Literal["stop", "length", "cancelled"]
    usage: Usage
    disclaimer: str | None = None
    timing: JobTiming | None = None


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    error: ErrorInfo


class QueuedEvent(BaseModel):
    """Made by the gateway (never logged, no sequence number) while a job waits for a worker:
    its place in line and an estimated start, from the measured drain rate."""

    model_config = ConfigDict(frozen=True)

    type: Literal["queued"] = "queued"
    job_id: str
    position: int = Field(ge=1)
    eta_s: float = Field(ge=0)


JobEvent = Annotated[TokenEvent | DoneEvent | ErrorEvent, Field(discriminator="type")]
TERMINAL_TYPES = frozenset({"done", "error"})

_event_adapter: TypeAdapter[JobEvent] = TypeAdapter(JobEvent)


def encode_event(event: TokenEvent | DoneEvent | ErrorEvent) -> str:
    return event.model_dump_json()


def decode_event(raw: str | bytes) -> TokenEvent | DoneEvent | ErrorEvent:
    return _event_adapter.validate_json(raw)


class JobMeta(_Message):
    """What the gateway records about a job so that its owner can cancel it and resume its
    stream in the format it was asked in (``{p}:job:{id}:meta``, JSON, TTL)."""

    job_id: str
    owner: str = Field(description="shared.keys.owner_tag of the user id")
    model: str
    api: Literal["medgemma", "openai"]
    conversation_id: str | None = None
    created: int
    include_usage: bool = False
    yields_until: float | None = Field(
        default=None, description="Background work only: the job's Job.yields_until."
    )


# --- workers ----------------------------------------------------------------------------------


QUEUE_WINDOW_S = 60.0  # the drain rate is measured over this window


def record_start(pipe: Any, keys: Keys, model: str, job_id: str, now: float) -> None:
    """Queue the commands a worker runs when it takes a job: it leaves the line and counts
    towards the model's drain rate."""
    for priority in PRIORITIES:  # (the worker does not know the job's class here)
        pipe.zrem(keys.queue_book(model, priority), job_id)
    starts = keys.queue_starts(model)
    pipe.zadd(starts, {job_id: now})
    pipe.zremrangebyscore(starts, "-inf", now - QUEUE_WINDOW_S)
    pipe.expire(starts, int(QUEUE_WINDOW_S * 2))


class WorkerHeartbeat(_Message):
    """What a live worker announces (``{p}:worker:{id}``, refreshed every few seconds)."""

    worker_id: str
    model: str
    device: str
    quantization: str
    jobs_running: int = Field(ge=0)
    concurrency: int = Field(ge=1)
    gpu_memory_free_bytes: int | None = None
    version: str
    started_at: float
    sent_at: float
