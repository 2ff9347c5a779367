"""Continuous batching on the real stack: a worker with WORKER_CONCURRENCY=4 serves four
streams at once from one model instance, with the same greedy answers as a worker that runs
one job at a time (same weights), and cancellation still frees its slot."""

from __future__ import annotations

import concurrent.futures as cf
import json

import pytest

from tests.stack import Stack, ask, sse_events, tokens

pytestmark = pytest.mark.integration
QUESTIONS = ["What is fever?", "Define sepsis.", "Normal heart rate?", "What is asthma?"]


def test_four_streams_at_once_match_one_at_a_time(stack: Stack) -> None:
    worker = stack.add_worker("tiny-batch", WORKER_CONCURRENCY="4")
    try:

        def answer(model: str, q: str) -> tuple[str, dict[str, object]]:
            with stack.client() as c:
                _, events = sse_events(c, "/medgemma", ask(q, model=model))
            assert events[-1].event == "done", events[-1].data
            return tokens(events), json.loads(events[-1].data)["usage"]

        with cf.ThreadPoolExecutor(4) as pool:
            batched = list(pool.map(lambda q: answer("tiny-batch", q), QUESTIONS))
        serial = [answer("tiny-gemma", q) for q in QUESTIONS]
    finally:
        worker.stop()
    assert "continuous batching on: 4 slots" in worker.log_text()
    for (b_text, b_usage), (s_text, s_usage) in zip(batched, serial, strict=True):
        assert b_text == s_text
        assert b_usage == s_usage
