"""Patient-data protection on the real stack: nothing of a prompt, an answer or an image in any
log line; every Redis key a chat leaves has a TTL; an audit line per request without the text;
rate limits counted across gateway processes."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from pathlib import Path

import pytest
from httpx_sse import connect_sse
from PIL import Image
from redis import Redis

from devstack.processes import free_port, start_gateway, wait_for
from tests.stack import USER_KEY, Stack, ask, events_of, sse_events

pytestmark = pytest.mark.integration

MARKER = "PATIENT-7f3a-Jane-Doe-DOB-1961"


def _image_url() -> tuple[str, str]:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (1, 2, 3)).save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/png;base64,{b64}", b64


def _chat_everywhere(stack: Stack, text: str, image_url: str) -> list[str]:
    """Chats through both APIs, both modes, with and without an image; returns the answers."""
    answers: list[str] = []
    with stack.client() as c:
        _, events = sse_events(c, "/medgemma", {**ask(text), "conversation_id": "sec-1"})
        answers.append("".join(json.loads(e.data).get("text", "") for e in events))
        r = c.post(
            "/medgemma",
            json={
                **ask(text),
                "stream": False,
                "user_message": [
                    {"type": "image", "data_url": image_url},
                    {"type": "text", "text": text},
                ],
            },
        )
        answers.append(r.json()["content"])
        r = c.post(
            "/v1/chat/completions",
            json={"model": "tiny-gemma", "messages": [{"role": "user", "content": text}]},
        )
        answers.append(r.json()["choices"][0]["message"]["content"])
        body = {
            "model": "tiny-gemma",
            "stream": True,
            "messages": [{"role": "user", "content": text}],
        }
        with connect_sse(c, "POST", "/v1/chat/completions", json=body) as src:
            list(events_of(src))
    return [a for a in answers if len(a.strip()) >= 8]


def test_no_patient_text_in_any_log_line(stack: Stack) -> None:
    image_url, b64 = _image_url()
    finished = stack.logs().count(" finished: ")
    answers = _chat_everywhere(stack, f"My patient {MARKER} has chest pain.", image_url)
    # The worker logs a job's end just after publishing it: wait for all four jobs' lines.
    wait_for(
        lambda: stack.logs().count(" finished: ") >= finished + 4, 10, "the workers' last lines"
    )
    logs = stack.logs()
    assert "job " in logs  # the logs were captured
    assert MARKER not in logs
    assert b64[:40] not in logs
    for answer in answers:  # the answers the model produced are not logged either
        assert answer.strip() not in logs
    assert USER_KEY not in logs


def test_every_key_a_chat_leaves_expires(stack: Stack) -> None:
    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    image_url, _ = _image_url()
    _chat_everywhere(stack, "retention check", image_url)
    with stack.client() as c:
        c.post("/jobs/unknown-job-123/cancel")
    forever = [k for k in redis.scan_iter("mg:*") if redis.ttl(k) < 0]
    assert forever == [], "every key of ours has a TTL"
    # Outside our prefix there is only Celery's broker bookkeeping (queue bindings, the
    # unacked index), and the model queues, which are empty once the jobs are taken.
    broker = [k for k in redis.scan_iter("*") if not k.startswith("mg:")]
    for key in broker:
        assert key.startswith(("_kombu.", "unacked")) or key in {
            "tiny-gemma",
            "slow-model",
            "smollm2-demo",
            "ghost-model",
        }, key
        if redis.type(key) == "list":
            assert redis.llen(key) == 0, f"queue {key} still holds jobs"
    # images are deleted with their job, not just left to expire
    assert list(redis.scan_iter("mg:job:*:image:*")) == []


def _audit_lines(audit: Path, before: int, count: int) -> list[str]:
    """The audit lines after the first ``before``, once there are ``count`` of them (the
    middleware writes a request's line after its response has gone out)."""

    def written() -> bool:
        return len(audit.read_text().splitlines()) >= before + count

    wait_for(written, 10, f"{count} audit lines")
    return audit.read_text().splitlines()[before:]


def test_audit_trail_has_one_line_per_request_and_no_text(stack: Stack) -> None:
    audit = stack.workdir / "audit.jsonl"
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    prompt = f"Audit {MARKER} question"
    with stack.client() as c:
        r = c.post("/medgemma", json={**ask(prompt), "stream": False})
        c.get("/models")
    with stack.client(key="bad-key-000") as c:
        c.get("/conversations")
    lines = _audit_lines(audit, before, 3)
    records = [json.loads(line) for line in lines]
    chat = next(x for x in records if x["action"] == "chat.medgemma")
    assert chat["user_id"] == "alice" and chat["job_id"] == r.headers["x-job-id"]
    assert chat["outcome"] == "ok" and chat["status"] == 200
    assert chat["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert chat["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert any(x["action"] == "models.list" for x in records)
    denied = next(x for x in records if x["action"] == "conversation.list")
    assert denied["outcome"] == "denied:401" and denied["user_id"] == "-"
    assert MARKER not in audit.read_text()


def test_a_refused_chat_names_its_model_in_the_audit_trail(stack: Stack) -> None:
    """No worker serves the model: the 503's audit line still says which model was asked
    for, so an operator can count refusals per model."""
    audit = stack.workdir / "audit.jsonl"
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    with stack.client() as c:
        r = c.post("/medgemma", json=ask(f"Refused {MARKER}", model="ghost-model"))
    assert r.status_code == 503
    (line,) = _audit_lines(audit, before, 1)
    refused = json.loads(line)
    assert refused["action"] == "chat.medgemma" and refused["status"] == 503
    assert refused["model"] == "ghost-model" and refused["job_id"] is None
    assert MARKER not in audit.read_text()


def test_rate_limit_holds_across_two_gateway_processes(stack: Stack) -> None:
    env = {
        **stack.env,
        "GATEWAY_RATE_LIMIT_RPM": "3",
        "KEY_PREFIX": "mg",
        "GATEWAY_AUDIT_LOG": str(stack.workdir / "audit-rl.jsonl"),
    }
    ports = [free_port(), free_port()]
    gateways = [start_gateway(env, p, stack.workdir / f"gateway-rl-{p}.log") for p in ports]
    try:
        import httpx

        codes = []
        retry_after = None
        for i in range(5):
            port = ports[i % 2]
            r = httpx.post(
                f"http://127.0.0.1:{port}/medgemma",
                timeout=30,
                headers={"Authorization": "Bearer test-key-bob"},
                json={**ask("count me"), "stream": False, "verbosity": 0},
            )
            codes.append(r.status_code)
            if r.status_code == 429:
                retry_after = int(r.headers["retry-after"])
                assert r.json()["error"]["code"] == "rate_limited"
    finally:
        for g in gateways:
            g.stop()
    assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
    assert retry_after is not None and 1 <= retry_after <= 60


def test_another_users_conversation_id_is_their_own_space(stack: Stack) -> None:
    """Bob using Alice's conversation id, on either chat API, neither reads nor appends to
    Alice's conversation: ids live in per-user spaces (so they cannot collide either)."""
    from tests.stack import OTHER_KEY

    with stack.client() as alice:
        first = alice.post(
            "/medgemma",
            json={
                **ask("Alice's private history " * 20),
                "stream": False,
                "conversation_id": "shared-id",
            },
        )
    with stack.client(OTHER_KEY) as bob:
        seed = bob.post(
            "/medgemma", json={**ask("hi"), "stream": False, "conversation_id": "shared-id"}
        )
        oa = bob.post(
            "/v1/chat/completions",
            headers={"X-Conversation-Id": "shared-id"},
            json={
                "model": "tiny-gemma",
                "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
        bob_view = bob.get("/conversations/shared-id").json()
    assert seed.status_code == 200 and oa.status_code == 200
    # Bob's prompt did not carry Alice's long turn.
    assert seed.json()["usage"]["prompt_tokens"] < first.json()["usage"]["prompt_tokens"]
    assert all("Alice" not in m["content"] for m in bob_view["messages"])
    with stack.client() as alice:
        mine = alice.get("/conversations/shared-id").json()["messages"]
    assert len(mine) == 2 and "Alice's private history" in mine[0]["content"]


def test_every_route_needs_a_key(stack: Stack) -> None:
    routes = [
        ("GET", "/models"),
        ("GET", "/v1/models"),
        ("POST", "/medgemma"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/conversations"),
        ("GET", "/conversations/x"),
        ("DELETE", "/conversations/x"),
        ("POST", "/jobs/abcdefgh12/cancel"),
        ("GET", "/jobs/abcdefgh12/events"),
    ]
    with stack.client(key=None) as c:
        for method, path in routes:
            r = c.request(method, path, json={})
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        for open_path in ("/healthz", "/readyz", "/"):
            assert c.get(open_path).status_code in (200, 503)


def test_admin_models_are_a_404_on_the_openai_api_too(stack: Stack) -> None:
    with stack.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": "secret-model", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_audit_records_each_outcome(stack: Stack) -> None:
    audit = stack.workdir / "audit.jsonl"
    before = len(audit.read_text().splitlines())
    with stack.client() as c:
        c.post("/medgemma", json={**ask("x"), "stream": False})  # ok
        c.post("/medgemma", json=ask("x", model="no-such-model"))  # 404
        c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-gemma",
                "stream": True,  # 400
                "messages": [{"role": "user", "content": "word " * 2000}],
            },
        )
        c.post("/medgemma", json={"model": "tiny-gemma"})  # 422
    outcomes = {
        (r["action"], r["outcome"], r["status"])
        for r in map(json.loads, _audit_lines(audit, before, 4))
    }
    assert ("chat.medgemma", "ok", 200) in outcomes
    assert ("chat.medgemma", "denied:404", 404) in outcomes
    assert ("chat.openai", "error:prompt_too_long", 400) in outcomes
    assert ("chat.medgemma", "error:422", 422) in outcomes


def test_a_conversation_longer_than_the_context_is_trimmed_oldest_first(stack: Stack) -> None:
    """tiny-gemma's context is 512 tokens: after a few long turns the history no longer fits,
    the oldest turns are dropped from the prompt (the stored conversation keeps them all)."""
    long_turn = "Describe the patient's chart in detail please. " * 12
    prompts = []
    with stack.client() as c:
        for _ in range(6):
            r = c.post(
                "/medgemma",
                json={**ask(long_turn), "stream": False, "conversation_id": "very-long"},
            )
            assert r.status_code == 200, r.text
            prompts.append(r.json()["usage"]["prompt_tokens"])
        stored = c.get("/conversations/very-long").json()["messages"]
    assert len(stored) == 12
    assert max(prompts) <= 512
    assert prompts[-1] < prompts[0] * 6, "older turns were dropped from the prompt"
    assert re.search(r"[1-9]\d* old messages trimmed", stack.logs())
