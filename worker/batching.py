"""Continuous batching: one model instance serves several jobs at once.

Built on transformers' ``ContinuousBatchingManager`` (paged KV cache, requests join and
leave between decoding steps). Each job's Celery thread submits its prompt and reads its own
results: one dispatcher thread takes every result from the manager's shared output queue and
routes it by request id (the manager's per-request iterator would spin over the others).

What it does not serve falls back, per job, to the one-at-a-time :class:`~worker.engine.Engine`
on the same model: prompts with images (the manager takes token ids only; Gemma 3's vision
tower needs pixel values) and requests with a seed (sampling state is shared by the batch).

Sampling is per request (``per_request_processors``): the manager is built with
temperature / top-p / top-k processors, and each request overrides them; greedy decoding
is ``top_k=1``. Cancellation, stop strings and the lease check work as in the engine: the
job's thread sees each new token, and ``cancel_request`` frees the request's cache blocks
between steps (the manager sends nothing more for it).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from shared.protocol import ChatMessage, SamplingParams
from worker.engine import Engine, FinishReason, GenerationResult, _DeltaStreamer

logger = logging.getLogger(__name__)

PAGE_TOKENS = 256  # the manager's default page size
RESULT_TIMEOUT_S = 120.0  # no token for this long: the manager is wedged


class BatchingEngine:
    """Serves text jobs through continuous batching, others through ``fallback``."""

    def __init__(self, fallback: Engine, *, concurrency: int, max_batch_tokens: int = 512) -> None:
        self.fallback = fallback
        self.loaded = fallback.loaded
        model: Any = fallback.loaded.model
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=256,
            do_sample=True,
            temperature=0.7,
            top_p=0.95,
            top_k=64,
            eos_token_id=fallback.eos_token_ids,
            pad_token_id=fallback.pad_token_id,
        )
        blocks = math.ceil(concurrency * fallback.context_length / PAGE_TOKENS) + concurrency
        self._manager = model.init_continuous_batching(
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(
                num_blocks=blocks,
                max_batch_tokens=max_batch_tokens,
                per_request_processors=True,
            ),
        )
        self._manager.start()
        self._routes: dict[str, queue.Queue[Any]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._counter = 0
        threading.Thread(target=self._dispatch, name="cb-dispatch", daemon=True).start()
        logger.info("continuous batching on: %d slots, %d cache pages", concurrency, blocks)

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            out = self._manager.get_result(timeout=0.2)
            if out is None:
                continue
            with self._lock:
                route = self._routes.get(out.request_id)
            if route is not None:
                route.put(out)

    def close(self) -> None:
        self._stop.set()
        self._manager.stop(block=True, timeout=10)

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
        if images or any(m.images for m in messages) or sampling.seed is not None:
            return self.fallback.generate(
                messages,
                sampling,
                on_text=on_text,
                should_stop=should_stop,
                images=images,
                continue_text=continue_text,
            )
        engine = self.fallback
        messages, sampling, done_tokens = engine.continuation(messages, sampling, continue_text)
        prompt = engine.build_prompt(messages, sampling.max_new_tokens)
        ids = prompt.inputs["input_ids"][0].tolist()
        max_new = max(1, min(sampling.max_new_tokens, engine.context_length - len(ids)))
        if sampling.temperature > 0:
            knobs: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p}
        else:
            knobs = {"top_k": 1}  # greedy
        with self._lock:
            self._counter += 1
            rid = f"r{self._counter}"
            results: queue.Queue[Any] = queue.Queue()
            self._routes[rid] = results
        streamer = _DeltaStreamer(engine.loaded.tokenizer, on_text, tuple(sampling.stop))
        streamer.seen_prompt = True
        started = time.perf_counter()
        seen = 0
        reason: FinishReason = "length"
        last: list[int] = []
        try:
            self._manager.add_request(
                ids,
                request_id=rid,
                max_new_tokens=max_new,
                streaming=True,
                eos_token_id=engine.eos_token_ids,
                **knobs,
            )
            while True:
                try:
                    out = results.get(timeout=RESULT_TIMEOUT_S)
                except queue.Empty:
                    raise RuntimeError("continuous batching produced nothing in time") from None
                if out.error:
                    raise RuntimeError("continuous batching failed this request")
                last = list(out.generated_tokens)
                if len(last) > seen:
                    streamer.put(torch.tensor(last[seen:]))
                    seen = len(last)
                if streamer.stopped_by_string or should_stop():
                    self._manager.cancel_request(rid)
                    reason = "stop" if streamer.stopped_by_string else "cancelled"
                    break
                if out.is_finished():
                    if last and last[-1] in engine.eos_token_ids:
                        reason = "stop"
                    break
        finally:
            with self._lock:
                self._routes.pop(rid, None)
        streamer.end()
        first = None if streamer.first_token_at is None else streamer.first_token_at - started
        return GenerationResult(
            finish_reason=reason,
            prompt_tokens=prompt.prompt_tokens - done_tokens,
            completion_tokens=len(last) + done_tokens,
            text=continue_text + streamer.text,
            first_token_s=first,
            trimmed_messages=prompt.trimmed,
        )
