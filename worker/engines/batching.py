"""The batch decoder: continuous batching, many requests through one model instance at once.

Built on transformers' ``ContinuousBatchingManager`` (paged KV cache, requests join and leave
between decoding steps; the manager runs its own generation thread). One dispatcher thread
takes every result from the manager's shared output queue and routes it by request id to the
request's own queue (the manager's per-request iterator would spin over the others' results).

* **Sampling** is per request (``per_request_processors``): the manager is built with
  temperature / top-p / top-k processors and each request overrides them; greedy is
  ``top_k=1``. A seed cannot be honoured (the sampler is shared), so seeded requests never
  come here.
* **Token ids only**: the manager takes ``input_ids``, so prompts with images decode on the
  single-stream path (Gemma 3's vision tower needs pixel values; see docs/BENCHMARKS.md).
* **Cache**: ``num_blocks`` holds every slot's full context (``concurrency x context_length``
  tokens in pages of 256) and ``max_batch_tokens`` bounds one forward pass (longer prompts are
  prefilled in chunks).
* **CUDA graphs** (on a GPU): transformers turns them on only when no attention mask is needed,
  and ``paged|sdpa`` needs one, so they are asked for explicitly (``use_cuda_graph``), with
  transformers' padding presets, and captured by :meth:`BatchDecoder.warmup` before the worker
  announces itself.
* **Cancel**: ``cancel_request`` frees the request's pages between steps; the manager sends
  nothing more for it, so the stream ends on our side.
* **Interrupt** (:meth:`BatchDecoder.interrupt`, CPU only): when only background work that
  pauses for a clinician is in the batch, its decoding step is abandoned at the next decoder
  layer (a forward pre-hook raises :class:`Interrupted` on the manager's thread), the manager's
  thread ends, and its requests end at once, marked :attr:`BatchStream.interrupted`. A step
  takes tens of milliseconds on a CPU; the clinician's first token would otherwise wait for it
  and for the thread to go (docs/BENCHMARKS.md §11). The hooks are no-ops in compiled graphs.
* **On a CPU the manager's thread lives only while the batch has work** (``restartable``): it is
  stopped (cache and pages kept) shortly after the last request leaves and started again with
  the next. A live thread that has run torch keeps its OpenMP team, and with more OpenMP threads
  than cores GNU OpenMP stops spinning between parallel regions: measured here, an idle second
  torch thread made the other one's matmuls 1.35x slower, until it exited. The single-stream
  decoder does the same (see :mod:`worker.engines.single`).
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from shared.logs import CB_LOGGER
from shared.protocol import SamplingParams
from worker.engines.prompt import Prompter
from worker.engines.warpers import use_fast_sampler, use_fast_warpers
from worker.weights.loader import LoadedModel

logger = logging.getLogger(__name__)

PAGE_TOKENS = 256  # the manager's default page size
RESULT_TIMEOUT_S = 120.0  # no token for this long: the manager is wedged
HEALTH_CHECK_S = 0.5  # a waiting stream looks at the batch's threads this often
_DIED = object()  # put in every open stream's queue when the dispatcher dies
IDLE_STOP_S = 1.0  # a restartable manager stops this long after its last request left


class BatchUnavailable(RuntimeError):
    """The batch manager refused or lost a request."""


INTERRUPTED = "the batch's step was interrupted for interactive work"


class Interrupted(RuntimeError):
    """Raised inside the manager's decoding step to abandon it (:meth:`BatchDecoder.interrupt`)."""


class _QuietInterrupts(logging.Filter):
    """transformers logs an abandoned step as an error with its traceback: ours are on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, Interrupted) and INTERRUPTED not in record.getMessage()


_QUIET_INTERRUPTS = _QuietInterrupts()  # one instance: adding it again is a no-op


class BatchStream:
    """The token ids of one request in the batch, as they come."""

    def __init__(self, decoder: BatchDecoder, rid: str, results: queue.Queue[Any]) -> None:
        self._decoder = decoder
        self.rid = rid
        self._results = results
        self._stopped = False
        self.interrupted = False  # ended by BatchDecoder.interrupt, not by the model
        self.generated: list[int] = []

    def stop(self) -> None:
        """Leave the batch after the current step; nothing more comes."""
        if not self._stopped:
            self._stopped = True
            self._decoder._cancel(self.rid)

    def __iter__(self) -> Iterator[list[int]]:
        try:
            waited = 0.0
            while not self._stopped:
                try:
                    out = self._results.get(timeout=HEALTH_CHECK_S)
                except queue.Empty:
                    waited += HEALTH_CHECK_S
                    if not self._decoder.alive():
                        raise BatchUnavailable("the batch's threads died") from None
                    if waited >= RESULT_TIMEOUT_S:
                        raise BatchUnavailable(
                            "continuous batching produced nothing in time"
                        ) from None
                    continue
                waited = 0.0
                if out is _DIED:
                    raise BatchUnavailable("the batch's dispatcher died")
                if out.error:
                    if self._decoder.was_interrupted(self.rid):
                        self.interrupted = True
                        return
                    raise BatchUnavailable("continuous batching failed this request")
                # Streaming outputs carry everything so far: take only what is new (a slice,
                # not a copy of the whole answer at every step).
                new = list(out.generated_tokens[len(self.generated) :])
                if new:
                    self.generated.extend(new)
                    yield new
                if out.is_finished():
                    return
        finally:
            self._decoder._forget(self.rid)


def _one_attention_for_both_paths(model: Any) -> None:
    """Give the model an attention that both decoding paths can run, before the manager is
    made: the batch's thread and the single-stream path share the model, and its attention is
    one setting that must not change while either is in a forward.

    SDPA and the flash kernels serve both. Eager does not: the manager would run it as
    ``paged|eager``, for which transformers builds no causal mask outside the paged cache, so
    the single-stream path's prompt would see its own future. Such a model moves to SDPA, the
    same scores (measured: 3e-7 apart in float32 on the tiny Gemma 3), for good.
    """
    if model.config._attn_implementation not in ("eager", "paged|eager"):
        return
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError) as exc:
        raise BatchUnavailable(
            f"{type(model).__name__} runs only eager attention, which the single-stream path "
            "cannot share with the continuous batch: set WORKER_BATCHING=off"
        ) from exc
    logger.info("continuous batching: the model's eager attention becomes SDPA for both paths")


class BatchDecoder:
    """Owns the continuous-batching manager and its dispatcher thread."""

    def __init__(
        self,
        loaded: LoadedModel,
        prompter: Prompter,
        *,
        concurrency: int,
        max_batch_tokens: int,
        context_length: int,
        cuda_graphs: bool,
        restartable: bool | None = None,
    ) -> None:
        self._prompter = prompter
        model: Any = loaded.model
        self.restartable = (
            not loaded.device.startswith("cuda") if restartable is None else restartable
        )
        config = GenerationConfig(  # type: ignore[no-untyped-call]
            max_new_tokens=256,
            do_sample=True,
            temperature=0.7,
            top_p=0.95,
            top_k=64,
            eos_token_id=prompter.eos_token_ids,
            pad_token_id=prompter.pad_token_id,
        )
        blocks = math.ceil(concurrency * context_length / PAGE_TOKENS) + concurrency
        self.cuda_graphs = cuda_graphs and loaded.device.startswith("cuda")
        cb_config = ContinuousBatchingConfig(
            num_blocks=blocks,
            max_batch_tokens=max_batch_tokens,
            per_request_processors=True,
            use_cuda_graph=True if self.cuda_graphs else None,
        )
        _one_attention_for_both_paths(model)
        with torch.inference_mode():
            self._manager = model.init_continuous_batching(
                generation_config=config, continuous_batching_config=cb_config
            )
        if not loaded.device.startswith("cuda"):
            use_fast_warpers(self._manager)  # same scores, no full sorts (warpers.py)
            use_fast_sampler(self._manager)  # same distribution, drawn among the kept tokens
        self._routes: dict[str, queue.Queue[Any]] = {}
        self._lock = threading.Lock()
        self._life = threading.Lock()  # starting/stopping the manager vs adding requests
        self._closed = False
        self._dead = False
        self._restarted = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count(1)
        self._dispatcher: threading.Thread | None = None
        self.interrupting = False  # read by the layers' hooks on the manager's thread
        self._interrupted: set[str] = set()  # requests ended by an interrupt, until forgotten
        if self.restartable:
            self._guard_layers(model)
        self.concurrency = concurrency
        logger.info(
            "continuous batching on: %d slots, %d cache pages, %d tokens per step, CUDA graphs %s",
            concurrency,
            blocks,
            max_batch_tokens,
            "on" if self.cuda_graphs else "off",
        )

    def _guard_layers(self, model: torch.nn.Module) -> None:
        """A pre-hook on every decoder layer that abandons the manager's step when asked."""
        logging.getLogger(CB_LOGGER).addFilter(_QUIET_INTERRUPTS)

        def check(_module: Any, _args: Any) -> None:
            if torch.compiler.is_compiling():  # traced away: the single path's graph is untouched
                return
            if self.interrupting and threading.current_thread() is self._manager_thread():
                raise Interrupted(INTERRUPTED)

        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.register_forward_pre_hook(check)

    def _manager_thread(self) -> threading.Thread | None:
        thread: threading.Thread | None = getattr(self._manager, "_generation_thread", None)
        return thread

    def interrupt(self) -> None:
        """Abandon the batch's step in flight and stop its thread now; every request in the
        batch ends at once with :attr:`BatchStream.interrupted` set. For a restartable manager
        (CPU) whose requests all stop anyway: the next request restarts it."""
        if not self.restartable:
            return
        with self._life:
            if self._closed or not self._manager.is_running():
                return
            with self._lock:
                self._interrupted.update(self._routes)
            self.interrupting = True
            try:
                self._stop_now()
            finally:
                self.interrupting = False
        logger.debug("the batch's step was interrupted")

    def start_manager(self) -> None:
        """Capture CUDA graphs, start the manager's generation thread and the dispatcher."""
        if self.cuda_graphs:
            with torch.inference_mode():
                self._manager.warmup()
        with self._life:
            self._ensure_running()
        self._dispatcher = threading.Thread(target=self._dispatch, name="cb-dispatch", daemon=True)
        self._dispatcher.start()

    def _ensure_running(self) -> None:
        """Start the manager's thread if it is not running (holding ``_life``)."""
        if self._manager.is_running():
            return
        with torch.inference_mode():  # the thread keeps its caller's inference mode
            self._manager.start()
        self._restarted.set()

    def stop_when_idle(self, delay_s: float = IDLE_STOP_S) -> None:
        """A restartable manager stops ``delay_s`` from now if no request is in flight then."""
        if self.restartable and not self._closed:
            timer = threading.Timer(delay_s, self._stop_if_idle)
            timer.daemon = True
            timer.start()

    def _stop_if_idle(self) -> None:
        with self._life:
            with self._lock:
                idle = not self._routes
            if idle and not self._closed and self._manager.is_running():
                self._stop_now()

    def _stop_now(self) -> None:
        """Stop the manager's thread (holding ``_life``): what the manager's ``stop`` does for
        a kept manager, without three things. Two were costs that fell on a clinician's first
        token after an interrupt (docs/BENCHMARKS.md §11):

        * an idle loop sleeps up to 0.1 s between looks for work, and a stop request alone
          does not wake it (transformers 5.25), so the loop is woken after the request;
        * ``stop`` ends with a full garbage collection, which took ~10 ms in a warm worker (the
          objects made since its heap was frozen) with the GIL held, while the clinician's
          prefill waited. The manager and its cache are kept, so it has nothing large to free;
          Python's own collector still runs as usual.

        The third is its switch of the model back to the attention it had before the manager:
        the single-stream path may be in a forward on another thread right then, and one
        forward across the switch builds its masks for one attention and runs another (a
        clinician's answer came out garbled). The model keeps one attention that suits both
        paths (:func:`_one_attention_for_both_paths`) for as long as the batch lives.
        """
        status = self._manager.background_thread_status
        status.request_stop(status.FLUSH_AND_STOP, 0)
        self._manager._wake_up_loop.set()
        thread = self._manager_thread()
        if thread is not None:
            thread.join()

    def _dispatch(self) -> None:
        try:
            self._dispatch_loop()
        except BaseException as exc:
            # Every request in the batch ends now with an error, not after RESULT_TIMEOUT_S;
            # alive() turns False, so the worker withdraws its heartbeat (worker/__main__.py).
            logger.error("the batch dispatcher died: %s", type(exc).__name__)
            self._dead = True
            with self._lock:
                routes = list(self._routes.values())
            for route in routes:
                route.put(_DIED)

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            out = self._manager.get_result(timeout=0.2)
            if out is None:
                if not self._manager.is_running():
                    # A stopped manager answers at once, without waiting: sleep until a
                    # restart instead of spinning (a spinning thread starves the other
                    # decoder of the GIL).
                    self._restarted.wait(0.2)
                    self._restarted.clear()
                continue
            with self._lock:
                route = self._routes.get(out.request_id)
            if route is not None:
                route.put(out)

    def start(self, ids: list[int], max_new_tokens: int, sampling: SamplingParams) -> BatchStream:
        """Add one request (its prompt's ids) to the batch."""
        if sampling.temperature > 0:
            knobs: dict[str, Any] = {"temperature": sampling.temperature, "top_p": sampling.top_p}
        else:
            knobs = {"top_k": 1, "top_p": 1.0}  # greedy (top_p 1: nothing to trim)
        rid = f"r{next(self._ids)}"
        results: queue.Queue[Any] = queue.Queue()
        with self._life:
            with self._lock:
                self._routes[rid] = results
            self._ensure_running()
            added = self._manager.add_request(
                ids,
                request_id=rid,
                max_new_tokens=max_new_tokens,
                streaming=True,
                eos_token_id=self._prompter.eos_token_ids,
                **knobs,
            )
        if added is None:
            self._forget(rid)
            raise BatchUnavailable("the continuous-batching manager is not taking requests")
        return BatchStream(self, rid, results)

    def was_interrupted(self, rid: str) -> bool:
        with self._lock:
            return rid in self._interrupted

    def _cancel(self, rid: str) -> None:
        self._manager.cancel_request(rid)

    def _forget(self, rid: str) -> None:
        with self._lock:
            self._routes.pop(rid, None)
            self._interrupted.discard(rid)
            idle = not self._routes
        if idle:
            self.stop_when_idle()

    def warmup(self, ids: list[int]) -> None:
        """One short request through the batch: the first allocates the cache."""
        stream = self.start(ids, 4, SamplingParams(temperature=0.0, max_new_tokens=4))
        for _ids in stream:
            pass

    def running(self) -> bool:
        """Whether the manager's generation thread runs now."""
        return bool(self._manager.is_running())

    def alive(self) -> bool:
        """Whether the dispatcher runs, and the manager's thread too unless it is restartable
        (then it may be stopped between batches on purpose)."""
        if self._dead:
            return False
        dispatching = self._dispatcher is not None and self._dispatcher.is_alive()
        with self._life:  # not while a request is being added and the manager (re)started
            with self._lock:  # (requests ended by an interrupt may still be draining)
                in_flight = bool(self._routes.keys() - self._interrupted)
            running = bool(self._manager.is_running())
        # A restartable manager may be stopped between batches, never under a request.
        return dispatching and (running or (self.restartable and not in_flight))

    def close(self) -> None:
        self._stop.set()
        with self._life:
            self._closed = True
            if self._manager.is_running():
                self._manager.stop(block=True, timeout=10)
