"""The model engine: one generation from chat to result, decoded on the path that is fastest at
the current load.

The sequence is the same for every job and every engine (:class:`~worker.engines.base.Engine`):
continuation (a handed-over answer) → prompt (chat template, trimming) → answer budget → decode
(token ids) → text deltas (detokenize, stop strings) → finish reason → result. This module is
the decoding loop, on one of two paths:

* **single** (:mod:`worker.engines.single`): ``generate`` alone on the device, compiled (CUDA
  graphs on a GPU). Fastest for one stream: on the CPU the batch decodes one stream at about
  0.8x the speed of ``generate`` (docs/BENCHMARKS.md).
* **batch** (:mod:`worker.engines.batching`): continuous batching, for several streams at once.

The choice, per job when it starts: a job that finds the worker idle decodes alone; a job that
finds another one decoding joins the batch, and a text job that was decoding alone **moves into
the batch** with it (its stopping criterion ends ``generate`` after the current step; the batch
continues from the prompt plus the ids generated so far, so the answer goes on as one stream).
So text jobs never decode on both paths at once — but for one case: an interactive job that
finds only background work pausing for it (``others_leaving``, see
:mod:`worker.runtime.yielding`) decodes alone at once, and the batch's thread stops as soon as
they have left it. Jobs the batch cannot take (images; a seed,
which needs its own sampler) always decode alone: they queue on the inference thread, and text
jobs that arrive meanwhile decode in the batch beside them, the two taking turns on the model
step by step (:mod:`worker.engines.turns`: transformers cannot run two forward passes of one
model at once). Beside the batch a seed is best effort, as in OpenAI's API: both paths sample
from torch's one global generator.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from shared.protocol import ChatMessage, SamplingParams
from worker.engines.base import Continuation, DecodePath, Engine, TextStream
from worker.engines.batching import BatchDecoder, BatchStream
from worker.engines.prompt import Prompt, Prompter
from worker.engines.single import SingleDecoder, SingleStream

logger = logging.getLogger(__name__)

WARMUP_TEXT = "Hello! Please say a few words."


class ModelEngine(Engine[Prompt]):
    """Generates answers with one loaded model: alone, or in the batch when it is busy."""

    prompter: Prompter

    def __init__(
        self,
        prompter: Prompter,
        single: SingleDecoder,
        batch: BatchDecoder | None = None,
        *,
        always_batch: bool = False,
    ) -> None:
        super().__init__(prompter)
        self.single = single
        self.batch = batch
        self._always_batch = always_batch and batch is not None
        self._lock = threading.Lock()
        self._alone: SingleStream | None = None  # the text job decoding alone, if any
        self._batched = 0  # jobs in (or on their way into) the batch

    def warmup(self) -> None:
        """Compile and capture before the first job: the worker announces itself only after."""
        from shared.protocol import TextPart

        chat = [ChatMessage(role="user", content=[TextPart(text=WARMUP_TEXT)])]
        prompt = self.prompter.build(chat, 8)
        seconds = self.single.warmup(prompt.inputs)
        logger.info("warm-up: single-stream decoding ready in %.1f s", seconds)
        if self.batch is not None:
            started = time.perf_counter()
            self.batch.start_manager()
            self.batch.warmup(prompt.ids)
            logger.info("warm-up: batch ready in %.1f s", time.perf_counter() - started)

    def healthy(self) -> bool:
        return self.batch is None or self.batch.alive()

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()
        self.single.close()

    def decode(
        self,
        prompt: Prompt,
        job: Continuation,
        budget: int,
        text: TextStream,
        should_stop: Callable[[], bool],
        *,
        others_leaving: bool = False,
    ) -> tuple[list[int], DecodePath]:
        """Decode on the path the load calls for; returns the generated ids and the path."""
        sampling = job.sampling
        batchable = self.batch is not None and not prompt.images and sampling.seed is None
        batchable = batchable and "pixel_values" not in prompt.inputs

        def consume(stream: SingleStream | BatchStream) -> list[int]:
            """Push the stream's ids to the text until it ends or must stop; returns the ids
            taken (a stopped stream's last in-flight ids are drained, not counted)."""
            taken: list[int] = []
            it = iter(stream)
            for ids in it:
                taken.extend(ids)
                text.push(ids)
                if text.stopped_by_string or should_stop():
                    stream.stop()
                    for _late in it:
                        pass
                    break
            return taken

        return self._decode(
            prompt, budget, sampling, batchable, should_stop, consume, others_leaving
        )

    def _decode(
        self,
        prompt: Prompt,
        budget: int,
        sampling: SamplingParams,
        batchable: bool,
        should_stop: Callable[[], bool],
        consume: Callable[[SingleStream | BatchStream], list[int]],
        others_leaving: bool,
    ) -> tuple[list[int], DecodePath]:
        """Alone, or in the batch (which the job alone may move into midway)."""
        if others_leaving and self.batch is not None and not self._always_batch:
            self.batch.interrupt()  # (CPU) they leave now, not after the step in flight
        with self._lock:
            if self._alone is not None:
                self._alone.preempt()  # whoever came first moves into the batch
            join_batch = batchable and (
                self._always_batch
                or (not others_leaving and (self._alone is not None or self._batched > 0))
            )
            if join_batch:
                self._batched += 1
                self.single.retire_when_idle()
            else:
                alone = self.single.start(
                    prompt.inputs,
                    budget,
                    sampling,
                    should_stop=should_stop,
                    preemptible=batchable,
                )
                if batchable:
                    self._alone = alone
                if self.batch is not None and self._batched == 0:
                    self.batch.stop_when_idle(delay_s=0.0)  # the batch's thread leaves now
        if join_batch:
            return self._in_batch(prompt.ids, budget, sampling, should_stop, consume, []), "batch"
        try:
            taken = consume(alone)
        except BaseException:
            with self._lock:
                if self._alone is alone:
                    self._alone = None
            raise
        with self._lock:
            if self._alone is alone:
                self._alone = None
            # A job that must stop anyway (cancelled, or background work pausing for the
            # job that preempted it) does not move: its re-prefill in the batch would delay
            # the newcomer's first token.
            moving = alone.preempted and self._still_going(taken, budget) and not should_stop()
            if moving:
                self._batched += 1
            if self._batched:
                self.single.retire_when_idle()
        if not moving:
            return taken, "single"
        logger.debug("a job moves into the batch after %d tokens", len(taken))
        generated = self._in_batch(
            [*prompt.ids, *taken], budget, sampling, should_stop, consume, taken
        )
        return generated, "single+batch"

    def _still_going(self, generated: Sequence[int], budget: int) -> bool:
        ended = bool(generated) and generated[-1] in self.prompter.eos_token_ids
        return not ended and len(generated) < budget

    def _in_batch(
        self,
        ids: list[int],
        budget: int,
        sampling: SamplingParams,
        should_stop: Callable[[], bool],
        consume: Callable[[SingleStream | BatchStream], list[int]],
        before: Sequence[int],
    ) -> list[int]:
        """Decode in the batch (``_batched`` was counted for this job by the caller). A job
        whose step was interrupted but must not stop goes on in the batch from where it was."""
        assert self.batch is not None
        generated = list(before)
        try:
            while True:
                stream = self.batch.start(
                    [*ids, *generated[len(before) :]], budget - len(generated), sampling
                )
                generated.extend(consume(stream))
                if not stream.interrupted or should_stop():
                    return generated
                if not self._still_going(generated, budget):
                    return generated
        finally:
            with self._lock:
                self._batched -= 1
                if self._batched == 0 and self._alone is not None:
                    self.batch.stop_when_idle(delay_s=0.0)  # the job alone has the cores now
