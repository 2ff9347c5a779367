"""shared.registry: the real models.json, what the front end sees, and every error's wording."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.registry import DEFAULT_DISCLAIMER, ModelEntry, RegistryError, load_registry
from tests.stack import SEED_FIELDS

ROOT = Path(__file__).resolve().parent.parent


def _entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "model_name": "x",
        "model_alias": "X",
        "serving": {"path": "models/x"},
    }
    entry.update(overrides)
    return entry


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "models.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def _error(tmp_path: Path, data: object) -> str:
    with pytest.raises(RegistryError) as info:
        load_registry(_write(tmp_path, data))
    return str(info.value)


# --- the repository's models.json ---------------------------------------------------------------


def test_repo_models_json_loads() -> None:
    registry = load_registry(ROOT / "models.json")
    med = registry.get("medgemma-4b")
    assert med is not None
    assert med.serving.quantization == "8bit"
    assert med.serving.repo_id == "google/medgemma-4b-it"
    assert med.capabilities.image is True
    assert med.queue == "medgemma-4b"
    demo = registry.get("smollm2-demo")
    assert demo is not None
    assert demo.serving.package_file is not None
    assert registry.get("no-such-model") is None


def test_public_keeps_every_seed_field_and_hides_serving() -> None:
    registry = load_registry(ROOT / "models.json")
    raw = json.loads((ROOT / "models.json").read_text(encoding="utf-8"))
    for entry, source in zip(registry.models, raw, strict=True):
        public = entry.public()
        assert "serving" not in public
        assert SEED_FIELDS <= set(public)
        for field in SEED_FIELDS:
            assert public[field] == source[field], field
        assert public["disclaimer"] == DEFAULT_DISCLAIMER
        json.dumps(public)  # what GET /models returns must be JSON


# --- errors name the entry and the field ----------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert str(path) in str(info.value)
    assert "cannot read" in str(info.value)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    path.write_text('[\n  {"model_name": "x",\n  oops\n]\n', encoding="utf-8")
    with pytest.raises(RegistryError) as info:
        load_registry(path)
    assert "not valid JSON" in str(info.value)
    assert "line 3" in str(info.value)


@pytest.mark.parametrize("data", [{"model_name": "x"}, "x", 3])
def test_not_a_list(tmp_path: Path, data: object) -> None:
    assert "non-empty JSON list" in _error(tmp_path, data)


def test_empty_list(tmp_path: Path) -> None:
    assert "non-empty JSON list" in _error(tmp_path, [])


def test_bad_quantization(tmp_path: Path) -> None:
    bad = _entry(serving={"path": "m", "quantization": "3bit"})
    message = _error(tmp_path, [bad])
    assert "entry 0 ('x'), field serving.quantization" in message


def test_second_entry_is_named(tmp_path: Path) -> None:
    bad = _entry(model_name="y", serving={"path": "m", "dtype": "int3"})
    message = _error(tmp_path, [_entry(), bad])
    assert "entry 1 ('y'), field serving.dtype" in message


def test_no_weights_source(tmp_path: Path) -> None:
    message = _error(tmp_path, [_entry(serving={"quantization": "none"})])
    assert "entry 0 ('x'), field serving" in message
    assert "exactly one weights source" in message
    assert "got none" in message


def test_two_weights_sources(tmp_path: Path) -> None:
    message = _error(tmp_path, [_entry(serving={"path": "m", "repo_id": "org/m"})])
    assert "entry 0 ('x'), field serving" in message
    assert "exactly one weights source" in message
    assert "repo_id, path" in message


@pytest.mark.parametrize("price", ["abc", "-1", "NaN", "Infinity", ""])
def test_bad_in_billing(tmp_path: Path, price: str) -> None:
    message = _error(tmp_path, [_entry(in_billing=price)])
    assert "entry 0 ('x'), field in_billing" in message


def test_bad_out_billing(tmp_path: Path) -> None:
    message = _error(tmp_path, [_entry(out_billing="-0.5")])
    assert "entry 0 ('x'), field out_billing" in message
    assert "non-negative" in message


def test_unknown_extra_field(tmp_path: Path) -> None:
    message = _error(tmp_path, [_entry(colour="blue")])
    assert "entry 0 ('x'), field colour" in message


def test_unknown_field_in_capabilities(tmp_path: Path) -> None:
    message = _error(tmp_path, [_entry(capabilities={"video": True})])
    assert "entry 0 ('x'), field capabilities.video" in message


def test_duplicate_model_name(tmp_path: Path) -> None:
    message = _error(tmp_path, [_entry(), _entry(model_alias="Again")])
    assert "model_name 'x' appears more than once" in message


@pytest.mark.parametrize("name", ["MedGemma", "-lead", "with space", "a/b", "x" * 65, ""])
def test_bad_model_name(tmp_path: Path, name: str) -> None:
    message = _error(tmp_path, [_entry(model_name=name)])
    assert "field model_name" in message


def test_entry_that_is_not_an_object(tmp_path: Path) -> None:
    message = _error(tmp_path, [_entry(), "just a string"])
    assert "entry 1" in message


# --- cost and queue ------------------------------------------------------------------------------


def test_cost_is_per_million_tokens() -> None:
    entry = ModelEntry.model_validate(_entry(in_billing="2", out_billing="10"))
    assert entry.cost(1_000_000, 0) == pytest.approx(2.0)
    assert entry.cost(0, 1_000_000) == pytest.approx(10.0)
    assert entry.cost(1000, 500) == pytest.approx(0.002 + 0.005)
    assert entry.cost(0, 0) == 0.0


def test_cost_keeps_decimal_precision() -> None:
    entry = ModelEntry.model_validate(_entry(in_billing="0.1", out_billing="0.2"))
    assert entry.cost(3, 0) == pytest.approx(3e-7)
    free = ModelEntry.model_validate(_entry())
    assert free.cost(12345, 678) == 0.0


def test_queue_defaults_to_model_name() -> None:
    assert ModelEntry.model_validate(_entry()).queue == "x"
    custom = ModelEntry.model_validate(_entry(serving={"path": "m", "queue": "gpu-a"}))
    assert custom.queue == "gpu-a"


def test_relative_path_is_relative_to_models_json(tmp_path: Path) -> None:
    registry = load_registry(_write(tmp_path, [_entry()]))
    assert registry.resolve_path("models/x") == (tmp_path / "models" / "x").resolve()
    assert registry.resolve_path("/abs/m") == Path("/abs/m")
