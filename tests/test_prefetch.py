"""No job waits behind a running answer while another worker that serves its model is idle.

Two workers of one job each. Answer A runs long on one, short answer B on the other; C is
sent while both are busy. With Celery's prefetch and acks on receipt, the worker running A
would already have taken C off the queue (its prefetch window frees as soon as A is acked),
and C would wait behind A although B's worker is idle a second later. With
``worker_disable_prefetch`` a busy worker takes nothing more, so C starts as soon as B's
worker is free.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack import Stack, ask, slow_model_stack, stream_in_background

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    with slow_model_stack(tmp_path_factory.mktemp("prefetch"), tiny_gemma_dir, workers=2) as s:
        yield s


def _first_token_at(stream_events: list[tuple[str, str]]) -> bool:
    return any(kind == "token" for kind, _ in stream_events)


def test_a_job_starts_on_the_idle_worker_not_behind_a_running_answer(two: Stack) -> None:
    long_a = stream_in_background(two, ask("A", model="slow-model", verbosity=3))
    assert long_a.wait_for_events(2, 30), long_a.events  # A runs (400 tokens: 20 s)
    short_b = stream_in_background(two, ask("B", model="slow-model", verbosity=0))
    assert short_b.wait_for_events(2, 30), short_b.events  # B on the other worker (2.5 s)
    sent = time.monotonic()
    c = stream_in_background(two, ask("C", model="slow-model", verbosity=0))
    with c._seen:
        assert c._seen.wait_for(lambda: _first_token_at(c.events), 30), c.events
    waited = time.monotonic() - sent
    a_running = long_a.is_alive()
    long_a.join(30)
    short_b.join(30)
    c.join(30)
    # B ends ~2.5 s after C was sent; A runs ~17 s longer. C must not have waited for A.
    assert waited < 8, f"C waited {waited:.1f}s: it was held by the busy worker"
    assert a_running, "A must still be running when C starts, or the test shows nothing"
    assert json.loads(c.events[-1][1])["finish_reason"] == "length"
