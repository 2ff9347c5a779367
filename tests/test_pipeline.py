"""The whole path for real: gateway (uvicorn) → Celery on redis-server → worker (tiny Gemma 3)
→ token events on pub/sub → SSE."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from shared.redis_url import sync_redis
from tests.stack import OTHER_KEY, SEED_FIELDS, Stack, ask, sse_events, tokens

pytestmark = pytest.mark.integration


def test_streamed_answer_arrives_as_ordered_tokens_then_done(stack: Stack) -> None:
    with stack.client() as c:
        resp, events = sse_events(c, "/medgemma", ask("What are the symptoms of diabetes?"))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["x-job-id"]
    kinds = [e.event for e in events if e.event]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}
    ids = [int(e.id) for e in events if e.event]
    # SSE ids are the per-job sequence numbers: increasing, ending at the log's last event
    # (a frame that carries several waiting token events has the id of the last one).
    assert ids == sorted(set(ids)) and ids[0] >= 1
    log = sync_redis(stack.redis_url).xlen(f"mg:job:{resp.headers['x-job-id']}:log")
    assert ids[-1] == log
    done = json.loads(events[-1].data)
    usage = done["usage"]
    assert usage["completion_tokens"] >= len(kinds) - 1 > 0
    assert usage["prompt_tokens"] > 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # tiny-gemma costs 2 per 1M prompt tokens and 10 per 1M completion tokens
    expected = (2 * usage["prompt_tokens"] + 10 * usage["completion_tokens"]) / 1e6
    assert usage["cost"] == pytest.approx(expected)
    assert done["finish_reason"] in ("stop", "length")
    assert "not a substitute" in done["disclaimer"]


def test_non_stream_answer_matches_the_stream(stack: Stack) -> None:
    body = ask("Explain hypertension in one line.")
    with stack.client() as c:
        _, events = sse_events(c, "/medgemma", body)
        r = c.post("/medgemma", json={**body, "stream": False})
    assert r.status_code == 200
    data = r.json()
    assert set(data) >= {"conversation_id", "model", "content", "usage"}
    streamed_usage = json.loads(events[-1].data)["usage"]
    assert data["usage"]["prompt_tokens"] == streamed_usage["prompt_tokens"]
    assert data["usage"]["completion_tokens"] == streamed_usage["completion_tokens"]
    assert data["content"] == tokens(events)  # greedy: same text both ways
    assert r.headers["x-job-id"] == data["job_id"]


def test_second_turn_carries_the_first(stack: Stack) -> None:
    with stack.client() as c:
        first = c.post("/medgemma", json={**ask("My patient has a fever."), "stream": False})
        cid = first.json()["conversation_id"]
        _, events = sse_events(
            c, "/medgemma", {**ask("What should I check next?"), "conversation_id": cid}
        )
        conv = c.get(f"/conversations/{cid}").json()
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
    assert conv["messages"][0]["content"] == "My patient has a fever."
    assert conv["messages"][1]["content"] == first.json()["content"]
    assert conv["messages"][3]["content"] == tokens(events)
    second_prompt = json.loads(events[-1].data)["usage"]["prompt_tokens"]
    assert second_prompt > first.json()["usage"]["prompt_tokens"]


def test_concurrent_turns_on_one_conversation_do_not_interleave(stack: Stack) -> None:
    body = {**ask("Two at once?"), "conversation_id": "busy-conv-1", "stream": False}
    with httpx.Client(
        base_url=stack.base_url, timeout=60, headers={"Authorization": "Bearer test-key-alice"}
    ) as c:
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda _: c.post("/medgemma", json=body), range(4)))
        conv = c.get("/conversations/busy-conv-1").json()
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and set(codes) <= {200, 409}
    for r in results:
        if r.status_code == 409:
            assert r.json()["error"]["code"] == "conversation_busy"
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["user", "assistant"] * codes.count(200)


def test_model_without_worker_gets_503_at_once(stack: Stack) -> None:
    with stack.client() as c:
        t0 = time.monotonic()
        r = c.post("/medgemma", json=ask("hello", model="ghost-model"))
        elapsed = time.monotonic() - t0
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_unavailable"
    assert "ghost-model" in r.json()["error"]["message"]
    assert elapsed < 1.0


def test_models_lists_availability_and_hides_admin_models(stack: Stack) -> None:
    with stack.client() as c:
        models = {m["model_name"]: m for m in c.get("/models").json()}
    assert models["tiny-gemma"]["available"] is True
    assert models["ghost-model"]["available"] is False
    assert "secret-model" not in models
    assert "serving" not in models["tiny-gemma"]
    assert SEED_FIELDS <= set(models["tiny-gemma"])
    with stack.client("test-key-admin") as c:
        assert "secret-model" in {m["model_name"] for m in c.get("/models").json()}


def test_admin_model_is_a_404_for_users(stack: Stack) -> None:
    with stack.client() as c:
        r = c.post("/medgemma", json=ask("hi", model="secret-model"))
        unknown = c.post("/medgemma", json=ask("hi", model="no-such-model"))
    assert r.status_code == 404 and unknown.status_code == 404
    assert r.json()["error"]["code"] == unknown.json()["error"]["code"] == "model_not_found"


def test_requests_need_a_valid_key(stack: Stack) -> None:
    with stack.client(key=None) as c:
        assert c.post("/medgemma", json=ask("hi")).status_code == 401
        assert c.get("/models").status_code == 401
        assert c.get("/healthz").status_code == 200
    with stack.client(key="wrong-key-123") as c:
        r = c.get("/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


def test_other_users_cannot_read_a_conversation(stack: Stack) -> None:
    with stack.client() as c:
        cid = c.post("/medgemma", json={**ask("private"), "stream": False}).json()[
            "conversation_id"
        ]
    with stack.client(OTHER_KEY) as bob:
        assert bob.get(f"/conversations/{cid}").status_code == 404
        assert bob.delete(f"/conversations/{cid}").status_code == 404
    with stack.client() as c:
        assert c.get(f"/conversations/{cid}").status_code == 200
        assert cid in {x["conversation_id"] for x in c.get("/conversations").json()}
        assert c.delete(f"/conversations/{cid}").status_code == 204
        assert c.get(f"/conversations/{cid}").status_code == 404


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("search", True, "unsupported_capability"),
        ("deep_research", True, "unsupported_capability"),
        ("mcp", [{"server": "x"}], "unsupported_capability"),
        ("reason", 1, "unsupported_control"),
        ("dan", True, "unsupported_option"),
        ("in_billing", 5, "billing_mismatch"),
    ],
)
def test_what_the_model_lacks_is_refused_by_name(
    stack: Stack, field: str, value: object, code: str
) -> None:
    with stack.client() as c:
        r = c.post("/medgemma", json={**ask("hi"), field: value})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == field


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"user_message": [{"type": "text", "text": "hi"}]}, "model"),
        ({"model": "tiny-gemma"}, "user_message"),
        ({"model": "tiny-gemma", "user_message": []}, "user_message"),
        (
            {"model": "tiny-gemma", "user_message": [{"type": "video", "text": "x"}]},
            "user_message.0",
        ),
        ({"model": "tiny-gemma", "user_message": "hi"}, "user_message"),
        ({**ask("hi"), "temperature": 9}, "temperature"),
        ({**ask("hi"), "verbosity": 7}, "verbosity"),
        ({**ask("hi"), "stream": "maybe"}, "stream"),
        ({**ask("hi"), "conversation_id": "../../etc"}, "conversation_id"),
        ({**ask("hi"), "surprise": 1}, "surprise"),
    ],
)
def test_malformed_bodies_get_422_naming_the_field(
    stack: Stack, body: dict[str, object], param: str
) -> None:
    with stack.client() as c:
        r = c.post("/medgemma", json=body)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert err["param"].startswith(param)


def test_broken_json_and_huge_bodies_are_clear_errors(stack: Stack) -> None:
    with stack.client() as c:
        r = c.post("/medgemma", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        big = c.post(
            "/medgemma",
            content=b"x" * (17 * 1024 * 1024),
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"


def test_verbosity_changes_the_answer_budget(stack: Stack) -> None:
    with stack.client() as c:
        terse = c.post(
            "/medgemma", json={**ask("Describe asthma."), "stream": False, "verbosity": 0}
        ).json()
        full = c.post(
            "/medgemma", json={**ask("Describe asthma."), "stream": False, "verbosity": 3}
        ).json()
    # tiny-gemma's max_new_tokens is 24: verbosity 0 allows max(16, 6) tokens, 3 allows 48.
    assert terse["usage"]["completion_tokens"] <= 16
    if full["finish_reason"] == "length":
        assert full["usage"]["completion_tokens"] == 48


def test_readyz_reports_workers(stack: Stack) -> None:
    with stack.client(key=None) as c:
        r = c.get("/readyz")
    assert r.status_code == 200
    assert r.json()["models"]["tiny-gemma"] >= 1 and r.json()["redis"] is True


def test_erasing_a_conversation_erases_its_jobs_event_logs(stack: Stack) -> None:
    from redis import Redis

    from shared.keys import Keys

    redis = Redis.from_url(stack.redis_url, decode_responses=True)
    with stack.client() as c:
        r = c.post(
            "/medgemma", json={**ask("erase me"), "stream": False, "conversation_id": "to-erase"}
        )
        job_id = r.headers["x-job-id"]
        assert redis.exists(Keys().job_log(job_id)) == 1  # the answer's text is in the log
        assert c.delete("/conversations/to-erase").status_code == 204
    leftovers = [k for k in Keys().job_keys(job_id) if redis.exists(k)]
    assert leftovers == []
    assert list(redis.scan_iter("mg:conv:*:to-erase*")) == []
