"""``medgemma setup token``: is a token set, does the hub accept it, may it read the model?

The hub's answers are explained by the table of :mod:`worker.weights.hub_errors`, which the
loader uses too. ``whoami``/``auth_check`` run with a deadline
(:func:`worker.weights.hub.with_deadline`): huggingface_hub's client has none for them.
"""

from __future__ import annotations

import stat
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.errors import OfflineModeIsEnabled

from shared.registry import ModelEntry
from worker.setup.credentials import Token
from worker.setup.download import download_hint, entry_source
from worker.setup.report import Report
from worker.weights.hub import hub_offline, with_deadline
from worker.weights.hub_errors import TOKENS_PAGE, HubCall, explain

DEFAULT_HUB_TIMEOUT_S = 20.0


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


def explain_hub_error(
    exc: BaseException, *, entry: ModelEntry, repo_id: str | None, account: str | None
) -> tuple[str, str]:
    """``(what, detail)`` for a failed ``whoami``/``auth_check``/``model_info``, by type."""
    call = HubCall(repo_id, account=account, elsewhere=download_hint(entry))
    return explain(exc, call)


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
                "model", f"{entry.model_name} loads from {entry_source(entry)}: no token needed"
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
    if hub_offline():
        what, detail = explain_hub_error(
            OfflineModeIsEnabled("HF_HUB_OFFLINE"), entry=entry, repo_id=repo_id, account=None
        )
        report.fail(what, detail)
        return

    api = HfApi()
    value = token.value
    try:
        info = with_deadline(lambda: api.whoami(token=value), timeout_s)
    except Exception as exc:
        what, detail = explain_hub_error(exc, entry=entry, repo_id=repo_id, account=None)
        report.fail(what, detail)
        return
    account = str(info.get("name") or "?")
    role = info.get("auth", {}).get("accessToken", {}).get("role")
    report.ok("account", f"{account}" + (f" (token kind: {role})" if role else ""))
    if repo_id is None:
        report.ok("model", f"{entry.model_name} loads from {entry_source(entry)}: no token needed")
        return
    try:
        with_deadline(lambda: api.auth_check(repo_id, token=value), timeout_s)
        if entry.serving.revision:
            rev = entry.serving.revision
            with_deadline(
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
