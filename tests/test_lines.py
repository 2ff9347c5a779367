"""The order in which a worker reads its model's lines, on a real redis-server through kombu's
Redis transport with the project's Celery options: promoted background work, then interactive,
then background, whatever order the worker's intakes last added the queues in."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Queue

from shared.celery_config import celery_options
from shared.protocol import LINES, celery_queue, line_rank
from tests.stack import lone_redis

pytestmark = pytest.mark.integration

MODEL_QUEUE = "tiny-gemma"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with lone_redis(tmp_path_factory.mktemp("lines-redis")) as url:
        yield url


def test_line_ranks_follow_lines() -> None:
    queues = [celery_queue(MODEL_QUEUE, line) for line in LINES]
    assert queues == [f"{MODEL_QUEUE}@promoted", MODEL_QUEUE, f"{MODEL_QUEUE}@background"]
    assert [line_rank(q) for q in queues] == [0, 1, 2]
    assert line_rank("some@model") == 1  # a queue name of its own with an "@" is interactive


@pytest.mark.parametrize(
    "added", [["background", "interactive", "promoted"], ["interactive", "background", "promoted"]]
)
def test_a_worker_reads_promoted_then_interactive_then_background(
    redis_url: str, added: list[str]
) -> None:
    options = celery_options(redis_url)
    sender = Celery("gateway-like")
    sender.conf.update(options)
    for line in ("background", "interactive", "promoted"):  # sent in the worst order
        for n in range(2):
            sender.send_task("t", args=[f"{line}-{n}"], queue=celery_queue(MODEL_QUEUE, line))
    got: list[str] = []

    def on_message(body: Any, message: Any) -> None:
        args, _kwargs, _embed = body  # Celery's message protocol 2
        got.append(args[0])
        message.ack()

    queues = [Queue(celery_queue(MODEL_QUEUE, line)) for line in added]  # (re)added in this order
    with Connection(redis_url, transport_options=options["broker_transport_options"]) as conn:
        with conn.Consumer(queues, callbacks=[on_message], prefetch_count=1):
            while len(got) < 6:
                conn.drain_events(timeout=10)
    assert got == [f"{line}-{n}" for line in LINES for n in range(2)]
