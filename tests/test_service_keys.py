"""Service keys: a front end (Open WebUI, LibreChat) calls with one key for all of its users and
names the user of each request. Each named user gets their own conversation space, rate-limit
budget and audit line; a personal key cannot name anyone else."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stack import SERVICE_KEY, USER_KEY, Stack, ask, start_stack

pytestmark = pytest.mark.integration

RPM = 4  # each user's requests per minute in this module's stack
HEADER = "X-OpenWebUI-User-Id"


@pytest.fixture(scope="module")
def webui(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    stack = start_stack(
        tmp_path_factory.mktemp("service-keys"),
        tiny_gemma_dir,
        only={"tiny-gemma"},
        settings={"GATEWAY_RATE_LIMIT_RPM": str(RPM)},
    )
    yield stack
    stack.stop()


def _person() -> str:
    return str(uuid.uuid4())  # Open WebUI's user ids are UUIDs


def _chat(c: httpx.Client, text: str, headers: dict[str, str], **body: Any) -> httpx.Response:
    payload = {
        "model": "tiny-gemma",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
        **body,
    }
    return c.post("/v1/chat/completions", json=payload, headers=headers)


def _audit(stack: Stack) -> list[dict[str, Any]]:
    path = stack.workdir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_named_users_get_two_spaces_and_audit_lines(webui: Stack) -> None:
    ann, ben = _person(), _person()
    with webui.client(SERVICE_KEY) as c:
        for who in (ann, ben):
            cid = f"chat-{who[:8]}"
            r = _chat(c, f"question of {who[:8]}", {HEADER: who, "X-Conversation-Id": cid})
            assert r.status_code == 200, r.text
        listed = {
            who: [
                x["conversation_id"] for x in c.get("/conversations", headers={HEADER: who}).json()
            ]
            for who in (ann, ben)
        }
        assert listed == {ann: [f"chat-{ann[:8]}"], ben: [f"chat-{ben[:8]}"]}
        # One cannot open the other's conversation, and the service itself sees neither.
        assert c.get(f"/conversations/chat-{ann[:8]}", headers={HEADER: ben}).status_code == 404
        assert c.get("/conversations").json() == []
    lines = [r for r in _audit(webui) if r["action"] == "chat.openai"]
    for who in (ann, ben):
        mine = [r for r in lines if r["user_id"] == f"webui/{who}"]
        assert mine and all(r["service"] == "webui" and r["role"] == "user" for r in mine)


def test_each_named_user_has_their_own_rate_limit(webui: Stack) -> None:
    ann, ben = _person(), _person()
    with webui.client(SERVICE_KEY) as c:
        for _ in range(RPM):
            assert _chat(c, "hello", {HEADER: ann}).status_code == 200
        refused = _chat(c, "once more", {HEADER: ann})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "rate_limited"
        assert _chat(c, "hello", {HEADER: ben}).status_code == 200  # a budget of his own


def test_the_openai_user_field_names_the_end_user_too(webui: Stack) -> None:
    cara = _person()
    with webui.client(SERVICE_KEY) as c:
        r = _chat(c, "via the body", {"X-Conversation-Id": "by-field"}, user=cara)
        assert r.status_code == 200, r.text
        mine = c.get("/conversations", headers={HEADER: cara}).json()
    assert [x["conversation_id"] for x in mine] == ["by-field"]
    assert any(r["user_id"] == f"webui/{cara}" and r["service"] == "webui" for r in _audit(webui))


def test_a_personal_key_cannot_name_anyone_else(webui: Stack) -> None:
    """alice's own key sends the header and the user field naming bob: both are ignored, the
    request is alice's, in her space and her audit line."""
    with webui.client(USER_KEY) as c:
        r = _chat(c, "who am I?", {HEADER: "bob", "X-Conversation-Id": "alice-own"}, user="bob")
        assert r.status_code == 200, r.text
        assert "alice-own" in [x["conversation_id"] for x in c.get("/conversations").json()]
    with webui.client(SERVICE_KEY) as c:  # not in any space the service could name
        assert c.get("/conversations/alice-own", headers={HEADER: "bob"}).status_code == 404
    line = next(r for r in reversed(_audit(webui)) if r["conversation_id"] == "alice-own")
    assert line["user_id"] == "alice" and line["service"] is None


def test_a_malformed_end_user_is_a_clear_400(webui: Stack) -> None:
    with webui.client(SERVICE_KEY) as c:
        r = c.post("/medgemma", json={**ask("hi"), "stream": False}, headers={HEADER: "a b/c"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == HEADER
    # The body field is held to the same id: a trailing newline or 129 characters are refused.
    for user in ("ann\n", "a" * 129):
        with webui.client(SERVICE_KEY) as c:
            r = _chat(c, "hi", {}, user=user)
        assert r.status_code == 400, user
        assert r.json()["error"]["param"] == "user"
