from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest

from devstack.tiny_gemma import build_tiny_gemma
from tests.stack import Stack, start_stack


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"), multimodal=True)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    """One real stack shared by the integration tests: redis-server, a worker, the gateway."""
    s = start_stack(tmp_path_factory.mktemp("stack"), tiny_gemma_dir)
    yield s
    s.stop()


@pytest.fixture
def server() -> fakeredis.FakeServer:
    """A fake Redis server of the test's own: its clients share it, as processes share Redis."""
    return fakeredis.FakeServer()


@pytest.fixture
def redis(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    """A sync client on ``server`` that answers ``str``, as the worker's is."""
    return fakeredis.FakeRedis(server=server, decode_responses=True)
