"""A load-test engine: emits tokens at a fixed rate with no model at all.

Selected by ``"engine": "loadtest"`` in a models.json entry's ``serving`` block, and never a
default. It isolates the gateway, Redis and Celery from the model, so their capacity and
overhead can be measured on a CPU, and it gives reliability tests generations of a known,
adjustable length (cancellation, resume, worker death). Its "answer" is the words
``tok0 tok1 ...`` (token ``i`` is the word ``tok{i}``); its prompt token count is the number of
words in the prompt. It runs the same sequence as the model engine
(:class:`~worker.engines.base.Engine`); only its decoding loop is its own. It has no stop
strings and no end-of-turn token: an answer ends at its length, or when it must stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from shared.protocol import ChatMessage, SamplingParams
from worker.engines.base import Continuation, DecodePath, Engine, TextStream


@dataclass(frozen=True)
class WordPrompt:
    prompt_tokens: int
    trimmed: int = 0


@dataclass
class WordStream:
    """Token ``i`` is the text ``"tok{i} "``, sent as it comes."""

    on_text: Callable[[str], None]
    text: str = ""
    stopped_by_string: bool = False  # (never: no stop strings here)
    first_token_at: float | None = None

    def push(self, ids: Sequence[int]) -> None:
        for i in ids:
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            word = f"tok{i} "
            self.text += word
            self.on_text(word)

    def end(self) -> None:
        pass


class WordPrompter:
    """The load-test engine's prompt side: words are tokens."""

    multimodal = True
    eos_token_ids: Sequence[int] = ()

    def continuation(
        self, messages: Sequence[ChatMessage], sampling: SamplingParams, continue_text: str
    ) -> Continuation:
        """A handed-over job goes on where it stopped: its next word is numbered after the
        words already sent, and its answer keeps its length."""
        done = len(continue_text.split())
        left = sampling.model_copy(update={"max_new_tokens": sampling.max_new_tokens - done})
        return Continuation(messages, left, done_tokens=done)

    def build(
        self,
        messages: Sequence[ChatMessage],
        max_new_tokens: int,
        images: Mapping[str, Image.Image] | None = None,
    ) -> WordPrompt:
        return WordPrompt(sum(len(m.text.split()) + 4 for m in messages) + 16 * len(images or {}))

    def budget(self, prompt: WordPrompt, max_new_tokens: int, *, open_ended: bool = False) -> int:
        return max_new_tokens

    def text_stream(
        self, on_text: Callable[[str], None], stop_strings: Sequence[str]
    ) -> TextStream:
        return WordStream(on_text)


class LoadTestEngine(Engine[WordPrompt]):
    def __init__(self, tokens_per_s: float, *, first_token_s: float = 0.0) -> None:
        super().__init__(WordPrompter())
        self.interval_s = 1.0 / tokens_per_s
        self.first_token_s = first_token_s

    def decode(
        self,
        prompt: WordPrompt,
        job: Continuation,
        budget: int,
        text: TextStream,
        should_stop: Callable[[], bool],
        *,
        others_leaving: bool = False,
    ) -> tuple[list[int], DecodePath]:
        """One word every ``interval_s``, the first after ``first_token_s``."""
        next_at = time.perf_counter() + self.first_token_s
        generated: list[int] = []
        for i in range(job.done_tokens, job.done_tokens + budget):
            if should_stop():
                break
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            generated.append(i)
            text.push([i])
            next_at += self.interval_s
        return generated, "loadtest"

    def time_to_first_token(self, text: TextStream, started: float) -> float | None:
        return self.first_token_s  # the configured delay, as the benchmarks set it
