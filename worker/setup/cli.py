"""``medgemma setup token|download|check``: get a worker machine ready, one step at a time.

Replaces the seed's ``setup_hf_token.py`` and ``setup_medgemma.py``. Runs as the ``medgemma``
console script or as ``python -m worker.setup.cli``. Every check prints one line
``OK|WARN|FAIL  <what>  <detail>``; the exit status is 0 when nothing failed, 1 when something
did (the line says what to do), 2 for a usage error. The Hugging Face token is never printed.
The steps live in :mod:`worker.setup.token`, :mod:`worker.setup.download` and
:mod:`worker.setup.check`; they report through :class:`~worker.setup.report.Report`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from shared.registry import ModelEntry, Registry, RegistryError, load_registry
from worker.settings import WorkerSettings
from worker.setup.report import Check, Report, SetupError

if TYPE_CHECKING:
    from worker.setup.credentials import Token

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2

_EPILOG = """\
steps, in order:
  medgemma setup token                  is HF_TOKEN set, valid, and allowed to read the model?
  medgemma setup download               fetch the weights into the Hugging Face cache
  medgemma setup check                  can this machine run the model? (loads it, one answer)

air-gapped machines: download on a machine with network, then either copy its cache folder
(HF_HOME, default ~/.cache/huggingface) and set HF_HUB_OFFLINE=1, or copy the model folder and
run `medgemma setup download --from-dir DIR`.
in Docker: docker compose run --rm worker medgemma setup check

exit status: 0 nothing failed, 1 a FAIL line says what to do, 2 usage error.
"""


def _print_line(line: object) -> None:
    if isinstance(line, Check):
        print(f"{line.status:<4}  {line.what:<15}  {line.detail}", flush=True)
    else:
        print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medgemma",
        description="Set up a MedGemma worker machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    setup = commands.add_parser(
        "setup",
        help="check the token, download the weights, check the machine",
        description="Set up a worker machine: token, download, check.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_EPILOG,
    )
    steps = setup.add_subparsers(dest="step", required=True, metavar="STEP")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--model",
        metavar="NAME",
        help="the models.json entry (default: WORKER_MODEL, else medgemma-4b)",
    )
    common.add_argument(
        "--models-file",
        type=Path,
        metavar="FILE",
        help="the model registry (default: MODELS_FILE, else the repository's models.json)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", help="also show the libraries' log messages"
    )
    token_opt = argparse.ArgumentParser(add_help=False)
    token_opt.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="read the token from FILE instead of HF_TOKEN / HUGGINGFACE_TOKEN",
    )

    token = steps.add_parser(
        "token",
        parents=[common, token_opt],
        help="check the Hugging Face token and its access to the model",
        description="Check the Hugging Face token (HF_TOKEN or HUGGINGFACE_TOKEN, or "
        "--token-file): the hub accepts it, and its account may download the model (MedGemma "
        "is gated: its terms must be accepted on the model's page). The token is never printed.",
    )
    token.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds to wait for each answer of the hub (default 20)",
    )

    download = steps.add_parser(
        "download",
        parents=[common, token_opt],
        help="download the model's weights (or copy them from a folder)",
        description="Download a models.json entry's weights from the Hugging Face hub into "
        "the cache the workers read, or, with --from-dir, copy a model folder brought on a "
        "disk (air-gapped machines) and print the path to put in models.json.",
    )
    download.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="Hugging Face cache to download into (default: HF_HUB_CACHE / HF_HOME); with "
        "--from-dir, the folder to copy the model into (default ~/.cache/medgemma-serve/models)",
    )
    download.add_argument(
        "--revision", metavar="REV", help="branch, tag or commit (default: models.json's)"
    )
    download.add_argument(
        "--from-dir",
        type=Path,
        metavar="DIR",
        help="copy this model folder (config.json, tokenizer, *.safetensors) instead of "
        "downloading",
    )
    download.add_argument(
        "--force", action="store_true", help="with --from-dir: replace an existing copy"
    )

    check = steps.add_parser(
        "check",
        parents=[common],
        help="check this machine: versions, GPU, memory, disk, weights, one generation",
        description="Check that this machine can run the model as a worker: versions, CUDA "
        "and the GPU, free GPU memory (or RAM) against the model's need at its quantization, "
        "free disk, bitsandbytes, the weights; then load the model and generate one short "
        "answer (--smoke, on by default when the weights are here).",
    )
    check.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        help="the device to check (default: WORKER_DEVICE, else auto)",
    )
    check.add_argument(
        "--smoke",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the model and generate one answer (default: when the weights are here)",
    )
    check.add_argument(
        "--smoke-tokens",
        type=int,
        default=32,
        metavar="N",
        help="answer length of the smoke test (default 32)",
    )
    check.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="Hugging Face cache to look in (default: HF_HUB_CACHE / HF_HOME)",
    )
    return parser


def _usage(message: str) -> int:
    print(f"medgemma: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _entry(args: argparse.Namespace, settings: WorkerSettings) -> tuple[ModelEntry, Registry]:
    models_file: Path = args.models_file or settings.models_file
    registry = load_registry(models_file)
    name: str = args.model or settings.worker_model
    entry = registry.get(name)
    if entry is None:
        names = ", ".join(m.model_name for m in registry.models)
        raise RegistryError(f"model {name!r} is not in {registry.source} (known: {names})")
    return entry, registry


def _token(report: Report, token_file: Path | None) -> Token:
    from worker.setup.credentials import resolve_token

    token = resolve_token(token_file)
    if token.value is not None:
        report.secrets.append(token.value)  # blanked out of every line from here on
    return token


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): return, do not exit
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.step == "check" and args.smoke_tokens < 1:
        return _usage("--smoke-tokens must be at least 1")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = WorkerSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]).upper()
        return _usage(f"invalid worker setting {field}: {first['msg']}")
    try:
        entry, registry = _entry(args, settings)
    except RegistryError as exc:
        return _usage(str(exc))

    # Imported here: torch and huggingface_hub take a second or two, --help should not wait.
    from worker.setup.check import run_check
    from worker.setup.download import run_download, run_from_dir
    from worker.setup.token import run_token

    report = Report(sink=_print_line)
    try:
        if args.step == "token":
            token = _token(report, args.token_file)
            run_token(report, entry, token, token_file=args.token_file, timeout_s=args.timeout)
        elif args.step == "download":
            if args.from_dir is not None:
                run_from_dir(
                    report, entry, args.from_dir, dest_root=args.cache_dir, force=args.force
                )
            else:
                token = _token(report, args.token_file)
                run_download(
                    report,
                    entry,
                    registry,
                    token,
                    cache_dir=args.cache_dir,
                    revision=args.revision,
                )
        else:
            run_check(
                report,
                entry,
                registry,
                device=args.device or settings.worker_device,
                smoke=args.smoke,
                cache_dir=args.cache_dir,
                cpu_quantization=settings.worker_cpu_quantization,
                smoke_tokens=args.smoke_tokens,
            )
    except SetupError as exc:
        report.fail("setup", str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug here must still end in one clear line, not a traceback
        report.fail(
            "internal",
            f"unexpected {type(exc).__name__}: {' '.join(str(exc).split())[:300]} "
            "(please report it, with the lines above)",
        )
    return EXIT_PROBLEM if report.failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
