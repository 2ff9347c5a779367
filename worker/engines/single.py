"""The single-stream decoder: one request at a time with ``model.generate``, as fast as the
device allows, on one inference thread.

* **One inference thread** (a one-thread executor) runs every ``generate`` call, the warm-up
  included. CUDA graphs are thread-local, so captured graphs are replayed only on the thread
  that captured them; and on a CPU, two threads running torch at once oversubscribe the cores
  (measured here: decoding ~10x slower). The job's own thread never touches the model: it
  receives token ids through a queue, decodes text and publishes it.
* **On CUDA**: a :class:`~transformers.StaticCache` sized to the model's context, built once and
  ``reset()`` between requests, with ``CompileConfig(mode="reduce-overhead")``: transformers
  compiles the decoding step and replays it as a CUDA graph (the path its docs give for one
  stream at a time). The prefill stays eager (its shape changes with every prompt).
* **On a CPU**: a static cache was slower here (every step attends over the whole cache), so the
  cache stays dynamic and the decoding step is compiled with dynamic shapes and inductor's
  ``freezing`` (weights prepacked for oneDNN); the prompt goes through the same compiled graph
  (chunked prefill). SmolLM2-135M in bfloat16 on the 2-core
  development machine: 1.5x the eager speed (docs/BENCHMARKS.md). The cost is the compile at
  start, about a minute there, paid in :meth:`SingleDecoder.warmup` before the worker announces
  itself.
* A quantizer that cannot be compiled (bitsandbytes) runs eagerly with a dynamic cache.

When the worker also batches, the model's forward passes take turns
(:mod:`worker.engines.turns`): ``generate`` holds the turn and hands it to a waiting batch step
between two of its own steps.

A running request can be **preempted**: its stopping criterion ends ``generate`` after the
current step and the stream reports :attr:`SingleStream.preempted`, so the caller can continue
the same answer in the batch (see :mod:`worker.engines.model`).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, cast

import torch
from transformers import CompileConfig, DynamicCache, StaticCache, StoppingCriteria
from transformers import StoppingCriteriaList as _Criteria
from transformers.generation.streamers import BaseStreamer

from shared.protocol import SamplingParams
from worker.engines.prompt import Prompter
from worker.engines.turns import Turns
from worker.torch_env import FREEZING_VAR, inductor_freezing
from worker.weights.loader import LoadedModel

logger = logging.getLogger(__name__)

_END = object()  # ends a stream's id queue
#: Prompt tokens per compiled prefill step on a CPU (longer prompts take several steps).
PREFILL_CHUNK = 512


class _CompileableDynamicCache(DynamicCache):
    """A dynamic cache that ``generate`` may compile with (dynamic shapes): transformers only
    compiles the decoding step when the cache says it can be compiled, and a plain
    :class:`DynamicCache` never does."""

    is_compileable = True


class _BetweenSteps(StoppingCriteria):
    """Runs between two decoding steps: hands the model's turn to a waiting batch step (see
    :mod:`worker.engines.turns`), then says whether to stop."""

    def __init__(self, stop: Callable[[], bool], turns: Turns | None) -> None:
        self._stop = stop
        self._turns = turns

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> Any:
        if self._turns is not None:
            self._turns.pass_on()
        return torch.full(
            (input_ids.shape[0],), self._stop(), dtype=torch.bool, device=input_ids.device
        )


class _IdsToQueue(BaseStreamer):
    """generate()'s streamer: the first call is the prompt (skipped), then each step's new ids
    go into the stream's queue for the job thread."""

    def __init__(self, stream: SingleStream) -> None:
        self._stream = stream
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self._stream._put(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class SingleStream:
    """The token ids of one request decoded by :class:`SingleDecoder`, as they come."""

    def __init__(self, should_stop: Callable[[], bool], *, preemptible: bool) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._should_stop = should_stop
        self._stop = threading.Event()
        self._preempt = threading.Event()
        self.preemptible = preemptible
        self.generated: list[int] = []
        self.future: cf.Future[None] | None = None

    def _put(self, ids: list[int]) -> None:
        self.generated.extend(ids)
        self._queue.put(ids)

    def _finish(self) -> None:
        self._queue.put(_END)

    def stopping(self) -> bool:
        """Read by the stopping criterion between two decoding steps (no I/O)."""
        return self._stop.is_set() or self._preempt.is_set() or self._should_stop()

    def stop(self) -> None:
        """End decoding after the current step (a cancel, a stop string)."""
        self._stop.set()

    def preempt(self) -> None:
        """Ask the request to leave this decoder after the current step (another job came)."""
        if self.preemptible:
            self._preempt.set()

    @property
    def preempted(self) -> bool:
        return self._preempt.is_set() and not self._stop.is_set()

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            item = self._queue.get()
            if item is _END:
                break
            yield cast(list[int], item)
        assert self.future is not None
        self.future.result()  # re-raises what generate() raised


class SingleDecoder:
    """Runs ``generate`` for one request at a time on the inference thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        prompter: Prompter,
        *,
        compile: bool,
        context_length: int,
        cache: Literal["auto", "static", "dynamic"] = "auto",
        turns: Turns | None = None,
    ) -> None:
        self._model: Any = loaded.model
        self._prompter = prompter
        self._turns = turns
        # GPU: one persistent inference thread (CUDA graphs are thread-local). CPU: the thread
        # exits when the batch takes over (see retire_when_idle), and a new one takes the next
        # job: a live idle torch thread slows the other one's OpenMP (worker.engines.batching).
        self._persistent = loaded.device.startswith("cuda")
        self._executor: cf.ThreadPoolExecutor | None = None
        self._exec_lock = threading.Lock()
        self._in_flight = 0
        self._retire = False
        quantizer = getattr(self._model, "hf_quantizer", None)
        compileable = quantizer is None or bool(quantizer.is_compileable)
        self.compiled = compile and compileable
        cuda = loaded.device.startswith("cuda")
        static = cache == "static" or (cache == "auto" and cuda and self.compiled)
        self._static = (
            StaticCache(config=self._model.config, max_cache_len=context_length) if static else None
        )
        self.cache_kind = "static" if static else "dynamic"
        self._compile_config: CompileConfig | None = None
        self._prefill_chunk = 0
        if self.compiled and cuda:
            # CUDA graphs need static shapes: with a dynamic cache, compile with dynamic shapes.
            self._compile_config = (
                CompileConfig(mode="reduce-overhead")
                if static
                else CompileConfig(mode="default", dynamic=True)
            )
        elif self.compiled:
            # Inductor on a CPU, with freezing when the process turned it on before importing
            # torch (worker/torch_env.py): 1.3x over compiling without it.
            if not inductor_freezing():
                logger.info("inductor freezing is off (%s unset): slower", FREEZING_VAR)
            self._compile_config = CompileConfig(mode="default", dynamic=not static)
            # Chunked prefill is the one way generate() runs the prompt through the compiled
            # graph too (its plain prefill is eager): time to first token 51 -> 33 ms here.
            self._prefill_chunk = PREFILL_CHUNK if not static else 0
            # transformers compiles only on accelerators unless this (private) flag is set.
            self._compile_config._compile_all_devices = True  # type: ignore[assignment]
        logger.info(
            "single-stream decoding: %s cache, %s",
            self.cache_kind,
            "compiled" if self.compiled else "eager",
        )
        if compile and not compileable:
            logger.info("the %s quantizer cannot be compiled: decoding runs eagerly", quantizer)

    def start(
        self,
        inputs: dict[str, Any],
        max_new_tokens: int,
        sampling: SamplingParams,
        *,
        should_stop: Callable[[], bool],
        preemptible: bool,
    ) -> SingleStream:
        """Queue the request on the inference thread; its ids arrive through the stream."""
        stream = SingleStream(should_stop, preemptible=preemptible)
        with self._exec_lock:
            if self._executor is None:
                self._executor = cf.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="inference"
                )
            self._in_flight += 1
            self._retire = False
            stream.future = self._executor.submit(
                self._run, stream, inputs, max_new_tokens, sampling
            )
        return stream

    def _kwargs(self, max_new_tokens: int, sampling: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self._prompter.eos_token_ids,
            "pad_token_id": self._prompter.pad_token_id,
        }
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self._compile_config is not None:
            kwargs["compile_config"] = self._compile_config
            kwargs["cache"] = _CompileableDynamicCache(config=self._model.config)
            if self._prefill_chunk:
                kwargs["prefill_chunk_size"] = self._prefill_chunk
        if self._static is not None:
            self._static.reset()  # type: ignore[no-untyped-call]
            kwargs["cache"] = self._static
        return kwargs

    def _run(
        self,
        stream: SingleStream,
        inputs: dict[str, Any],
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> None:
        try:
            device = self._model.device
            model_inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in inputs.items()}
            turn = self._turns.held() if self._turns is not None else contextlib.nullcontext()
            with torch.inference_mode(), turn:
                kwargs = self._kwargs(max_new_tokens, sampling)
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                self._model.generate(
                    **model_inputs,
                    **kwargs,
                    streamer=_IdsToQueue(stream),
                    stopping_criteria=_Criteria([_BetweenSteps(stream.stopping, self._turns)]),
                )
        finally:
            stream._finish()
            with self._exec_lock:
                self._in_flight -= 1
                if self._in_flight == 0 and self._retire:
                    self._shutdown_executor()

    def retire_when_idle(self) -> None:
        """On a CPU, let the inference thread exit once its queued work is done (the batch has
        the model now); the next job starts a new one. A persistent (GPU) thread stays."""
        if self._persistent:
            return
        with self._exec_lock:
            if self._in_flight == 0:
                self._shutdown_executor()
            else:
                self._retire = True

    def _shutdown_executor(self) -> None:
        """(Holding ``_exec_lock``.) The thread exits after its current task; never waits."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        self._retire = False

    def warmup(self, inputs: dict[str, Any]) -> float:
        """Decode a few tokens of ``inputs`` (three times: CUDA graph trees record on the first
        runs and replay after) so that compiling and capturing happen now. Returns seconds."""
        started = time.perf_counter()
        greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
        for _ in range(3 if self._static is not None else 2):
            stream = self.start(inputs, 4, greedy, should_stop=lambda: False, preemptible=False)
            for _ids in stream:
                pass
        return time.perf_counter() - started

    def close(self) -> None:
        with self._exec_lock:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None
