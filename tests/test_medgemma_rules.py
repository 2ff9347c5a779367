"""gateway.api.medgemma: what POST /medgemma refuses, and how the seed's controls become
sampling."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.api.medgemma.protocol import MedGemmaRequest
from gateway.api.medgemma.serving import check_request, sampling_for
from gateway.core.errors import APIError
from shared.errors import ErrorCode
from shared.registry import ModelEntry

SEED_README = Path("/work/shared/seed/medgemma-backend-README.md")

# The body of the seed's "Request Format" section, verbatim.
SEED_EXAMPLE: dict[str, Any] = {
    "conversation_id": "your_conversation_id",
    "model": "medgemma-4b",
    "in_billing": 0,
    "out_billing": 0,
    "temperature": 0.7,
    "reason": 0,
    "verbosity": 2,
    "system_message": "You are a helpful medical AI assistant.",
    "user_message": [{"type": "text", "text": "What are the symptoms of diabetes?"}],
    "inference": False,
    "search": False,
    "deep_research": False,
    "dan": False,
    "mcp": [],
    "stream": True,
}


def _entry(
    *,
    capabilities: dict[str, bool] | None = None,
    controls: dict[str, bool] | None = None,
    max_new_tokens: int = 512,
    in_billing: str = "0",
    out_billing: str = "0",
) -> ModelEntry:
    return ModelEntry.model_validate(
        {
            "model_name": "medgemma-4b",
            "model_alias": "MedGemma 4B",
            "in_billing": in_billing,
            "out_billing": out_billing,
            "capabilities": capabilities or {},
            "controls": controls or {},
            "serving": {"repo_id": "google/medgemma-4b-it", "max_new_tokens": max_new_tokens},
        }
    )


def _req(**overrides: Any) -> MedGemmaRequest:
    body = {"model": "medgemma-4b", "user_message": [{"type": "text", "text": "Hi"}]}
    body.update(overrides)
    return MedGemmaRequest.model_validate(body)


def _refusal(req: MedGemmaRequest, entry: ModelEntry) -> APIError:
    with pytest.raises(APIError) as info:
        check_request(req, entry)
    assert info.value.status == 400
    return info.value


# --- the request schema --------------------------------------------------------------------


def test_seed_example_is_the_readme_body() -> None:
    if not SEED_README.is_file():
        pytest.skip("the seed README is not on this machine")
    text = SEED_README.read_text(encoding="utf-8")
    section = text.split("### Request Format", 1)[1]
    block = re.search(r"```json\n(.*?)```", section, re.S)
    assert block is not None
    assert json.loads(block.group(1)) == SEED_EXAMPLE


def test_seed_example_is_accepted() -> None:
    req = MedGemmaRequest.model_validate(SEED_EXAMPLE)
    assert req.conversation_id == "your_conversation_id"
    assert req.user_message[0].text == "What are the symptoms of diabetes?"
    assert req.stream is True
    # and the default MedGemma entry (as in models.json) serves it
    check_request(req, _entry(capabilities={"image": True}))


def test_seed_example_as_json_is_accepted() -> None:
    req = MedGemmaRequest.model_validate_json(json.dumps(SEED_EXAMPLE))
    assert req.temperature == 0.7


@pytest.mark.parametrize("field", ["temprature", "images", "top_k"])
def test_unknown_field_is_refused(field: str) -> None:
    with pytest.raises(ValidationError) as info:
        MedGemmaRequest.model_validate({**SEED_EXAMPLE, field: 1})
    assert field in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"user_message": []},
        {"user_message": [{"type": "image", "url": "x"}]},
        {"user_message": [{"type": "text", "text": ""}]},
        {"conversation_id": "has space"},
        {"temperature": 2.5},
        {"verbosity": 4},
        {"reason": -1},
    ],
)
def test_malformed_fields_are_refused(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        MedGemmaRequest.model_validate({**SEED_EXAMPLE, **overrides})


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["search", "deep_research"])
def test_unsupported_capability(field: str) -> None:
    err = _refusal(_req(**{field: True}), _entry())
    assert err.code == ErrorCode.UNSUPPORTED_CAPABILITY
    assert err.param == field
    assert "'medgemma-4b'" in err.message
    # the same request is fine for a model that has it
    check_request(_req(**{field: True}), _entry(capabilities={field: True}))


def test_inference_needs_the_capability() -> None:
    check_request(_req(inference=True), _entry())  # on by default, as in models.json
    err = _refusal(_req(inference=True), _entry(capabilities={"inference": False}))
    assert err.code == ErrorCode.UNSUPPORTED_CAPABILITY
    assert err.param == "inference"
    check_request(_req(inference=False), _entry(capabilities={"inference": False}))


def test_mcp_tools_are_refused() -> None:
    err = _refusal(_req(mcp=[{"name": "pubmed"}]), _entry())
    assert err.code == ErrorCode.UNSUPPORTED_CAPABILITY
    assert err.param == "mcp"
    check_request(_req(mcp=[]), _entry())
    check_request(_req(mcp=[{"name": "pubmed"}]), _entry(capabilities={"mcp": True}))


def test_stream_on_a_model_that_cannot() -> None:
    no_stream = _entry(capabilities={"stream": False})
    err = _refusal(_req(stream=True), no_stream)
    assert err.code == ErrorCode.UNSUPPORTED_CAPABILITY
    assert err.param == "stream"
    check_request(_req(stream=False), no_stream)


def test_dan_is_never_supported() -> None:
    everything = _entry(
        capabilities={"search": True, "deep_research": True, "mcp": True},
        controls={"reason": True},
    )
    err = _refusal(_req(dan=True), everything)
    assert err.code == ErrorCode.UNSUPPORTED_OPTION
    assert err.param == "dan"


def test_reason_needs_the_control() -> None:
    err = _refusal(_req(reason=2), _entry())
    assert err.code == ErrorCode.UNSUPPORTED_CONTROL
    assert err.param == "reason"
    check_request(_req(reason=0), _entry())
    check_request(_req(reason=2), _entry(controls={"reason": True}))


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 0.2), ("verbosity", 1), ("system_message", "Be brief.")],
)
def test_controls_that_are_off(field: str, value: object) -> None:
    err = _refusal(_req(**{field: value}), _entry(controls={field: False}))
    assert err.code == ErrorCode.UNSUPPORTED_CONTROL
    assert err.param == field
    check_request(_req(**{field: value}), _entry())  # on by default
    check_request(_req(), _entry(controls={field: False}))  # omitted: fine


@pytest.mark.parametrize("field", ["in_billing", "out_billing"])
def test_billing_mismatch(field: str) -> None:
    entry = _entry(in_billing="2.5", out_billing="10")
    err = _refusal(_req(**{field: 3}), entry)
    assert err.code == ErrorCode.BILLING_MISMATCH
    assert err.param == field
    assert "GET /models" in err.message


def test_billing_zero_or_equal_is_accepted() -> None:
    entry = _entry(in_billing="2.5", out_billing="10")
    check_request(_req(in_billing=0, out_billing=0), entry)
    check_request(_req(in_billing=2.5, out_billing=10), entry)
    check_request(_req(in_billing="2.50", out_billing="10.0"), entry)


def test_billing_not_a_number() -> None:
    err = _refusal(_req(in_billing="cheap"), _entry())
    assert err.code == ErrorCode.INVALID_REQUEST
    assert err.param == "in_billing"


def test_refusal_body_names_the_field() -> None:
    err = _refusal(_req(search=True), _entry())
    info = err.info()
    assert info.param == "search"
    assert info.code == "unsupported_capability"
    assert info.type == "invalid_request_error"


# --- sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("verbosity", "budget"), [(0, 128), (1, 256), (2, 512), (3, 1024), (None, 512)]
)
def test_verbosity_sets_the_answer_budget(verbosity: int | None, budget: int) -> None:
    params, _hint = sampling_for(_req(verbosity=verbosity), _entry(max_new_tokens=512))
    assert params.max_new_tokens == budget


def test_verbosity_budget_is_at_least_16() -> None:
    params, _ = sampling_for(_req(verbosity=0), _entry(max_new_tokens=20))
    assert params.max_new_tokens == 16
    params, _ = sampling_for(_req(verbosity=3), _entry(max_new_tokens=20))
    assert params.max_new_tokens == 40


def test_verbosity_hints() -> None:
    hints = {v: sampling_for(_req(verbosity=v), _entry())[1] for v in range(4)}
    assert "one or two sentences" in hints[0]
    assert "briefly" in hints[1]
    assert hints[2] == ""
    assert "detail" in hints[3]
    assert sampling_for(_req(), _entry())[1] == ""


def test_temperature_default() -> None:
    params, _ = sampling_for(_req(), _entry())
    assert params.temperature == 0.7
    assert params.top_p == 0.95


def test_temperature_zero_is_greedy() -> None:
    params, _ = sampling_for(_req(temperature=0), _entry())
    assert params.temperature == 0.0
    assert params.top_p == 1.0


def test_temperature_is_passed_through() -> None:
    params, _ = sampling_for(_req(temperature=1.3), _entry())
    assert params.temperature == 1.3
    assert params.top_p == 0.95
