"""What every engine shares: the generation sequence, written once, and its parts.

:class:`Engine` owns the sequence the job runner calls, the same for every engine:

    continuation → prompt → answer budget → text stream → decoding loop → finish reason → result

Only the **decoding loop** (:meth:`Engine.decode`) differs from one engine to another: the
model engine (:mod:`worker.engines.model`) decodes on the single-stream or the batch path, the
load-test engine (:mod:`worker.engines.loadtest`) emits numbered words at a fixed rate. The
prompt side is the engine's :class:`Prompting` (the model's chat template and tokenizer, or the
load-test engine's word counts).

Also here: a generation's result, and the errors a prompt can raise before anything runs.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeAlias, TypeVar

from PIL import Image

from shared.protocol import ChatMessage, SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]
#: How a generation was decoded: alone (``single``), in the batch (``batch``), or alone first
#: and then in the batch once another job arrived (``single+batch``); the load-test engine
#: reports ``loadtest``.
DecodePath = Literal["single", "batch", "single+batch", "loadtest"]
MIN_ANSWER_TOKENS = 1


class ImagesNotSupported(ValueError):
    """The prompt has images but this model has no vision tower."""

    def __init__(self) -> None:
        super().__init__("this model cannot read images; send text only")


class PromptTooLong(ValueError):
    """The newest message alone does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(
            f"The prompt is {prompt_tokens} tokens long, but this model's context window is "
            f"{limit + MIN_ANSWER_TOKENS} tokens, which must also hold the answer. Shorten "
            "the message."
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


@dataclass
class GenerationResult:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str
    first_token_s: float | None = None
    trimmed_messages: int = 0
    path: DecodePath = "single"


@dataclass(frozen=True)
class Continuation:
    """A job as the engine runs it: for a handed-over job, the answer a lost worker already sent
    (``done_tokens`` of it) is continued, and the answer budget shrinks by its tokens."""

    messages: Sequence[ChatMessage]
    sampling: SamplingParams
    done_tokens: int = 0
    #: Whether the sent answer is part of the prompt (prefilled as the start of the answer):
    #: then its tokens are taken off the prompt's count in the result.
    prefilled: bool = False


class EncodedPrompt(Protocol):
    """What the sequence reads of a prompt: its length (a prefilled answer included) and how
    many old messages were dropped to fit the context."""

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def trimmed(self) -> int: ...


PromptT = TypeVar("PromptT", bound=EncodedPrompt)


class TextStream(Protocol):
    """Token ids in, text deltas out to ``on_text`` (see :mod:`worker.engines.detokenize`)."""

    text: str  # everything sent so far
    stopped_by_string: bool
    first_token_at: float | None

    def push(self, ids: Sequence[int]) -> None: ...

    def end(self) -> None: ...


class Prompting(Protocol[PromptT]):
    """The prompt side of an engine: from a job's messages to the prompt it decodes from."""

    @property
    def eos_token_ids(self) -> Sequence[int]:
        """Ids that end an answer (an end-of-turn token): the finish reason is then ``stop``."""

    @property
    def multimodal(self) -> bool: ...

    def continuation(
        self, messages: Sequence[ChatMessage], sampling: SamplingParams, continue_text: str
    ) -> Continuation: ...

    def build(
        self,
        messages: Sequence[ChatMessage],
        max_new_tokens: int,
        images: Mapping[str, Image.Image] | None = None,
    ) -> PromptT: ...

    def budget(self, prompt: PromptT, max_new_tokens: int, *, open_ended: bool = False) -> int: ...

    def text_stream(
        self, on_text: Callable[[str], None], stop_strings: Sequence[str]
    ) -> TextStream: ...


class Engine(ABC, Generic[PromptT]):
    """An engine: the generation sequence (:meth:`generate`) around a decoding loop
    (:meth:`decode`), which each engine implements."""

    def __init__(self, prompter: Prompting[PromptT]) -> None:
        self.prompter = prompter

    @property
    def multimodal(self) -> bool:
        return self.prompter.multimodal

    def generate(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        *,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool] = lambda: False,
        images: Mapping[str, Image.Image] | None = None,
        continue_text: str = "",
        others_leaving: bool = False,
    ) -> GenerationResult:
        """Run one generation; ``on_text`` gets each text delta as soon as it is printable.

        ``images`` maps the key of each image part in ``messages`` to its image.
        ``continue_text`` is an answer already sent by a worker that was lost: generation goes
        on from it. ``should_stop`` is read between decoding steps (a cancel, a lost lease).
        ``others_leaving``: every other job in this engine stops after its current step
        (background work pausing for this one), so this one decodes as if it were alone."""
        job = self.prompter.continuation(messages, sampling, continue_text)
        prompt = self.prompter.build(job.messages, job.sampling.max_new_tokens, images)
        budget = self.prompter.budget(
            prompt, job.sampling.max_new_tokens, open_ended=job.sampling.open_ended
        )
        text = self.prompter.text_stream(on_text, tuple(job.sampling.stop))
        started = time.perf_counter()
        generated, path = self.decode(
            prompt, job, budget, text, should_stop, others_leaving=others_leaving
        )
        text.end()
        reason: FinishReason
        if text.stopped_by_string or (generated and generated[-1] in self.prompter.eos_token_ids):
            reason = "stop"
        elif len(generated) < budget and should_stop():
            reason = "cancelled"
        else:
            reason = "length"
        return GenerationResult(
            finish_reason=reason,
            prompt_tokens=prompt.prompt_tokens - (job.done_tokens if job.prefilled else 0),
            completion_tokens=len(generated) + job.done_tokens,
            text=continue_text + text.text,
            first_token_s=self.time_to_first_token(text, started),
            trimmed_messages=prompt.trimmed,
            path=path,
        )

    @abstractmethod
    def decode(
        self,
        prompt: PromptT,
        job: Continuation,
        budget: int,
        text: TextStream,
        should_stop: Callable[[], bool],
        *,
        others_leaving: bool = False,
    ) -> tuple[list[int], DecodePath]:
        """The decoding loop: generate at most ``budget`` tokens from ``prompt``, pushing them
        to ``text`` as they come, and stop early when ``text`` was stopped by a stop string or
        ``should_stop()`` says so. Returns the ids generated and how they were decoded."""

    def time_to_first_token(self, text: TextStream, started: float) -> float | None:
        """Seconds from the start of decoding to the first token (None: no token came)."""
        return None if text.first_token_at is None else text.first_token_at - started

    def warmup(self) -> None:
        """Run once before the worker announces itself: compile, capture graphs, allocate."""

    def close(self) -> None:
        """Stop background threads; the engine serves nothing afterwards."""

    def healthy(self) -> bool:
        """Whether its background threads (if any) still run: False makes the worker withdraw
        its heartbeat, so the gateway stops sending it work."""
        return True


#: What the job runner calls: any engine, whatever its prompt type.
GenerationEngine: TypeAlias = Engine[Any]
