"""What ``medgemma setup token|download|check`` does, without printing (see :mod:`worker.cli`).

Every step reports :class:`Check` lines (``OK`` / ``WARN`` / ``FAIL``, what, detail) through a
:class:`Report`, as soon as it knows them; the caller decides how to show them. A check that finds
a problem says what to do about it; nothing here ends in a traceback for a problem a person can
fix. The Hugging Face token is never part of a line: :class:`Report` blanks it out of any detail
as a last guard.

Decisions worth knowing:

* Hub errors are mapped by exception type, as :mod:`worker.loader` does. Downloads go through the
  loader's own snapshot function (same ``HUB_ALLOW_PATTERNS``, same error messages), so what
  ``setup download`` fetches is exactly what a worker later loads.
* ``huggingface_hub``'s HTTP client has no timeout for ``whoami``/``auth_check``: behind a
  firewall that drops packets they would hang. They run in a daemon thread with a deadline.
* The memory estimate is parameters x bytes per parameter (bf16 2, 8-bit 1.2, 4-bit 0.8,
  float32 4) + 20% for activations and the KV cache. The 8-/4-bit figures are MedGemma 4B's
  measured footprints (docs/bench/medgemma_shape_h200.json: 1.16 and 0.74-0.80 bytes per
  parameter), not the nominal 1 and 0.5: bitsandbytes leaves the 671M-parameter embedding, the
  norms and parts of the vision tower in 16 bits. Parameters come from a small table for known
  hub repos (no download needed) or, for a local checkpoint, from its ``config.json`` by building
  the model on the meta device (exact; tied embeddings counted once).
* The smoke test loads the model with :func:`worker.loader.load_model` (as a worker does) with
  ``HF_HUB_OFFLINE=1``, so it uses only weights already on this machine and never waits on a
  network, then generates one short greedy answer with the worker's engine (:mod:`worker.engines`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import importlib
import importlib.util
import json
import os
import platform
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, TypeVar

from huggingface_hub import HfApi, get_token, snapshot_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from shared.registry import ModelEntry, Registry
from worker.loader import (
    DEFAULT_CACHE_ROOT,
    GGUF_MARKER,
    HUB_ALLOW_PATTERNS,
    ModelLoadError,
    _download_snapshot,
    _hub_offline,
    _package_file,
    _short,
    _torch_dtype,
    gguf_cache_folder,
    hf_token_from_env,
    load_model,
    resolve_device,
)

Status = Literal["OK", "WARN", "FAIL"]

TOKENS_PAGE = "https://huggingface.co/settings/tokens"
TOKEN_ENV_NAMES = ("HUGGINGFACE_TOKEN", "HF_TOKEN")  # hf_token_from_env's order
DEFAULT_HUB_TIMEOUT_S = 20.0
SMOKE_PROMPT = "In one sentence: what is hypertension?"

#: Bytes per parameter of a quantized model, as measured for MedGemma 4B on an H200 (see the
#: module docstring): more than 1 and 0.5 because embeddings and norms stay in 16 bits.
QUANT_BYTES_PER_PARAM = {"8bit": 1.2, "4bit": 0.8}
#: Activations and the KV cache on top of the weights.
OVERHEAD = 0.20
_T = TypeVar("_T")


@dataclass(frozen=True)
class RepoFacts:
    """What is known about a hub repo without asking the hub."""

    parameters: int
    download_bytes: int


#: Known hub repos: parameters (exact, tied lm_head counted once) and the size of the files
#: HUB_ALLOW_PATTERNS fetches (bf16 safetensors + tokenizer).
KNOWN_REPOS: dict[str, RepoFacts] = {
    "google/medgemma-4b-it": RepoFacts(parameters=4_300_079_472, download_bytes=8_640_000_000),
}


@dataclass(frozen=True)
class Check:
    """One result line: ``OK|WARN|FAIL  <what>  <detail>``."""

    status: Status
    what: str
    detail: str


Line = Check | str
Sink = Callable[[Line], None]


@dataclass
class Report:
    """Collects the lines of one command and hands each to ``sink`` at once.

    ``secrets`` (the token) are replaced by ``***`` in every line, whatever produced it.
    """

    sink: Sink
    secrets: list[str] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(isinstance(x, Check) and x.status == "FAIL" for x in self.lines)

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    def add(self, status: Status, what: str, detail: str) -> Check:
        check = Check(status, what, self._redact(detail))
        self.lines.append(check)
        self.sink(check)
        return check

    def ok(self, what: str, detail: str) -> Check:
        return self.add("OK", what, detail)

    def warn(self, what: str, detail: str) -> Check:
        return self.add("WARN", what, detail)

    def fail(self, what: str, detail: str) -> Check:
        return self.add("FAIL", what, detail)

    def note(self, text: str) -> None:
        text = self._redact(text)
        self.lines.append(text)
        self.sink(text)


class SetupError(Exception):
    """A problem that stops a command before any check runs (bad token file ...)."""


# --- formatting ------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """``8.6 GB`` (decimal units, as disk vendors and the hub write sizes)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _entry_source(entry: ModelEntry, registry: Registry) -> str:
    s = entry.serving
    if s.engine == "loadtest":
        return "the load-test engine (no weights)"
    if s.repo_id is not None:
        return f"hub repo {s.repo_id} (revision {s.revision or 'main'})"
    if s.path is not None:
        return f"local path {registry.resolve_path(s.path)}"
    assert s.package_file is not None
    return f"file {s.package_file.file} of the Python package {s.package_file.package}"


def _hub_cache(cache_dir: Path | None) -> Path:
    return cache_dir.expanduser() if cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)


def _download_hint(entry: ModelEntry) -> str:
    return (
        f"downloads need network: run `medgemma setup download --model {entry.model_name}` on a "
        "machine that has it, then copy its Hugging Face cache (HF_HOME, default "
        "~/.cache/huggingface) to this machine, or bring the model folder on a disk and run "
        f"`medgemma setup download --model {entry.model_name} --from-dir DIR`"
    )


# --- the token -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """The token and where it came from (never the value itself in messages)."""

    value: str | None
    origin: str


def resolve_token(token_file: Path | None) -> Token:
    """The token from ``token_file``, else HUGGINGFACE_TOKEN / HF_TOKEN, else ``hf auth login``'s.

    Raises :class:`SetupError` when ``token_file`` cannot be read or is empty.
    """
    if token_file is not None:
        try:
            value = token_file.expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SetupError(
                f"cannot read the token file {token_file} ({exc.strerror or exc}): give a "
                "readable file that holds only the token"
            ) from None
        if not value:
            raise SetupError(f"the token file {token_file} is empty: put the read token in it")
        return Token(value, f"the file {token_file}")
    from_env = hf_token_from_env()
    if from_env is not None:
        name = next(n for n in TOKEN_ENV_NAMES if os.environ.get(n, "").strip() == from_env)
        return Token(from_env, name)
    saved = get_token()
    if saved:
        return Token(saved, "the token saved by `hf auth login`")
    return Token(None, "")


def _token_file_permissions(report: Report, token_file: Path) -> None:
    try:
        mode = token_file.expanduser().stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        report.warn(
            "token file",
            f"{token_file} can be read by other users: `chmod 600 {token_file}`",
        )


class HubTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:.0f} s")
        self.seconds = seconds


def _with_deadline(fn: Callable[[], _T], seconds: float) -> _T:
    """Run ``fn`` in a daemon thread; raise :class:`HubTimeout` if it has not returned in time."""
    result: list[_T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=run, name="hub-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise HubTimeout(seconds)
    if error:
        raise error[0]
    return result[0]


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures of the HTTP client huggingface_hub uses (httpx2 in 2.x, httpx in 1.x)."""
    found: list[type[BaseException]] = [HubTimeout, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            cls = getattr(importlib.import_module(module), "TransportError", None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def explain_hub_error(
    exc: BaseException, *, entry: ModelEntry, repo_id: str | None, account: str | None
) -> tuple[str, str]:
    """``(what, detail)`` for a failed ``whoami``/``auth_check``/``model_info``, by type."""
    page = f"https://huggingface.co/{repo_id}" if repo_id else "the model's page"
    if isinstance(exc, OfflineModeIsEnabled):
        return (
            "hub",
            "HF_HUB_OFFLINE is set, so the Hugging Face hub was not contacted: unset it to check "
            f"the token; {_download_hint(entry)}",
        )
    if isinstance(exc, GatedRepoError):
        who = f"the account {account!r}" if account else "the token's account"
        return (
            "access",
            f"{repo_id} is a gated model and {who} has not accepted its terms yet: open {page}, "
            f"sign in as {account or 'the account that owns the token'}, accept the terms "
            "(access is usually granted at once), then run this again",
        )
    if isinstance(exc, RevisionNotFoundError):
        return (
            "revision",
            f"the revision in models.json does not exist in {repo_id}: check serving.revision "
            f"(branches, tags and commits are listed at {page}/commits/main)",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            "access",
            f"{repo_id} was not found on the Hugging Face hub: check serving.repo_id in "
            "models.json; if the repo is private, the token's account must be able to read it",
        )
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return (
                "token",
                "the Hugging Face hub rejected the token (401 Unauthorized): it is invalid, "
                f"expired or revoked: create a read token at {TOKENS_PAGE} and set HF_TOKEN "
                "(or HUGGINGFACE_TOKEN) to it",
            )
        if status == 403:
            return (
                "access",
                f"the token may not read {repo_id} (403 Forbidden): use a read token, or give "
                f"the fine-grained token read access to public gated repositories at {TOKENS_PAGE}",
            )
        if status == 429:
            return "hub", "the Hugging Face hub is rate-limiting this address (429): retry later"
        return "hub", f"the Hugging Face hub answered HTTP {status}: retry later"
    if isinstance(exc, _transport_errors()):
        return (
            "hub",
            f"cannot reach the Hugging Face hub at {hf_constants.ENDPOINT} "
            f"({type(exc).__name__}: {_short(exc, 120)}); {_download_hint(entry)}",
        )
    return "hub", f"asking the Hugging Face hub failed ({type(exc).__name__}: {_short(exc, 200)})"


def run_token(
    report: Report,
    entry: ModelEntry,
    token: Token,
    *,
    token_file: Path | None = None,
    timeout_s: float = DEFAULT_HUB_TIMEOUT_S,
) -> None:
    """``setup token``: is a token set, does the hub accept it, may it read the model?"""
    repo_id = entry.serving.repo_id if entry.serving.engine != "loadtest" else None
    if token.value is None:
        detail = (
            "not set: create a read token at "
            f"{TOKENS_PAGE}, then `export HF_TOKEN=hf_...` (or put HF_TOKEN=... in .env, "
            "chmod 600), or pass --token-file FILE"
        )
        if repo_id is None:
            report.warn("token", detail)
            report.ok(
                "model", f"{entry.model_name} loads from {_source_for(entry)}: no token needed"
            )
            return
        report.fail(
            "token",
            f"{detail}; then accept the model's terms at "
            f"https://huggingface.co/{repo_id} with the same account",
        )
        return
    report.secrets.append(token.value)
    report.ok("token", f"set (from {token.origin})")
    if token_file is not None:
        _token_file_permissions(report, token_file)
    if _hub_offline():
        what, detail = explain_hub_error(
            OfflineModeIsEnabled("HF_HUB_OFFLINE"), entry=entry, repo_id=repo_id, account=None
        )
        report.fail(what, detail)
        return

    api = HfApi()
    value = token.value
    try:
        info = _with_deadline(lambda: api.whoami(token=value), timeout_s)
    except Exception as exc:
        what, detail = explain_hub_error(exc, entry=entry, repo_id=repo_id, account=None)
        report.fail(what, detail)
        return
    account = str(info.get("name") or "?")
    role = info.get("auth", {}).get("accessToken", {}).get("role")
    report.ok("account", f"{account}" + (f" (token kind: {role})" if role else ""))
    if repo_id is None:
        report.ok("model", f"{entry.model_name} loads from {_source_for(entry)}: no token needed")
        return
    try:
        _with_deadline(lambda: api.auth_check(repo_id, token=value), timeout_s)
        if entry.serving.revision:
            rev = entry.serving.revision
            _with_deadline(
                lambda: api.model_info(repo_id, revision=rev, token=value, timeout=timeout_s),
                timeout_s + 1,
            )
    except Exception as exc:
        what, detail = explain_hub_error(exc, entry=entry, repo_id=repo_id, account=account)
        report.fail(what, detail)
        return
    report.ok(
        "access",
        f"{account} may download {repo_id}"
        + (f" (revision {entry.serving.revision})" if entry.serving.revision else ""),
    )


def _source_for(entry: ModelEntry) -> str:
    s = entry.serving
    if s.engine == "loadtest":
        return "nowhere (load-test engine)"
    if s.path is not None:
        return f"the local path {s.path}"
    if s.package_file is not None:
        return f"the Python package {s.package_file.package}"
    return f"the hub repo {s.repo_id}"


# --- download --------------------------------------------------------------------------------


def _existing_parent(path: Path) -> Path:
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run_download(
    report: Report,
    entry: ModelEntry,
    registry: Registry,
    token: Token,
    *,
    cache_dir: Path | None = None,
    revision: str | None = None,
) -> None:
    """``setup download``: fetch a hub entry's weights into the cache, as a worker would."""
    s = entry.serving
    if s.engine == "loadtest":
        report.ok("download", f"nothing to download: {entry.model_name} uses the load-test engine")
        return
    if s.repo_id is None:
        _nothing_to_download(report, entry, registry)
        return
    repo_id = s.repo_id
    rev = revision or s.revision
    if revision and revision != (s.revision or "main"):
        report.warn(
            "revision",
            f"downloading revision {revision}, but models.json asks for {s.revision or 'main'}: "
            f'set "revision": "{revision}" in the serving block of {entry.model_name} too',
        )
    if token.value is not None:
        report.secrets.append(token.value)
        report.ok("token", f"set (from {token.origin})")
    else:
        report.warn("token", f"not set: gated models such as {repo_id} need one (see setup token)")
    cache = _hub_cache(cache_dir)
    facts = KNOWN_REPOS.get(repo_id)
    if facts is not None:
        free = shutil.disk_usage(_existing_parent(cache)).free
        if free < facts.download_bytes:
            report.warn(
                "disk",
                f"{human_bytes(free)} free at {cache}, the download is about "
                f"{human_bytes(facts.download_bytes)} (less if part of it is cached): free space "
                "or pass --cache-dir on a bigger disk",
            )
    report.note(f"fetching {repo_id} (revision {rev or 'main'}) into {cache} ...")
    started = time.perf_counter()
    try:
        folder = _download_snapshot(repo_id, rev, token.value, cache_dir)
    except ModelLoadError as exc:
        detail = exc.message
        if exc.code == "hub_unreachable":  # the loader's own advice is about workers
            detail = detail.split("; ")[0] + "; "
            if _hub_offline():
                detail += "unset HF_HUB_OFFLINE if this machine has network; otherwise "
            detail += _download_hint(entry)
        report.fail("download", f"[{exc.code}] {detail}")
        return
    seconds = time.perf_counter() - started
    report.ok(
        "download",
        f"{repo_id} is in the cache: {folder} ({human_bytes(_folder_bytes(folder))}, "
        f"{seconds:.0f} s)",
    )
    if cache_dir is not None:
        report.note(
            f"workers read the default cache ({hf_constants.HF_HUB_CACHE}); point them at this "
            f"one with HF_HUB_CACHE={cache}"
        )
    report.note("set HF_HUB_OFFLINE=1 on workers that must never contact the hub")


def _nothing_to_download(report: Report, entry: ModelEntry, registry: Registry) -> None:
    s = entry.serving
    if s.path is not None:
        where = registry.resolve_path(s.path)
        if where.exists():
            report.ok(
                "download", f"nothing to download: {entry.model_name}'s weights are at {where}"
            )
        else:
            report.fail(
                "download",
                f"nothing to download from the hub: {entry.model_name}'s weights come from "
                f"{where} (serving.path), which does not exist: copy the model there (or use "
                "--from-dir DIR) or fix the path",
            )
        return
    assert s.package_file is not None
    try:
        found = _package_file(s.package_file.package, s.package_file.file)
    except ModelLoadError as exc:
        report.fail("download", f"nothing to download from the hub, but {exc.message}")
        return
    report.ok(
        "download",
        f"nothing to download: {entry.model_name}'s weights ship in the Python package "
        f"{s.package_file.package}: {found}",
    )


def find_checkpoint(src: Path) -> Path:
    """The model folder in ``src``: ``src`` itself, or the snapshot of a ``models--*`` folder.

    Raises :class:`SetupError` saying what is wrong.
    """
    src = src.expanduser()
    if not src.is_dir():
        raise SetupError(f"{src} is not a folder: give the folder that holds config.json")
    if (src / "config.json").is_file():
        return src
    snapshots = src / "snapshots"
    if src.name.startswith("models--") and snapshots.is_dir():
        ref = src / "refs" / "main"
        if ref.is_file() and (snapshots / ref.read_text().strip() / "config.json").is_file():
            return snapshots / ref.read_text().strip()
        candidates = [p for p in snapshots.iterdir() if (p / "config.json").is_file()]
        if len(candidates) == 1:
            return candidates[0]
    if any(p.name.startswith("models--") for p in src.iterdir()):
        raise SetupError(
            f"{src} is a Hugging Face cache folder, not a model folder: use it where it is with "
            f"HF_HUB_CACHE={src} and HF_HUB_OFFLINE=1 on the worker, or give one model's snapshot "
            f"folder ({src}/models--ORG--NAME/snapshots/COMMIT)"
        )
    raise SetupError(
        f"{src} has no config.json: give a folder saved with save_pretrained, or a Hugging Face "
        "snapshot folder (config.json, tokenizer files and *.safetensors)"
    )


def _checkpoint_files(folder: Path) -> list[Path]:
    """Files a worker needs (HUB_ALLOW_PATTERNS, as a hub download), relative to ``folder``."""
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if any(fnmatch.fnmatch(rel.as_posix(), pattern) for pattern in HUB_ALLOW_PATTERNS):
            files.append(rel)
    return files


def validate_checkpoint(folder: Path) -> tuple[list[Path], str]:
    """Check that ``folder`` is a complete safetensors checkpoint; return its files and a summary.

    Raises :class:`SetupError` naming what is missing or broken.
    """
    from safetensors import safe_open

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SetupError(f"{folder}/config.json cannot be read as JSON ({exc})") from None
    files = _checkpoint_files(folder)
    weights = [f for f in files if f.suffix == ".safetensors"]
    if not weights:
        raise SetupError(
            f"{folder} has no *.safetensors weights: copy the complete model folder (only "
            "safetensors weights are used, not *.bin or *.gguf)"
        )
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise SetupError(f"{index} is not a valid safetensors index ({exc})") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise SetupError(
                f"{folder} lacks {len(missing)} weight file(s) its index lists, e.g. "
                f"{missing[0]}: the copy is incomplete, copy it again"
            )
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise SetupError(
            f"{folder} has no tokenizer (tokenizer.json or tokenizer.model): copy the complete "
            "model folder"
        )
    for w in weights:
        try:
            with safe_open(str(folder / w), framework="pt") as f:
                f.keys()
        except Exception as exc:
            raise SetupError(
                f"{folder / w} is not a readable safetensors file ({_short(exc, 120)}): the copy "
                "is damaged or incomplete, copy it again"
            ) from None
    size = sum((folder / f).stat().st_size for f in files)
    arch = ", ".join(config.get("architectures") or [str(config.get("model_type", "?"))])
    summary = f"{arch}, {len(weights)} safetensors file(s), {len(files)} files, {human_bytes(size)}"
    return files, summary


def run_from_dir(
    report: Report,
    entry: ModelEntry,
    src: Path,
    *,
    dest_root: Path | None = None,
    force: bool = False,
) -> Path | None:
    """``setup download --from-dir``: copy a model folder brought on a disk to ``dest_root``.

    Returns the destination folder, or None when a FAIL was reported.
    """
    try:
        folder = find_checkpoint(src)
        files, summary = validate_checkpoint(folder)
    except SetupError as exc:
        report.fail("source", str(exc))
        return None
    report.ok("source", f"{folder}: {summary}")
    root = (dest_root if dest_root is not None else DEFAULT_CACHE_ROOT / "models").expanduser()
    dest = root.absolute() / entry.model_name
    if dest.exists() and any(dest.iterdir()):
        if not force:
            report.fail(
                "destination",
                f"{dest} already exists: remove it, pass --force to replace it, or choose "
                "another --cache-dir",
            )
            return None
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        report.fail("destination", f"cannot create {root} ({exc.strerror or exc})")
        return None
    size = sum((folder / f).stat().st_size for f in files)
    free = shutil.disk_usage(root).free
    if free < size:
        report.fail(
            "disk",
            f"{human_bytes(free)} free at {root}, the model needs {human_bytes(size)}: free space "
            "or choose another --cache-dir",
        )
        return None
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.model_name}.tmp-", dir=root))
    try:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / rel, tmp / rel)  # follows the snapshot's symlinks
        if dest.exists():
            shutil.rmtree(dest)
        os.rename(tmp, dest)
    except OSError as exc:
        report.fail(
            "copy",
            f"copying to {dest} failed ({type(exc).__name__}: {exc.strerror or exc}): check free "
            "space and permissions",
        )
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.ok(
        "copy",
        f"{len(files)} files ({human_bytes(size)}) to {dest} "
        f"in {time.perf_counter() - started:.1f} s",
    )
    report.note(
        f'Use it: in models.json, in the "serving" block of {entry.model_name}, replace '
        f'"repo_id"/"package_file" with\n  "path": "{dest}"'
    )
    return dest


# --- check -----------------------------------------------------------------------------------


def count_parameters(config: Any) -> int:
    """Exact parameter count of the model ``config`` describes, built on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto: Any = (
        AutoModelForImageTextToText
        if getattr(config, "vision_config", None) is not None
        else AutoModelForCausalLM
    )
    with init_empty_weights():
        model = auto.from_config(config)
    model.tie_weights()  # init_empty_weights unties lm_head from the embeddings
    return int(sum(p.numel() for p in model.parameters()))


def parameters_of_folder(folder: Path) -> int:
    from transformers import AutoConfig

    return count_parameters(AutoConfig.from_pretrained(str(folder)))


def parameters_of_gguf(gguf: Path) -> int:
    from transformers import AutoConfig

    return count_parameters(AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name))


def bytes_per_parameter(quantization: str, dtype_bytes: int) -> float:
    return QUANT_BYTES_PER_PARAM.get(quantization, float(dtype_bytes))


def memory_need(parameters: int, bytes_per_param: float) -> tuple[float, float]:
    """``(weights, weights + OVERHEAD)`` in bytes."""
    weights = parameters * bytes_per_param
    return weights, weights * (1 + OVERHEAD)


def _available_ram() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _version_of(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@dataclass
class _Weights:
    """Where an entry's weights are on this machine, if they are."""

    folder: Path | None = None  # a model folder with config.json
    gguf: Path | None = None  # a .gguf file (converted at first load)
    present: bool = False


@contextlib.contextmanager
def _offline_hub() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the block: load only what is on disk (worker.loader reads it live)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def run_check(
    report: Report,
    entry: ModelEntry,
    registry: Registry,
    *,
    device: str = "auto",
    smoke: bool | None = None,
    cache_dir: Path | None = None,
    cpu_quantization: Literal["none", "registry"] = "none",
    smoke_tokens: int = 32,
) -> None:
    """``setup check``: can this machine run ``entry``? ``smoke=None``: smoke test when possible."""
    import torch

    s = entry.serving
    report.ok(
        "registry", f"{entry.model_name} in {registry.source}: {_entry_source(entry, registry)}"
    )
    report.ok("python", f"{platform.python_version()} ({sys.executable})")
    cuda_build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    report.ok("torch", f"{torch.__version__} ({cuda_build})")
    for dist, what in (("transformers", "transformers"), ("huggingface-hub", "huggingface_hub")):
        v = _version_of(dist)
        if v is None:
            report.fail(what, "not installed: `pip install -e '.[worker]'`")
        else:
            report.ok(what, v)
    if s.engine == "loadtest":
        report.ok("model", f"{entry.model_name} uses the load-test engine: no weights, no GPU")
        return

    # -- device --
    try:
        dev = resolve_device(device)
    except ModelLoadError as exc:
        prefix = "no CUDA GPU: " if "CUDA is not available" in exc.message else ""
        report.fail("device", prefix + exc.message)
        dev = None
    if dev is not None and dev.startswith("cuda"):
        idx = torch.device(dev).index or 0
        props = torch.cuda.get_device_properties(idx)
        report.ok(
            "gpu",
            f"{props.name} ({dev}, compute {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB; {torch.cuda.device_count()} GPU(s) visible)",
        )
        wants_bf16 = s.dtype in ("bfloat16", "auto") or s.quantization == "4bit"
        if wants_bf16 and not torch.cuda.is_bf16_supported():
            report.warn(
                "bfloat16",
                f"{props.name} has no bfloat16 support: set serving.dtype to 'float16'",
            )
    elif dev == "cpu":
        if device == "auto":
            report.warn(
                "device",
                "no CUDA GPU seen (torch "
                f"{torch.__version__}, {cuda_build}): the worker will run on the CPU, many "
                "times slower than on a GPU",
            )
        else:
            report.ok("device", "cpu (as asked)")

    # -- quantization --
    on_cpu = dev is None or dev == "cpu"
    quantization = s.quantization
    if on_cpu and cpu_quantization == "none":
        quantization = "none"
    bnb = _version_of("bitsandbytes")
    if quantization != "none":
        if bnb is None or importlib.util.find_spec("bitsandbytes") is None:
            report.fail(
                "bitsandbytes",
                f"{quantization} quantization needs bitsandbytes, which is not installed: "
                f"`pip install bitsandbytes`, or set serving.quantization to 'none'",
            )
        else:
            try:
                importlib.import_module("bitsandbytes")
                report.ok("bitsandbytes", f"{bnb} (needed for {quantization})")
            except Exception as exc:
                report.fail(
                    "bitsandbytes",
                    f"{bnb} is installed but fails to import ({type(exc).__name__}: "
                    f"{_short(exc, 150)}): reinstall it for this torch/CUDA",
                )
    else:
        why = (
            f"models.json asks for {s.quantization}, but on CPU the worker loads full "
            "precision (WORKER_CPU_QUANTIZATION=none)"
            if s.quantization != "none"
            else "quantization none"
        )
        report.ok("bitsandbytes", f"not needed: {why}" + (f"; {bnb} installed" if bnb else ""))

    # -- weights --
    weights = _find_weights(report, entry, registry, cache_dir)

    # -- parameters and memory --
    params = _parameters(report, entry, weights)
    dtype_bytes = _torch_dtype(s.dtype, dev or "cpu").itemsize
    memory_ok: bool | None = None  # None: not checked
    if params is not None:
        bpp = bytes_per_parameter(quantization, dtype_bytes)
        weights_bytes, need = memory_need(params, bpp)
        label = (
            quantization
            if quantization != "none"
            else str(_torch_dtype(s.dtype, dev or "cpu")).removeprefix("torch.")
        )
        report.ok(
            "memory estimate",
            f"{params:,} parameters x {bpp:g} bytes ({label}) = "
            f"{human_bytes(weights_bytes)} + {OVERHEAD:.0%} = {human_bytes(need)}",
        )
        if dev is not None:
            memory_ok = _memory(report, dev, weights_bytes, need, quantization)

    # -- disk --
    _disk(report, entry, weights, params, cache_dir)

    # -- token (only when a download is still to come) --
    if s.repo_id is not None and not weights.present:
        if hf_token_from_env() is None and not get_token():
            report.warn(
                "token",
                "HF_TOKEN is not set and the weights are not here: the worker cannot download "
                f"{s.repo_id} (see `medgemma setup token`)",
            )
        else:
            report.ok("token", "set (not checked against the hub here: `medgemma setup token`)")

    # -- smoke --
    if smoke is False:
        return
    explicit = smoke is True
    blockers = []
    if dev is None:
        blockers.append("the device is not available")
    if not weights.present:
        blockers.append("the weights are not on this machine")
    if memory_ok is False:
        blockers.append("there is not enough memory")
    if blockers:
        msg = f"skipped: {' and '.join(blockers)}"
        if explicit:
            report.fail("smoke", msg)
        else:
            report.warn("smoke", msg)
        return
    assert dev is not None
    _smoke(report, entry, registry, dev, cpu_quantization, cache_dir, smoke_tokens)


def _find_weights(
    report: Report, entry: ModelEntry, registry: Registry, cache_dir: Path | None
) -> _Weights:
    s = entry.serving
    if s.repo_id is not None:
        cache = _hub_cache(cache_dir)
        try:
            folder = snapshot_download(
                repo_id=s.repo_id,
                revision=s.revision,
                cache_dir=str(cache_dir) if cache_dir is not None else None,
                allow_patterns=HUB_ALLOW_PATTERNS,
                local_files_only=True,
            )
        except IncompleteSnapshotError:
            report.warn(
                "weights",
                f"the cached copy of {s.repo_id} in {cache} is incomplete (an interrupted "
                "download?): complete it with "
                f"`medgemma setup download --model {entry.model_name}`",
            )
            return _Weights()
        except (LocalEntryNotFoundError, OSError, ValueError) as exc:
            detail = f"{s.repo_id} (revision {s.revision or 'main'}) is not in the cache at {cache}"
            if not isinstance(exc, LocalEntryNotFoundError):
                detail += f" ({type(exc).__name__}: {_short(exc, 120)})"
            report.warn(
                "weights",
                f"{detail}: the worker downloads it at its first start (needs network and "
                f"HF_TOKEN), or run `medgemma setup download --model {entry.model_name}` now",
            )
            return _Weights()
        report.ok("weights", f"in the cache: {folder}")
        return _Weights(folder=Path(folder), present=True)
    if s.path is not None:
        where = registry.resolve_path(s.path)
        if where.is_file() and where.suffix.lower() == ".gguf":
            report.ok("weights", f"GGUF file {where} ({human_bytes(where.stat().st_size)})")
            return _Weights(gguf=where, present=True)
        if where.is_dir():
            try:
                _, summary = validate_checkpoint(where)
            except SetupError as exc:
                report.fail("weights", str(exc))
                return _Weights(folder=where if (where / "config.json").is_file() else None)
            report.ok("weights", f"{where}: {summary}")
            return _Weights(folder=where, present=True)
        report.fail(
            "weights",
            f"the model path {where} does not exist (serving.path; relative to "
            f"{registry.source}): copy the model there, e.g. with `medgemma setup download "
            f"--model {entry.model_name} --from-dir DIR`, or fix the path",
        )
        return _Weights()
    assert s.package_file is not None
    try:
        found = _package_file(s.package_file.package, s.package_file.file)
    except ModelLoadError as exc:
        report.fail("weights", exc.message)
        return _Weights()
    report.ok("weights", f"{found} ({human_bytes(found.stat().st_size)})")
    return _Weights(gguf=found, present=True)


def _parameters(report: Report, entry: ModelEntry, weights: _Weights) -> int | None:
    s = entry.serving
    facts = KNOWN_REPOS.get(s.repo_id or "")
    if facts is not None:
        return facts.parameters
    try:
        if weights.folder is not None:
            return parameters_of_folder(weights.folder)
        if weights.gguf is not None:
            return parameters_of_gguf(weights.gguf)
    except Exception as exc:
        report.warn(
            "memory estimate",
            f"cannot count the parameters from the config ({type(exc).__name__}: "
            f"{_short(exc, 150)}): memory not checked",
        )
        return None
    report.warn(
        "memory estimate",
        "unknown model size (not a known repo and its config is not on this machine): memory "
        "not checked",
    )
    return None


def _memory(report: Report, dev: str, weights: float, need: float, quantization: str) -> bool:
    """Report free GPU memory (or RAM on CPU) against the estimate; False when it cannot fit."""
    import torch

    if dev.startswith("cuda"):
        free, total = torch.cuda.mem_get_info(torch.device(dev))
        what, where = "gpu memory", f"{dev}"
        smaller = (
            "set serving.quantization to '4bit'" if quantization != "4bit" else "use a bigger GPU"
        )
        advice = f"free the GPU of other processes, or {smaller}"
        have = f"{human_bytes(free)} free of {human_bytes(total)} on {where}"
    else:
        ram = _available_ram()
        if ram is None:
            report.warn("ram", "cannot read the available memory of this machine: not checked")
            return True
        free = ram
        what = "ram"
        have = f"{human_bytes(free)} available"
        advice = "close other programs, or use a machine with more memory or a GPU"
    if free >= need:
        report.ok(what, f"{have}, needs about {human_bytes(need)}")
        return True
    if free >= weights:
        report.warn(
            what,
            f"{have}: enough for the weights ({human_bytes(weights)}) but little is left for "
            f"activations and the KV cache (about {human_bytes(need)} in all): {advice}",
        )
        return True
    report.fail(what, f"{have}, needs about {human_bytes(need)}: {advice}")
    return False


def _disk(
    report: Report,
    entry: ModelEntry,
    weights: _Weights,
    params: int | None,
    cache_dir: Path | None,
) -> None:
    s = entry.serving
    if s.repo_id is not None:
        cache = _hub_cache(cache_dir)
        free = shutil.disk_usage(_existing_parent(cache)).free
        if weights.present:
            report.ok("disk", f"weights already cached; {human_bytes(free)} free at {cache}")
            return
        facts = KNOWN_REPOS.get(s.repo_id)
        size = facts.download_bytes if facts else (params * 2 if params else None)
        if size is None:
            report.warn("disk", f"{human_bytes(free)} free at {cache}; download size unknown")
        elif free >= size * 1.05:
            report.ok("disk", f"{human_bytes(free)} free at {cache}, download ~{human_bytes(size)}")
        else:
            report.fail(
                "disk",
                f"{human_bytes(free)} free at {cache}, the download needs ~{human_bytes(size)}: "
                "free space, or put the cache on a bigger disk (HF_HOME)",
            )
        return
    if weights.gguf is not None:
        folder = gguf_cache_folder(weights.gguf, cache_dir)
        if (folder / GGUF_MARKER).is_file():
            report.ok("disk", f"the GGUF file is already converted: {folder}")
            return
        free = shutil.disk_usage(_existing_parent(folder)).free
        need = params * 4 if params else None
        if need is None or free >= need * 1.05:
            report.ok(
                "disk",
                f"{human_bytes(free)} free at {folder.parent} for the one-time GGUF conversion"
                + (f" (~{human_bytes(need)})" if need else ""),
            )
        else:
            report.fail(
                "disk",
                f"{human_bytes(free)} free at {folder.parent}, the one-time GGUF conversion "
                f"writes ~{human_bytes(need)}: free space",
            )


def _smoke(
    report: Report,
    entry: ModelEntry,
    registry: Registry,
    dev: str,
    cpu_quantization: Literal["none", "registry"],
    cache_dir: Path | None,
    max_new_tokens: int,
) -> None:
    import torch

    from shared.protocol import ChatMessage, SamplingParams, TextPart
    from worker.engines.factory import EngineOptions, build_engine

    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(dev))
    try:
        with _offline_hub():
            loaded = load_model(
                entry, registry, device=dev, cpu_quantization=cpu_quantization, cache_dir=cache_dir
            )
    except ModelLoadError as exc:
        report.fail("load", f"[{exc.code}] {exc.message}")
        return
    except Exception as exc:
        report.fail("load", f"loading failed ({type(exc).__name__}: {_short(exc, 200)})")
        return
    report.ok(
        "load",
        f"{type(loaded.model).__name__} on {loaded.device} (quantization {loaded.quantization}, "
        f"{loaded.dtype}) in {loaded.load_seconds:.1f} s",
    )
    messages = []
    if entry.serving.default_system_message:
        messages.append(
            ChatMessage(
                role="system", content=[TextPart(text=entry.serving.default_system_message)]
            )
        )
    messages.append(ChatMessage(role="user", content=[TextPart(text=SMOKE_PROMPT)]))
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens)
    engine = None
    try:
        # Eager decoding: this check is about the weights and the device, not about speed,
        # and compiling would take longer than the answer.
        engine = build_engine(
            loaded,
            context_length=entry.serving.context_length,
            options=EngineOptions(concurrency=1, compile=False),
        )
        # The first generation pays one-time CUDA/kernel set-up: keep it out of the rate.
        started = time.perf_counter()
        engine.generate(
            messages, SamplingParams(temperature=0.0, max_new_tokens=2), on_text=lambda _t: None
        )
        warmup = time.perf_counter() - started
        started = time.perf_counter()
        result = engine.generate(messages, sampling, on_text=lambda _t: None)
        seconds = time.perf_counter() - started
    except Exception as exc:
        report.fail("smoke", f"generation failed ({type(exc).__name__}: {_short(exc, 200)})")
        return
    finally:
        peak = torch.cuda.max_memory_allocated(torch.device(dev)) if dev.startswith("cuda") else 0
        if engine is not None:
            engine.close()
        del loaded, engine
        gc.collect()
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
    if result.completion_tokens == 0:
        report.fail("smoke", "the model generated no token: check the checkpoint and its config")
        return
    rate = result.completion_tokens / seconds if seconds > 0 else float("inf")
    first = f", first token {result.first_token_s:.2f} s" if result.first_token_s else ""
    answer = " ".join(result.text.split())
    answer = answer if len(answer) <= 80 else answer[:77] + "..."
    peak_text = f", peak GPU memory {human_bytes(peak)}" if peak else ""
    report.ok(
        "smoke",
        f"{result.completion_tokens} tokens in {seconds:.2f} s = {rate:.1f} tokens/s"
        f"{first} (after a {warmup:.1f} s warm-up){peak_text}; answer: {answer!r}",
    )
    if not answer:
        report.warn(
            "answer",
            f"the {result.completion_tokens} tokens decode to no text: check that the "
            "tokenizer files belong to this model",
        )
