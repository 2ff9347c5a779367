"""``medgemma setup download``: fetch a hub entry's weights into the cache as a worker would
(the loader's own :func:`~worker.weights.hub.download_snapshot`: same ``HUB_ALLOW_PATTERNS``,
same error messages), or, with ``--from-dir``, copy and check a model folder brought on a disk.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from huggingface_hub import constants as hf_constants

from shared.registry import ModelEntry, Registry
from worker.setup.credentials import Token
from worker.setup.machine import KNOWN_REPOS, existing_parent, hub_cache
from worker.setup.report import Report, SetupError, human_bytes
from worker.weights.errors import ModelLoadError, short
from worker.weights.hub import HUB_ALLOW_PATTERNS, download_snapshot, hub_offline
from worker.weights.sources import DEFAULT_CACHE_ROOT, package_file


def entry_source(entry: ModelEntry, registry: Registry | None = None) -> str:
    """Where an entry's weights come from, in words (a local path resolved by ``registry``)."""
    s = entry.serving
    if s.engine == "loadtest":
        return "the load-test engine (no weights)"
    if s.repo_id is not None:
        return f"hub repo {s.repo_id} (revision {s.revision or 'main'})"
    if s.path is not None:
        return f"local path {registry.resolve_path(s.path) if registry else s.path}"
    assert s.package_file is not None
    return f"file {s.package_file.file} of the Python package {s.package_file.package}"


def download_hint(entry: ModelEntry) -> str:
    return (
        f"downloads need network: run `medgemma setup download --model {entry.model_name}` on a "
        "machine that has it, then copy its Hugging Face cache (HF_HOME, default "
        "~/.cache/huggingface) to this machine, or bring the model folder on a disk and run "
        f"`medgemma setup download --model {entry.model_name} --from-dir DIR`"
    )


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
    cache = hub_cache(cache_dir)
    facts = KNOWN_REPOS.get(repo_id)
    if facts is not None:
        free = shutil.disk_usage(existing_parent(cache)).free
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
        folder = download_snapshot(repo_id, rev, token.value, cache_dir)
    except ModelLoadError as exc:
        detail = exc.message
        if exc.code == "hub_unreachable":  # the loader's own advice is about workers
            detail = detail.split("; ")[0] + "; "
            if hub_offline():
                detail += "unset HF_HUB_OFFLINE if this machine has network; otherwise "
            detail += download_hint(entry)
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
        found = package_file(s.package_file.package, s.package_file.file)
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
                f"{folder / w} is not a readable safetensors file ({short(exc, 120)}): the copy "
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
