"""The Hugging Face hub's errors and what to do about each: one table for the loader and the
setup checks.

A failure is matched by exception type (and HTTP status), in the table's order, never by its
text. Each row says it twice, for two readers:

* ``load``: the :class:`~worker.weights.errors.ModelLoadError` (code and message) a worker, or
  ``medgemma setup download``, raises when fetching the weights failed;
* ``check``: the ``medgemma setup`` line (what and detail) when asking the hub about the token
  or the model (``whoami``, ``auth_check``, ``model_info``) failed.

A row without a text for a reader is passed over for that reader: the next row that matches
explains the failure (the loader has no "network" row, so a dropped connection is explained
by the storage row, as ``OSError``; the setup checks have no storage row).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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

from worker.weights.errors import LoadErrorCode, ModelLoadError, short

TOKENS_PAGE = "https://huggingface.co/settings/tokens"
SET_TOKEN = "set HF_TOKEN (or HUGGINGFACE_TOKEN) to a read token"


class HubTimeout(Exception):
    """The hub did not answer in time (huggingface_hub's own calls may wait forever)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"no answer within {seconds:.0f} s")
        self.seconds = seconds


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


@dataclass(frozen=True)
class HubCall:
    """What was asked of the hub when it failed: the words of the explanations."""

    repo_id: str | None
    revision: str | None = None
    token_given: bool = True
    account: str | None = None  # the token's account, once the hub named it
    offline: bool = False  # HF_HUB_OFFLINE was set
    cache_dir: Path | None = None  # the hub cache asked for (None: the default one)
    elsewhere: str = ""  # (setup) how to get the weights onto a machine without network

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.repo_id}" if self.repo_id else "the model's page"

    @property
    def cache(self) -> Path:
        return self.cache_dir if self.cache_dir is not None else Path(hf_constants.HF_HUB_CACHE)

    @property
    def download(self) -> str:
        """The ``hf download`` command that fetches what was asked for."""
        command = f"`hf download {self.repo_id}"
        if self.revision:
            command += f" --revision {self.revision}"
        if self.cache_dir is not None:
            command += f" --cache-dir {self.cache_dir}"
        return command + "`"

    def revisions(self) -> str:
        return (
            "check serving.revision (branches, tags and commits are listed at "
            f"{self.page}/commits/main)"
        )


Explain = Callable[[BaseException, HubCall], str]


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


# --- what a worker (or `setup download`) is told when fetching the weights failed ------------


def _load_gated(exc: BaseException, c: HubCall) -> str:
    if not c.token_given:
        return (
            f"{c.repo_id} is a gated model and no Hugging Face token was given: {SET_TOKEN} "
            f"of an account that has accepted the model's terms at {c.page}"
        )
    return (
        f"{c.repo_id} is a gated model and the token's account has no access yet: open "
        f"{c.page}, sign in with the account that owns the token, accept the terms, then retry"
    )


def _load_repo(exc: BaseException, c: HubCall) -> str:
    hint = (
        f"if it is private, {SET_TOKEN} of an account that can read it"
        if not c.token_given
        else "if it is private, the token's account must be able to read it"
    )
    return f"{c.repo_id} was not found on the Hugging Face hub: check serving.repo_id; {hint}"


def _load_not_cached(exc: BaseException, c: HubCall) -> str:
    why = "HF_HUB_OFFLINE is set, so the hub was not contacted" if c.offline else "no network"
    return (
        f"cannot reach the Hugging Face hub ({why}) and {c.repo_id} is not in the cache at "
        f"{c.cache}; download it first with {c.download} where the hub is reachable, or set "
        "serving.path to a local copy of the model"
    )


def _load_http(exc: BaseException, c: HubCall) -> str:
    return (
        f"the Hugging Face hub answered HTTP {_status(exc)} for {c.repo_id} and it is not in "
        f"the cache at {c.cache}: retry later, or download it first with {c.download}"
    )


def _load_storage(exc: BaseException, c: HubCall) -> str:
    assert isinstance(exc, OSError)
    return (
        f"cannot store {c.repo_id} in the cache at {c.cache} ({type(exc).__name__}: "
        f"{exc.strerror or exc}): free disk space or fix the folder's permissions, or set "
        "cache_dir to a writable folder"
    )


# --- what `medgemma setup` says when asking the hub about the token or the model failed -------


def _check_gated(exc: BaseException, c: HubCall) -> str:
    who = f"the account {c.account!r}" if c.account else "the token's account"
    return (
        f"{c.repo_id} is a gated model and {who} has not accepted its terms yet: open {c.page}, "
        f"sign in as {c.account or 'the account that owns the token'}, accept the terms "
        "(access is usually granted at once), then run this again"
    )


def _check_unreachable(exc: BaseException, c: HubCall) -> str:
    return (
        f"cannot reach the Hugging Face hub at {hf_constants.ENDPOINT} "
        f"({type(exc).__name__}: {short(exc, 120)}); {c.elsewhere}"
    )


@dataclass(frozen=True)
class HubError:
    """One row of :data:`HUB_ERRORS`."""

    types: tuple[type[BaseException], ...]
    status: int | None = None  # only this HTTP status
    code: LoadErrorCode = "hub_unreachable"
    load: Explain | None = None
    what: str = "hub"
    check: Explain | None = None

    def matches(self, exc: BaseException) -> bool:
        return isinstance(exc, self.types) and (self.status is None or _status(exc) == self.status)


#: In order: the first row that matches the failure, and speaks to the reader, explains it.
HUB_ERRORS: tuple[HubError, ...] = (
    HubError(
        (OfflineModeIsEnabled,),
        load=_load_not_cached,
        check=lambda e, c: (
            "HF_HUB_OFFLINE is set, so the Hugging Face hub was not contacted: unset it to "
            f"check the token; {c.elsewhere}"
        ),
    ),
    HubError(
        (GatedRepoError,), code="gated_model", load=_load_gated, what="access", check=_check_gated
    ),
    HubError(
        (RevisionNotFoundError,),
        code="weights_not_found",
        load=lambda e, c: f"revision {c.revision!r} does not exist in {c.repo_id}: {c.revisions()}",
        what="revision",
        check=lambda e, c: (
            f"the revision in models.json does not exist in {c.repo_id}: {c.revisions()}"
        ),
    ),
    HubError(
        (RepositoryNotFoundError,),
        code="weights_not_found",
        load=_load_repo,
        what="access",
        check=lambda e, c: (
            f"{c.repo_id} was not found on the Hugging Face hub: check serving.repo_id in "
            "models.json; if the repo is private, the token's account must be able to read it"
        ),
    ),
    HubError(
        (HfHubHTTPError,),
        status=401,
        code="bad_token",
        load=lambda e, c: (
            "the Hugging Face hub rejected the token (401 Unauthorized) while fetching "
            f"{c.repo_id}: create a read token at {TOKENS_PAGE} and set HF_TOKEN "
            "(or HUGGINGFACE_TOKEN) to it"
        ),
        what="token",
        check=lambda e, c: (
            "the Hugging Face hub rejected the token (401 Unauthorized): it is invalid, "
            f"expired or revoked: create a read token at {TOKENS_PAGE} and set HF_TOKEN "
            "(or HUGGINGFACE_TOKEN) to it"
        ),
    ),
    HubError(
        (HfHubHTTPError,),
        status=403,
        code="bad_token",
        load=lambda e, c: (
            f"the token may not read {c.repo_id} (403 Forbidden): use a read token, or give the "
            "fine-grained token read access to public gated repositories"
        ),
        what="access",
        check=lambda e, c: (
            f"the token may not read {c.repo_id} (403 Forbidden): use a read token, or give "
            f"the fine-grained token read access to public gated repositories at {TOKENS_PAGE}"
        ),
    ),
    HubError(
        (IncompleteSnapshotError,),
        code="weights_not_found",
        load=lambda e, c: (
            f"the cached copy of {c.repo_id} at {c.cache} is incomplete (an interrupted "
            f"download?): complete it with {c.download}, or remove it and retry with network "
            "access"
        ),
    ),
    HubError((LocalEntryNotFoundError,), load=_load_not_cached),
    HubError(
        (HfHubHTTPError,),
        status=429,
        load=_load_http,
        check=lambda e, c: "the Hugging Face hub is rate-limiting this address (429): retry later",
    ),
    HubError(
        (HfHubHTTPError,),
        load=_load_http,
        check=lambda e, c: f"the Hugging Face hub answered HTTP {_status(e)}: retry later",
    ),
    HubError(_transport_errors(), check=_check_unreachable),
    HubError((OSError,), code="weights_not_found", load=_load_storage),
    HubError(
        (BaseException,),
        load=lambda e, c: (
            f"downloading {c.repo_id} from the Hugging Face hub failed ({type(e).__name__}): "
            f"check the network and retry, or download it first with {c.download}"
        ),
        check=lambda e, c: (
            f"asking the Hugging Face hub failed ({type(e).__name__}: {short(e, 200)})"
        ),
    ),
)


def load_error(exc: BaseException, call: HubCall) -> ModelLoadError:
    """The :class:`ModelLoadError` for a failed download of the weights."""
    row = next(r for r in HUB_ERRORS if r.load is not None and r.matches(exc))
    assert row.load is not None
    return ModelLoadError(row.code, row.load(exc, call))


def explain(exc: BaseException, call: HubCall) -> tuple[str, str]:
    """``(what, detail)`` of the setup line for a failed question to the hub."""
    row = next(r for r in HUB_ERRORS if r.check is not None and r.matches(exc))
    assert row.check is not None
    return row.what, row.check(exc, call)
