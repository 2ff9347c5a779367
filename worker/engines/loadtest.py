"""A load-test engine: emits tokens at a fixed rate with no model at all.

Selected by ``"engine": "loadtest"`` in a models.json entry's ``serving`` block, and never a
default. It isolates the gateway, Redis and Celery from the model, so their capacity and
overhead can be measured on a CPU, and it gives reliability tests generations of a known,
adjustable length (cancellation, resume, worker death). Its "answer" is the words
``tok0 tok1 ...``; its prompt token count is the number of words in the prompt.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from PIL import Image

from shared.protocol import ChatMessage, SamplingParams
from worker.engines.base import GenerationResult


class LoadTestEngine:
    multimodal = True

    def __init__(self, tokens_per_s: float, *, first_token_s: float = 0.0) -> None:
        self.interval_s = 1.0 / tokens_per_s
        self.first_token_s = first_token_s

    def generate(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        *,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool] = lambda: False,
        images: Mapping[str, Image.Image] | None = None,
        continue_text: str = "",
    ) -> GenerationResult:
        prompt_tokens = sum(len(m.text.split()) + 4 for m in messages) + 16 * len(images or {})
        started = time.perf_counter()
        next_at = started + self.first_token_s
        done = len(continue_text.split())  # a handed-over job goes on where it stopped
        parts: list[str] = [continue_text] if continue_text else []
        reason = "length"
        for i in range(done, sampling.max_new_tokens):
            if should_stop():
                reason = "cancelled"
                break
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            text = f"tok{i} "
            parts.append(text)
            on_text(text)
            next_at += self.interval_s
        return GenerationResult(
            finish_reason=reason,  # type: ignore[arg-type]
            prompt_tokens=prompt_tokens,
            completion_tokens=len("".join(parts).split()),
            text="".join(parts),
            first_token_s=self.first_token_s,
            path="loadtest",
        )

    def warmup(self) -> None:
        pass

    def close(self) -> None:
        pass

    def healthy(self) -> bool:
        return True
