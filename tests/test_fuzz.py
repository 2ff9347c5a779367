"""The OpenAPI schema fuzzed against a running gateway: no request, however malformed, gets a
5xx, and every 4xx has the documented error body.

Its own stack serves only tiny-gemma (with a live worker), so no 503 is legitimately
possible; rate limits are off. Hypothesis generates bodies from the schema (valid and
invalid); each operation gets a bounded number of examples.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.stack import USER_KEY, Stack, start_stack

pytestmark = pytest.mark.integration
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("fuzz"), tiny_gemma_dir, only={"tiny-gemma"})
    yield s
    s.stop()


def test_no_request_gets_a_5xx(fuzz_stack: Stack) -> None:
    # Driven by hand rather than by schemathesis' pytest plugin, which does not support
    # this pytest version; each operation runs its own Hypothesis search.
    api = schemathesis.openapi.from_url(f"{fuzz_stack.base_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10
    failures: list[str] = []
    calls: list[int] = []
    for op in operations:

        @given(case=op.as_strategy())
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def check(case: schemathesis.Case) -> None:
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {USER_KEY}"}
            response = case.call(base_url=fuzz_stack.base_url, timeout=60)
            calls.append(response.status_code)
            assert response.status_code < 500, (response.status_code, response.text[:300])
            if 400 <= response.status_code < 500:
                body = response.json()
                assert set(body) == {"error"} and ERROR_FIELDS <= set(body["error"]), body
                assert isinstance(body["error"]["code"], str) and body["error"]["message"]

        try:
            check()
        except AssertionError as exc:
            failures.append(f"{op.label}: {exc}")
    assert failures == []
    assert len(calls) >= 10 * len(operations)  # the search really ran
