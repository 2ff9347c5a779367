"""The models.json entries the bench serves: the demo model, the load-test engine (no model),
or a model folder, written to a registry of the run's own; or a model of ``--models-file``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from shared.registry import Registry, load_registry

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = "smollm2-demo"
LOCAL_MODEL = "bench-local"
LOADTEST = "loadtest"  # --spawn-stack / --engine-baseline value
LOADTEST_MODEL = "bench-loadtest"


def _entry(name: str, alias: str, description: str, serving: dict[str, Any]) -> dict[str, Any]:
    """A text-only /medgemma registry entry with every control on."""
    return {
        "model_name": name,
        "model_alias": alias,
        "description": description,
        "endpoint": "/medgemma",
        "capabilities": {"stream": True, "image": False, "inference": True},
        "controls": {
            "temperature": True,
            "reason": False,
            "verbosity": True,
            "system_message": True,
        },
        "serving": serving,
    }


def local_entry(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """A registry entry serving the model folder (or .gguf file) at ``path``."""
    serving = {
        "path": str(path.resolve()),
        "quantization": "none",
        "dtype": args.dtype,
        "context_length": args.context_length,
        "max_new_tokens": args.max_tokens or 256,
    }
    return _entry(LOCAL_MODEL, "Benchmark model", f"bench/serve.py: {path.name}", serving)


def loadtest_entry(args: argparse.Namespace) -> dict[str, Any]:
    """An entry on the load-test engine: no model, ``--loadtest-tokens-per-s`` per stream."""
    serving = {
        "engine": "loadtest",
        "loadtest_tokens_per_s": args.loadtest_tokens_per_s,
        "loadtest_first_token_s": args.loadtest_first_token_ms / 1000.0,
        "context_length": args.context_length,
        "max_new_tokens": args.max_tokens or 64,
        "max_queue": 100_000,
    }
    description = "bench/serve.py: the load-test engine, fixed-rate tokens"
    return _entry(LOADTEST_MODEL, "Load test (no model)", description, serving)


def resolve_model(value: str, args: argparse.Namespace, workdir: Path) -> tuple[Registry, str]:
    """A registry and the entry name for ``value``: ``demo``, ``loadtest``, a model folder,
    or a name.

    ``demo``, ``loadtest`` and a folder are written to ``workdir/models.json`` (with
    ``--max-tokens`` as the entry's ``max_new_tokens``); a name is looked up in ``--models-file``.
    """
    dest = workdir / "models.json"
    if value == LOADTEST:
        raw = loadtest_entry(args)
        name = LOADTEST_MODEL
    elif value == "demo":
        repo = json.loads((ROOT / "models.json").read_text(encoding="utf-8"))
        raw = next(m for m in repo if m["model_name"] == DEMO_MODEL)
        if args.max_tokens:
            raw["serving"]["max_new_tokens"] = args.max_tokens
        name = DEMO_MODEL
    elif Path(value).exists():
        raw = local_entry(Path(value), args)
        name = LOCAL_MODEL
    else:
        registry = load_registry(Path(args.models_file))
        if registry.get(value) is None:
            raise SystemExit(f"{value!r} is neither a path nor a model in {args.models_file}")
        return registry, value
    workdir.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps([raw], indent=2), encoding="utf-8")
    return load_registry(dest), name
