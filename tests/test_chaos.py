"""A short chaos run (bench/chaos.py): about a minute of 20 concurrent clients of both APIs
while a worker is SIGKILLed, another SIGTERMed, one SIGSTOPped past its lease, Redis and the
gateway restarted; then every invariant the program checks must hold."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import FAULT_KINDS, ChaosConfig, report, run_chaos

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.mark.timeout(240)
def test_every_invariant_holds_under_every_fault(tmp_path: Path) -> None:
    config = ChaosConfig(
        duration_s=68,
        streams=20,
        workers=3,
        first_fault_s=6,
        fault_every_s=12,  # the five kinds at 6, 18, 30, 42 and 54 s
        drain_s=45,
        quiesce_s=20,
        seed=7,
        workdir=tmp_path / "chaos",
    )
    result = run_chaos(config)
    print(report(result))  # noqa: T201 - the figures, shown when the test fails
    assert {f.kind for f in result.faults} >= set(FAULT_KINDS)
    assert not result.processes.fault_failures
    r, t, e, c, leaks = (
        result.requests,
        result.text,
        result.events,
        result.conversations,
        result.leaks,
    )
    assert r.done > 50 and r.accepted_by_kind.get("medgemma_stream_resume", 0) > 0
    assert r.hangs == 0
    assert r.client_bugs == 0
    assert t.checked == r.done and t.exact == t.checked
    assert t.lost_tokens == 0 and t.duplicated_tokens == 0
    assert t.usage_mismatch == 0 and t.length_mismatch == 0
    assert e.ids_not_increasing == 0
    assert e.errors_without_code == 0
    assert c.checked > 0 and c.mismatched == 0
    assert leaks.unexpired_slots == 0, leaks.slot_keys
    assert not leaks.locks
    assert not leaks.running_claims
    assert not leaks.without_ttl
    assert not result.processes.unexpected_exits
    assert result.ok, result.violations
