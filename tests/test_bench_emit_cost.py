"""bench/emit_cost.py: a round writes every event through the worker's own writer, one event per
token, and measures Redis's CPU for them. Against a real redis-server (``INFO cpu``)."""

from __future__ import annotations

from pathlib import Path

from redis import Redis

from bench.emit_cost import KEYS, one_round
from tests.stack import lone_redis
from worker.runtime.token_writer import TokenWriter


def test_a_round_writes_each_token_as_its_own_event(tmp_path: Path) -> None:
    with lone_redis(tmp_path / "redis") as url:
        client = Redis.from_url(url, decode_responses=True)
        writer = TokenWriter(client, max_deltas=0)
        writer.start()
        try:
            # (one_round raises unless the logs hold 400 events: none joined, none lost)
            figures = one_round(client, writer, tokens=400, jobs=4, tag="t")
            assert client.keys(KEYS.job_log("*")) == []  # the next round starts empty
            assert figures["redis_cpu_us_per_event"] > 0
            assert figures["wall_us_per_event"] > 0
        finally:
            writer.stop()
            client.close()
