"""The audit trail: one JSON line per request with exactly the agreed fields, appended to a
0o600 file or written to stdout apart from logging, and never the prompt text itself."""

from __future__ import annotations

import hashlib
import json
import logging
import stat
import threading
from datetime import datetime
from pathlib import Path

import pytest

from gateway.services.audit import AuditLog, AuditRecord, prompt_digest

FIELDS = [
    "ts",
    "user_id",
    "role",
    "service",
    "action",
    "model",
    "conversation_id",
    "job_id",
    "outcome",
    "prompt_tokens",
    "completion_tokens",
    "prompt_sha256",
    "client",
    "status",
]
PROMPT = ["Patient MRN 12345, 54 y/o, chest pain since", "what next?"]


def _chat(**overrides: object) -> AuditRecord:
    values: dict[str, object] = {
        "user_id": "dr.house@example.org",
        "role": "user",
        "action": "chat.medgemma",
        "model": "medgemma-4b",
        "conversation_id": "c-1",
        "job_id": "job-abc",
        "outcome": "ok",
        "prompt_tokens": 42,
        "completion_tokens": 7,
        "prompt_sha256": prompt_digest(PROMPT),
        "client": "10.0.0.7",
        "status": 200,
    }
    values.update(overrides)
    return AuditRecord(**values)  # type: ignore[arg-type]


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_line_has_exactly_the_fields(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.from_target(str(path))
    log.write(_chat())
    log.write(
        AuditRecord(
            user_id="admin",
            role="admin",
            action="models.list",
            outcome="denied:401",
            client=None,
            status=401,
        )
    )
    log.close()
    chat, listing = _lines(path)
    assert list(chat) == FIELDS and list(listing) == FIELDS
    assert chat["prompt_tokens"] == 42 and chat["status"] == 200
    assert listing["model"] is None and listing["prompt_sha256"] is None
    offset = datetime.fromisoformat(str(chat["ts"])).utcoffset()
    assert offset is not None and offset.total_seconds() == 0  # ISO 8601, UTC


def test_the_prompt_is_only_a_digest(tmp_path: Path) -> None:
    digest = prompt_digest(PROMPT)
    assert digest == hashlib.sha256("\x1e".join(PROMPT).encode()).hexdigest()
    assert digest != prompt_digest(["".join(PROMPT)])  # the separator matters
    path = tmp_path / "audit.jsonl"
    log = AuditLog.from_target(str(path))
    log.write(_chat())
    log.close()
    text = path.read_text(encoding="utf-8")
    assert digest in text
    for part in (*PROMPT, "MRN 12345", "chest pain"):
        assert part not in text


def test_appends_and_reopening_appends(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier":"line"}\n', encoding="utf-8")
    log = AuditLog.from_target(str(path))
    log.write(_chat(job_id="job-1"))
    log.close()
    log = AuditLog.from_target(str(path))
    log.write(_chat(job_id="job-2"))
    log.close()
    lines = _lines(path)
    assert lines[0] == {"earlier": "line"}
    assert [line["job_id"] for line in lines[1:]] == ["job-1", "job-2"]


def test_file_is_private_and_parents_are_created(tmp_path: Path) -> None:
    path = tmp_path / "var" / "log" / "medgemma" / "audit.jsonl"
    log = AuditLog.from_target(str(path))
    log.write(_chat())
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_line_buffered_and_closed(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.from_target(str(path))
    log.write(_chat())
    assert len(_lines(path)) == 1  # visible before close: a crash loses nothing written
    log.close()
    log.close()  # idempotent
    with pytest.raises(ValueError):
        log.write(_chat())


def test_a_value_cannot_forge_a_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.from_target(str(path))
    log.write(_chat(conversation_id='x"}\n{"user_id":"someone-else'))
    log.close()
    (line,) = _lines(path)
    assert line["user_id"] == "dr.house@example.org"


def test_threads_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.from_target(str(path))

    def burst(n: int) -> None:
        for i in range(200):
            log.write(_chat(job_id=f"job-{n}-{i}", conversation_id="c" * 500))

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert len({line["job_id"] for line in _lines(path)}) == 1600


@pytest.mark.parametrize("target", ["stdout", "-"])
def test_stdout_target_bypasses_logging(
    target: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    log = AuditLog.from_target(target)
    log.write(_chat(action="job.cancel", outcome="cancelled"))
    log.close()  # does not close sys.stdout
    out = capsys.readouterr().out
    (line,) = [json.loads(x) for x in out.splitlines()]
    assert line["action"] == "job.cancel" and line["outcome"] == "cancelled"
    assert caplog.records == []
    print("stdout still open")  # noqa: T201
    assert capsys.readouterr().out == "stdout still open\n"
