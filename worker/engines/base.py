"""What every engine shares: the protocol the job runner calls, a generation's result, and the
errors a prompt can raise before anything runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

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


class GenerationEngine(Protocol):
    """What the job runner needs from an engine (the model one, or the load-test one)."""

    def generate(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        *,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool] = ...,
        images: Mapping[str, Image.Image] | None = None,
        continue_text: str = "",
    ) -> GenerationResult: ...

    def warmup(self) -> None:
        """Run once before the worker announces itself: compile, capture graphs, allocate."""

    def close(self) -> None:
        """Stop background threads; the engine serves nothing afterwards."""

    def healthy(self) -> bool:
        """Whether its background threads (if any) still run: False makes the worker withdraw
        its heartbeat, so the gateway stops sending it work."""
