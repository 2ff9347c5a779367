"""Turns on the model: at most one forward pass at a time, and waiters served in order.

Why: transformers (5.24) is not safe for two forward passes of one model at once. Each forward
sets the shared ``config.is_causal`` to its own value for its duration
(``utils/generic.py``, ``merge_with_config_defaults``), and the mask builder reads it
(``masking_utils.create_causal_mask``). Continuous batching passes ``is_causal=False``, so a
``generate`` step that runs meanwhile builds a bidirectional mask and decodes a different
answer; interleaved restores can even leave the config changed for good. Measured on the tiny
Gemma 3: greedy answers diverged after 2-4 tokens whenever the batch was decoding beside them.

So the batch's forward passes and the single-stream decoder's steps take turns:

* the batch (the manager's generation thread) takes a turn per forward pass, through a
  forward pre-hook and an always-called forward hook on the model;
* the single-stream decoder holds the turn for its whole ``generate`` call and hands it over
  between two decoding steps (in its stopping criterion) whenever someone is waiting, then
  queues again. Its own forward passes re-enter the turn it holds.

The turn is a reentrant ticket lock: waiters get it in arrival order, so neither side can
starve the other (CPython's ``Lock`` makes no such promise: the thread that releases usually
takes it back at once). A CUDA-graph replay of the batch runs no Python forward and takes no
turn; it shares no Python state with the other path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch


class Turns:
    """A reentrant lock whose waiters are served first come, first served."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0
        self._owner: int | None = None
        self._depth = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            ticket = self._next_ticket
            self._next_ticket += 1
            self._cond.wait_for(lambda: self._owner is None and self._serving == ticket)
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a turn this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._serving += 1
                self._cond.notify_all()

    def pass_on(self) -> None:
        """Between two steps of a long hold: if anyone waits, let them go first, then queue
        again. Free when nobody waits."""
        with self._cond:
            if self._owner != threading.get_ident() or self._next_ticket <= self._serving + 1:
                return
            depth = self._depth
            self._depth = 1
        self.release()
        self.acquire()
        with self._cond:
            self._depth = depth

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()

    def guard(self, model: torch.nn.Module) -> None:
        """Make every forward pass of ``model`` take a turn (hooks outside torch.compile)."""

        @torch.compiler.disable  # type: ignore[untyped-decorator]
        def before(_module: Any, _args: Any, _kwargs: Any) -> None:
            self.acquire()

        @torch.compiler.disable  # type: ignore[untyped-decorator]
        def after(_module: Any, _args: Any, _kwargs: Any, _output: Any) -> None:
            self.release()

        model.register_forward_pre_hook(before, with_kwargs=True)
        model.register_forward_hook(after, with_kwargs=True, always_call=True)
