"""shared.protocol and shared.celery_config: the messages that cross Redis and Celery's options."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from pydantic import ValidationError

from shared.celery_config import celery_options
from shared.errors import ErrorCode, ErrorInfo
from shared.protocol import (
    PROTOCOL_VERSION,
    ChatMessage,
    DoneEvent,
    ErrorEvent,
    Job,
    TextPart,
    TokenEvent,
    Usage,
    decode_event,
    encode_event,
)

JOB_ID = "j-0123456789ab"


def _events() -> list[TokenEvent | DoneEvent | ErrorEvent]:
    return [
        TokenEvent(job_id=JOB_ID, seq=1, text="Héllo, 世界 \n"),
        DoneEvent(
            job_id=JOB_ID,
            seq=2,
            finish_reason="length",
            usage=Usage(prompt_tokens=7, completion_tokens=5, total_tokens=12, cost=0.25),
            disclaimer="Not medical advice.",
        ),
        ErrorEvent(
            job_id=JOB_ID,
            seq=3,
            error=ErrorInfo(
                message="waited too long",
                type="server_error",
                code=ErrorCode.QUEUE_TIMEOUT.value,
            ),
        ),
    ]


@pytest.mark.parametrize("event", _events(), ids=lambda e: e.type)
def test_event_round_trip(event: TokenEvent | DoneEvent | ErrorEvent) -> None:
    raw = encode_event(event)
    assert json.loads(raw)["v"] == PROTOCOL_VERSION
    assert json.loads(raw)["type"] == event.type
    back = decode_event(raw)
    assert type(back) is type(event)
    assert back == event
    assert decode_event(raw.encode()) == event


def test_decoded_fields_are_typed() -> None:
    done = decode_event(encode_event(_events()[1]))
    assert isinstance(done, DoneEvent)
    assert done.usage.total_tokens == 12
    assert done.finish_reason == "length"
    err = decode_event(encode_event(_events()[2]))
    assert isinstance(err, ErrorEvent)
    assert err.error.code == "queue_timeout"


def _token_dict(**overrides: Any) -> dict[str, Any]:
    data = json.loads(encode_event(TokenEvent(job_id=JOB_ID, seq=1, text="hi")))
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    "overrides",
    [
        {"type": "thinking"},
        {"v": 2},
        {"v": 0},
        {"seq": 0},
        {"extra": 1},
    ],
    ids=["unknown-type", "v2", "v0", "seq0", "extra-field"],
)
def test_decode_rejects(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        decode_event(json.dumps(_token_dict(**overrides)))


def test_decode_rejects_bad_finish_reason() -> None:
    data = json.loads(encode_event(_events()[1]))
    data["finish_reason"] = "exploded"
    with pytest.raises(ValidationError):
        decode_event(json.dumps(data))


def _job(**overrides: Any) -> Job:
    now = time.time()
    data: dict[str, Any] = {
        "job_id": JOB_ID,
        "model": "medgemma-4b",
        "messages": [ChatMessage(role="user", content=[TextPart(text="hi")])],
        "enqueued_at": now,
        "start_deadline": now + 30,
    }
    data.update(overrides)
    return Job(**data)


def test_job_round_trip_through_json() -> None:
    job = _job()
    back = Job.model_validate_json(job.model_dump_json())
    assert back == job
    assert back.messages[0].text == "hi"
    assert back.sampling.temperature == 0.0  # greedy unless the gateway says otherwise


@pytest.mark.parametrize(
    "job_id", ["short", "has space-in-it", "x" * 65, "../../etc/passwd", "id:with:colons", ""]
)
def test_job_rejects_bad_job_id(job_id: str) -> None:
    with pytest.raises(ValidationError):
        _job(job_id=job_id)


def test_job_needs_a_message() -> None:
    with pytest.raises(ValidationError):
        _job(messages=[])


def test_job_rejects_wrong_version() -> None:
    data = json.loads(_job().model_dump_json())
    data["v"] = 2
    with pytest.raises(ValidationError):
        Job.model_validate(data)


def test_celery_options() -> None:
    opts = celery_options("redis://example:6379/0")
    assert opts["broker_url"] == "redis://example:6379/0"
    assert opts["task_acks_late"] is False
    assert opts["worker_prefetch_multiplier"] == 1
    assert opts["task_serializer"] == "json"
    assert opts["accept_content"] == ["json"]
    assert opts["result_backend"] is None
    assert opts["task_ignore_result"] is True
