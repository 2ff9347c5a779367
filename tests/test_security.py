"""Patient-data protection on the real stack: nothing of a prompt, an answer or an image in any
log line; every Redis key a chat leaves has a TTL; an audit line per request without the text;
rate limits counted across gateway processes."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time

import pytest
from httpx_sse import connect_sse
from PIL import Image
from redis import Redis

from devstack.processes import free_port, start_gateway
from tests.stack import USER_KEY, Stack, ask, sse_events

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
            list(src.iter_sse())
    return [a for a in answers if len(a.strip()) >= 8]


def test_no_patient_text_in_any_log_line(stack: Stack) -> None:
    image_url, b64 = _image_url()
    answers = _chat_everywhere(stack, f"My patient {MARKER} has chest pain.", image_url)
    time.sleep(0.5)  # let the processes flush their last lines
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


def test_audit_trail_has_one_line_per_request_and_no_text(stack: Stack) -> None:
    audit = stack.workdir / "audit.jsonl"
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    prompt = f"Audit {MARKER} question"
    with stack.client() as c:
        r = c.post("/medgemma", json={**ask(prompt), "stream": False})
        c.get("/models")
    with stack.client(key="bad-key-000") as c:
        c.get("/conversations")
    time.sleep(0.2)
    lines = audit.read_text().splitlines()[before:]
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
