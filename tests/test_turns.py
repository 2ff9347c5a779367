"""worker.engines.turns: one forward pass at a time, waiters served in arrival order."""

from __future__ import annotations

import threading

import pytest

from worker.engines.turns import Turns


def _wait_until(cond: threading.Condition, check: object, timeout: float = 5.0) -> None:
    with cond:
        assert cond.wait_for(check, timeout)  # type: ignore[arg-type]


def test_the_holder_reenters_and_others_wait() -> None:
    turns = Turns()
    turns.acquire()
    turns.acquire()  # the holder's own forward passes re-enter
    got = threading.Event()

    def other() -> None:
        with turns.held():
            got.set()

    t = threading.Thread(target=other)
    t.start()
    turns.release()
    assert not got.wait(0.2)  # still held once
    turns.release()
    assert got.wait(5)
    t.join(5)


def test_pass_on_lets_a_waiter_go_first_and_then_takes_the_turn_back() -> None:
    turns = Turns()
    order: list[str] = []
    cond = threading.Condition()
    waiting = threading.Event()

    def batch_step() -> None:
        waiting.set()
        with turns.held():
            with cond:
                order.append("batch")
                cond.notify_all()

    turns.acquire()
    order.append("single step 1")
    t = threading.Thread(target=batch_step)
    t.start()
    assert waiting.wait(5)
    # The waiter queued behind us: wait until it has taken its ticket.
    _wait_until(turns._cond, lambda: turns._next_ticket == 2)
    turns.pass_on()  # between two steps
    order.append("single step 2")
    turns.release()
    t.join(5)
    assert order == ["single step 1", "batch", "single step 2"]


def test_pass_on_without_waiters_keeps_the_turn() -> None:
    turns = Turns()
    with turns.held():
        turns.pass_on()
        assert turns._owner == threading.get_ident()


def test_only_the_holder_can_release() -> None:
    turns = Turns()
    with pytest.raises(RuntimeError, match="does not hold"):
        turns.release()
