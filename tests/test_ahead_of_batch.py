"""A clinician's question beside running background work, on a real model worker (the demo
model, continuous batching on a CPU, four slots): the clinician's job interrupts the batch the
background answers are decoding in and decodes alone. Its answer is exactly its answer on an
idle worker (greedy), and the background answers pause, resume and finish whole."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.processes import wait_for
from tests.stack import (
    Stack,
    ask,
    finished,
    start_stack,
    stream_in_background,
    streamed_text,
)

pytestmark = pytest.mark.integration

DEMO = "smollm2-demo"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    settings = {
        "WORKER_CONCURRENCY": "4",  # two background slots
        "GATEWAY_DEFAULT_MODEL": DEMO,
        # The summaries give way for the whole test, however slow the machine: past their
        # share (by default half the idle timeout) they would stop pausing, re-enter the
        # engine and take the clinician's job into their batch (by design), and its answer
        # would no longer be the idle one.
        "GATEWAY_IDLE_TIMEOUT_S": "300",
        "GATEWAY_BACKGROUND_MAX_WAIT_S": "240",
    }
    s = start_stack(
        tmp_path_factory.mktemp("ahead"), tiny_gemma_dir, workers=0, only={DEMO}, settings=settings
    )
    try:
        s.add_worker(DEMO)
        yield s
    finally:
        s.stop()


def _decoded(stack: Stack, job_id: str) -> str:
    """The decode path on the job's finish line (logged just after its done event)."""
    line = re.compile(rf"job {job_id} finished: .* decoded (\S+)")
    wait_for(lambda: bool(line.search(stack.logs())), 30, f"job {job_id}'s finish line")
    found = line.search(stack.logs())
    assert found is not None
    return found.group(1)


def test_a_clinician_goes_ahead_of_background_work_and_both_answers_stay_whole(
    stack: Stack,
) -> None:
    question = ask("What are the first signs of sepsis?", model=DEMO, verbosity=1)
    alone = stream_in_background(stack, question)
    finished(alone, 120)
    assert _decoded(stack, alone.job_id) == "single"

    summaries = [
        stream_in_background(
            stack,
            ask(f"Summarise chat number {i} in detail.", model=DEMO, verbosity=3)
            | {"priority": "background"},
        )
        for i in (1, 2)
    ]
    for s in summaries:  # both are decoding (in the batch: two at once)
        assert s.wait_for_events(8, 120), s.events
    clinician = stream_in_background(stack, question)
    done = finished(clinician, 120)
    assert streamed_text(clinician) == streamed_text(alone)  # exactly its answer on an idle worker
    assert done["usage"] == json.loads(alone.events[-1][1])["usage"]
    assert _decoded(stack, clinician.job_id) == "single"  # alone, not in their batch

    for s in summaries:
        summary = finished(s, 240)
        assert summary["finish_reason"] in ("stop", "length"), summary
        ids = [int(i) for (kind, _), i in zip(s.events, s.ids, strict=True) if kind == "token"]
        assert ids == sorted(set(ids)) and ids, ids  # in order, none repeated
        assert summary["usage"]["completion_tokens"] > 0
    logs = stack.logs()
    assert "pauses for interactive work" in logs and "resumes after its pause" in logs
    assert "Error in generation loop" not in logs and "Traceback" not in logs
