"""The hot path's frames are byte for byte what sse-starlette would write for the same event,
whatever the model's text holds (line breaks, separators, any Unicode)."""

from __future__ import annotations

import json

import pytest
from sse_starlette import ServerSentEvent

from gateway.api.sse import json_frame

TEXTS = ["plain", "two\nlines", "crlf\r\nand cr\r", "\u2028\u2029 separators", "émoji 🩺", ""]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize(("event", "seq"), [("token", 7), (None, 12), (None, None)])
def test_a_json_frame_is_what_sse_starlette_writes(
    text: str, event: str | None, seq: int | None
) -> None:
    data = json.dumps({"text": text})
    expected = ServerSentEvent(data=data, event=event, id=None if seq is None else str(seq))
    assert json_frame(data, event=event, id=seq) == expected.encode()
