"""The OpenAI-compatible API, driven by the official openai SDK and by plain HTTP for the
exact frame format; image input through the tiny multimodal Gemma 3."""

from __future__ import annotations

import base64
import io
import json
import time

import openai
import pytest
from httpx_sse import connect_sse
from PIL import Image
from redis import Redis

from tests.stack import ADMIN_KEY, USER_KEY, Stack, events_of

pytestmark = pytest.mark.integration


def sdk(stack: Stack, key: str = USER_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0)


def png_data_url(size: tuple[int, int] = (40, 30), fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 30, 200)).save(buf, format=fmt)
    mime = "png" if fmt == "PNG" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def test_sdk_streams_a_completion_with_usage(stack: Stack) -> None:
    stream = sdk(stack).chat.completions.create(
        model="tiny-gemma",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is anemia?"},
        ],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        max_tokens=12,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens <= 12
    assert usage_chunk.usage.total_tokens == (
        usage_chunk.usage.prompt_tokens + usage_chunk.usage.completion_tokens
    )
    assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
    assert text  # the tiny model always says something within 12 tokens


def test_sdk_non_stream_matches_stream(stack: Stack) -> None:
    client = sdk(stack)
    msgs = [{"role": "user", "content": "Define sepsis."}]
    full = client.chat.completions.create(
        model="tiny-gemma", messages=msgs, temperature=0, max_completion_tokens=10
    )
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="tiny-gemma", messages=msgs, temperature=0, max_completion_tokens=10, stream=True
        )
        if c.choices
    )
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content == streamed
    assert full.usage is not None and full.usage.completion_tokens <= 10


def test_sdk_errors_are_openai_errors(stack: Stack) -> None:
    client = sdk(stack)
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(
            model="tiny-gemma", n=2, messages=[{"role": "user", "content": "hi"}]
        )
    assert br.value.code == "unsupported_option" and br.value.param == "n"
    with pytest.raises(openai.AuthenticationError):
        sdk(stack, key="not-a-key").models.list()


def test_unknown_fields_are_ignored_like_openai(stack: Stack) -> None:
    with stack.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-gemma",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "some_future_field": {"x": 1},
                "metadata": {"a": "b"},
            },
        )
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_stream_frames_are_exactly_openai_shaped(stack: Stack) -> None:
    body = {
        "model": "tiny-gemma",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
        "max_tokens": 6,
        "temperature": 0,
    }
    with stack.client() as c, connect_sse(c, "POST", "/v1/chat/completions", json=body) as src:
        assert src.response.headers["x-job-id"]
        datas = [e.data for e in events_of(src)]
    assert datas[-1] == "[DONE]"
    chunks = [json.loads(d) for d in datas[:-1]]
    for ch in chunks:
        assert set(ch) == {"id", "object", "created", "model", "choices", "system_fingerprint"}
        assert ch["object"] == "chat.completion.chunk" and ch["model"] == "tiny-gemma"
        assert len(ch["choices"]) == 1 and ch["choices"][0]["index"] == 0
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])


def test_v1_models_lists_in_openai_format(stack: Stack) -> None:
    ids = {m.id for m in sdk(stack).models.list()}
    assert {"tiny-gemma", "ghost-model", "smollm2-demo"} <= ids and "secret-model" not in ids
    assert "secret-model" in {m.id for m in sdk(stack, ADMIN_KEY).models.list()}


def test_v1_models_lists_served_models_first(stack: Stack) -> None:
    """A front end picks the first model of the list as its default: it must be one that a
    worker serves (the seed's /models says which with ``available``). The served models'
    ``@background`` aliases (a front end's task model) come next, then the others."""
    with stack.client() as c:
        available = {m["model_name"]: m["available"] for m in c.get("/models").json()}
    ids = [m.id for m in sdk(stack).models.list()]
    assert available["tiny-gemma"] and not available["ghost-model"]
    rank = [0 if available[i] else 2 for i in ids if "@" not in i]
    assert rank == sorted(rank), ids  # every served model before the others
    served = [i for i in ids if "@" not in i and available[i]]
    aliases = [i for i in ids if i.endswith("@background")]
    assert aliases == [f"{m}@background" for m in served]  # one per served model, in order
    assert ids[: len(served) * 2] == served + aliases, ids


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": f"tool_{i}",
            "description": "a front end's built-in tool",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
    for i in range(3)
]


@pytest.mark.parametrize("choice", [None, "auto", "none"])
def test_offered_tools_the_model_may_leave_uncalled_are_answered_in_text(
    stack: Stack, choice: str | None
) -> None:
    """Open WebUI attaches its built-in tools to every chat (tool_choice absent): the answer
    comes in text, as OpenAI's semantics allow, and a header says the tools were not used."""
    body = {
        "model": "tiny-gemma",
        "messages": [{"role": "user", "content": "What is sepsis?"}],
        "tools": TOOLS,
        "stream": True,
        **({"tool_choice": choice} if choice else {}),
    }
    with stack.client() as c, connect_sse(c, "POST", "/v1/chat/completions", json=body) as src:
        assert src.response.status_code == 200
        assert src.response.headers["x-tools-ignored"] == "true"
        chunks = [e.data for e in events_of(src)]
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(d) for d in chunks[:-1]]
    text = "".join(p["choices"][0]["delta"].get("content") or "" for p in parsed)
    assert text
    assert all("tool_calls" not in p["choices"][0]["delta"] for p in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    with stack.client() as c:  # without tools: no such header
        plain = c.post("/v1/chat/completions", json={**body, "stream": False, "tools": None})
    assert plain.status_code == 200 and "x-tools-ignored" not in plain.headers


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tool_choice", "required"),
        ("tool_choice", {"type": "function", "function": {"name": "tool_0"}}),
        ("function_call", {"name": "tool_0"}),
    ],
)
def test_a_request_that_requires_a_tool_call_is_a_clear_400(
    stack: Stack, field: str, value: object
) -> None:
    body = {
        "model": "tiny-gemma",
        "messages": [{"role": "user", "content": "Look it up."}],
        "tools": TOOLS,
        field: value,
    }
    with pytest.raises(openai.BadRequestError) as err:
        sdk(stack).chat.completions.create(**body)  # type: ignore[call-overload]
    error = err.value.body
    assert isinstance(error, dict)
    assert error["code"] == "unsupported_option" and error["param"] == field
    assert "does not call" in error["message"]


def test_without_max_tokens_the_answer_may_use_the_context_left(stack: Stack) -> None:
    """Open WebUI sends no max_tokens: the answer is not cut at the registry's budget
    (tiny-gemma's max_new_tokens is 24) but may run to the end of the context (512), and a
    cut answer says so with finish_reason "length"."""
    ask_ = {
        "model": "tiny-gemma",
        "temperature": 0,
        "messages": [{"role": "user", "content": "Hi"}],
    }
    free = sdk(stack).chat.completions.create(**ask_)  # type: ignore[call-overload]
    capped = sdk(stack).chat.completions.create(**ask_, max_tokens=24)  # type: ignore[call-overload]
    assert capped.usage.completion_tokens == 24 and capped.choices[0].finish_reason == "length"
    assert free.usage.completion_tokens > 24
    assert free.usage.prompt_tokens + free.usage.completion_tokens == 512
    assert free.choices[0].finish_reason == "length"
    assert free.choices[0].message.content.startswith(capped.choices[0].message.content)


def test_conversation_header_gives_server_side_history(stack: Stack) -> None:
    with stack.client() as c:
        for text in ("First question.", "Second question."):
            r = c.post(
                "/v1/chat/completions",
                headers={"X-Conversation-Id": "oa-conv-1"},
                json={
                    "model": "tiny-gemma",
                    "max_tokens": 5,
                    "messages": [{"role": "user", "content": text}],
                },
            )
            assert r.status_code == 200
        conv = c.get("/conversations/oa-conv-1").json()
        stateless = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-gemma",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": "Second question."}],
            },
        ).json()
    assert [m["content"] for m in conv["messages"] if m["role"] == "user"] == [
        "First question.",
        "Second question.",
    ]
    # Without the header the same question carries no history: a shorter prompt.
    assert stateless["usage"]["prompt_tokens"] < r.json()["usage"]["prompt_tokens"]


def test_image_question_runs_end_to_end(stack: Stack) -> None:
    text_only = [{"type": "text", "text": "What does this X-ray show?"}]
    with stack.client() as c:
        plain = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-gemma",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": text_only}],
            },
        ).json()
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-gemma",
                "max_tokens": 4,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": png_data_url()}},
                            *text_only,
                        ],
                    }
                ],
            },
        )
        seed_api = c.post(
            "/medgemma",
            json={
                "model": "tiny-gemma",
                "stream": False,
                "temperature": 0,
                "user_message": [
                    {"type": "image", "data_url": png_data_url(fmt="JPEG")},
                    {"type": "text", "text": "Describe it."},
                ],
            },
        )
    assert r.status_code == 200, r.text
    # The processor expanded the image into its soft tokens (4 for the tiny model) plus the
    # begin/end-of-image markers: the prompt the model saw is longer by at least that.
    assert r.json()["usage"]["prompt_tokens"] >= plain["usage"]["prompt_tokens"] + 6
    assert seed_api.status_code == 200, seed_api.text
    job_id = r.headers["x-job-id"]
    redis = Redis.from_url(stack.redis_url)
    assert list(redis.scan_iter(f"mg:job:{job_id}:image:*")) == [], "image bytes deleted"
    assert f"job {job_id} prompt: " in stack.logs() and "1 image" in stack.logs()


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://example.org/xray.png", "image_url_not_allowed"),
        ("http://10.0.0.5/internal.png", "image_url_not_allowed"),
        ("data:image/png;base64,!!!notbase64", "invalid_image"),
        (
            "data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),
            "invalid_image",
        ),
        ("file:///etc/passwd", "invalid_image"),
        (
            "data:image/png;base64," + base64.b64encode(b"x" * (6 * 1024 * 1024)).decode(),
            "image_too_large",
        ),
    ],
)
def test_invalid_images_get_400(stack: Stack, url: str, code: str) -> None:
    with stack.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "tiny-gemma",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": url}},
                            {"type": "text", "text": "?"},
                        ],
                    }
                ],
            },
        )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == "messages.0.content.0.image_url.url"


def test_decompression_bomb_is_refused_before_decoding(stack: Stack) -> None:
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")  # 64 Mpx, a few KB compressed
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with stack.client() as c:
        r = c.post(
            "/medgemma",
            json={
                "model": "tiny-gemma",
                "user_message": [{"type": "image", "data_url": url}, {"type": "text", "text": "?"}],
            },
        )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "image_too_many_pixels"


def test_image_on_a_text_only_model_is_refused(stack: Stack) -> None:
    with stack.client() as c:
        r = c.post(
            "/medgemma",
            json={
                "model": "smollm2-demo",
                "user_message": [
                    {"type": "image", "data_url": png_data_url()},
                    {"type": "text", "text": "?"},
                ],
            },
        )
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_capability"


def test_a_prompt_over_the_context_is_a_400_even_when_streaming(stack: Stack) -> None:
    # The job fails before its first token: the gateway waits briefly for the first event,
    # so the client gets a proper HTTP error instead of a 200 stream holding an error.
    body = {
        "model": "tiny-gemma",
        "stream": True,
        "messages": [{"role": "user", "content": "word " * 2000}],
    }
    with stack.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "prompt_too_long" and "512" in err["message"]


def test_mid_stream_failure_is_an_error_frame_then_done(stack: Stack) -> None:
    # The only worker of a model killed in the middle of an answer: its lease lapses, no
    # other worker can take the job over, and the stream ends with an OpenAI error frame and
    # [DONE] within seconds, never a hang.
    worker = stack.add_worker("slow-model")
    body = {
        "model": "slow-model",
        "stream": True,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "hi"}],
    }
    datas: list[str] = []
    killed_at = 0.0
    with stack.client() as c, connect_sse(c, "POST", "/v1/chat/completions", json=body) as src:
        for e in events_of(src):
            datas.append(e.data)
            if len(datas) == 4:
                worker.popen.kill()  # SIGKILL: no goodbye, no terminal event
                killed_at = time.monotonic()
        ended_at = time.monotonic()
    assert datas[-1] == "[DONE]"
    err = json.loads(datas[-2])["error"]
    assert err["code"] == "worker_lost"
    assert ended_at - killed_at < 10


def test_sdk_survives_a_long_stream_with_keepalives_and_queueing(stack: Stack) -> None:
    # Keep-alive comments after an event id make the official SDK parse an empty event
    # (json error). OpenAI streams therefore send data frames only once ids flow. The test
    # stack pings every 0.5 s: a 3 s answer on the slow model would hit that.
    worker = stack.add_worker("queue-model")
    try:
        stream = sdk(stack).chat.completions.create(
            model="queue-model",
            messages=[{"role": "user", "content": "long"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    finally:
        worker.stop()
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(f"tok{i} " for i in range(60))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 60
