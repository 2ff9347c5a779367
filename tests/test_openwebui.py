"""Open WebUI, the real one, in a real browser against the real stack.

Open WebUI (``make openwebui-deps`` installs it into ``.venv-openwebui``) runs as its own
process with its default settings, offline, connected to the gateway as an OpenAI connection
with the stack's *service key*, and forwarding its users' ids
(``ENABLE_FORWARD_USER_INFO_HEADERS``). Debian's chromium (``make browser-deps``) is driven by
Playwright's Python package, exactly as in ``test_browser.py``; every chat goes through
Open WebUI's page. The gateway side is checked where the gateway records it: its audit log
and Redis (the job's events, the per-user rate-limit keys).

The worker serves ``slow-model`` (the load-test engine: ``tok0 tok1 ...`` at 20 tokens/s), so
an answer grows visibly and lasts long enough to be stopped. Open WebUI sends no
``max_tokens``, so ``GATEWAY_MAX_GENERATION_S`` bounds every answer, and every title and tag
task Open WebUI sends after it. Without Open WebUI or chromium the module is skipped, except
in CI (``CI`` set), where it must run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import pytest

from devstack.processes import Proc, free_port, wait_for
from shared.keys import Keys, owner_tag
from shared.redis_url import sync_redis
from tests.stack import CHROMIUM, CHROMIUM_ARGS, SERVICE_KEY, Stack, start_stack

ROOT = Path(__file__).resolve().parent.parent
OPENWEBUI = ROOT / ".venv-openwebui" / "bin" / "open-webui"
SCREENSHOT = ROOT / "artifacts" / "openwebui-chat.png"  # the second user's page, answered

if not os.environ.get("CI"):
    if not OPENWEBUI.exists():
        pytest.skip(
            "Open WebUI is not installed in .venv-openwebui (run `make openwebui-deps`)",
            allow_module_level=True,
        )
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's chromium is not installed at /usr/bin/chromium (run `make browser-deps` "
            "and `make openwebui-deps`)",
            allow_module_level=True,
        )
    pytest.importorskip("playwright", reason="playwright is not installed (make browser-deps)")

from playwright.sync_api import (  # noqa: E402
    Browser,
    BrowserContext,
    Locator,
    Page,
    expect,
    sync_playwright,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = "slow-model"
SERVICE = "webui"  # the service key's name in tests/stack.py
GENERATION_S = 10  # GATEWAY_MAX_GENERATION_S of this module's stack
STOP_WITHIN_S = 5.0  # from the click on Stop to the job's cancelled event in Redis
UI_TIMEOUT_MS = 30_000  # one CI machine of 2 cores runs the stack, Open WebUI and chromium
KEYS = Keys()
TOKEN = re.compile(r"\btok(\d+)\b")


# ---------------------------------------------------------------------------- fixtures


@dataclass
class WebUI:
    stack: Stack
    url: str
    proc: Proc

    def api(self, token: str) -> httpx.Client:
        """Open WebUI's own REST API as one of its users (not the gateway's)."""
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )

    def audit(self) -> list[dict[str, Any]]:
        path = self.stack.workdir / "audit.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def chats(self, end_user: str) -> list[dict[str, Any]]:
        """The gateway's audit lines of chat requests made for one Open WebUI user."""
        return [
            r
            for r in self.audit()
            if r["action"] == "chat.openai" and r["user_id"] == f"{SERVICE}/{end_user}"
        ]


def openwebui_env(data_dir: Path, gateway_url: str) -> dict[str, str]:
    """Open WebUI's defaults, except: offline, no Ollama, the gateway as its one OpenAI
    connection (the service key), and its users' ids forwarded to the gateway."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL") and not k.startswith(("OPENAI_", "WEBUI_"))
    }
    env.update(
        DATA_DIR=str(data_dir),
        OFFLINE_MODE="true",
        HF_HUB_OFFLINE="1",
        ENABLE_OLLAMA_API="false",
        RAG_EMBEDDING_MODEL_AUTO_UPDATE="false",
        OPENAI_API_BASE_URL=f"{gateway_url}/v1",
        OPENAI_API_KEY=SERVICE_KEY,
        ENABLE_FORWARD_USER_INFO_HEADERS="true",
        WEBUI_SECRET_KEY=secrets.token_hex(32),
    )
    return env


def start_openwebui(workdir: Path, gateway_url: str) -> tuple[Proc, str]:
    data = workdir / "data"
    data.mkdir(parents=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "open-webui.log"
    log = open(log_path, "ab")  # noqa: SIM115 - closed by Proc.stop
    popen = subprocess.Popen(
        [str(OPENWEBUI), "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=data,
        env=openwebui_env(data, gateway_url),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc = Proc(name="open-webui", popen=popen, log_path=log_path, _log=log)

    def up() -> bool:  # uvicorn answers only once Open WebUI's start-up has finished
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                return bool(json.load(r).get("status"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    try:
        wait_for(up, 300, "starting Open WebUI", proc)
    except BaseException:
        proc.stop()
        raise
    return proc, url


@pytest.fixture(scope="module")
def webui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUI]:
    work = tmp_path_factory.mktemp("openwebui")
    stack = start_stack(
        work / "stack",
        work,  # slow-model loads no weights
        workers=0,
        only={MODEL},
        settings={
            # Open WebUI sends a title, a follow-up and a tags task after each answer.
            "WORKER_CONCURRENCY": "8",
            "GATEWAY_MAX_GENERATION_S": str(GENERATION_S),
        },
    )
    proc: Proc | None = None
    try:
        stack.add_worker(MODEL)
        proc, url = start_openwebui(work / "open-webui", stack.base_url)
        yield WebUI(stack=stack, url=url, proc=proc)
    finally:
        if proc is not None:
            proc.stop()
        stack.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@dataclass
class Session:
    """One Open WebUI user in a browser context of their own."""

    context: BrowserContext
    page: Page
    foreign: list[str] = field(default_factory=list)  # requests to anywhere but Open WebUI
    token: str = ""  # Open WebUI's session token (its REST API)
    user_id: str = ""  # Open WebUI's user id: what it forwards to the gateway


def open_session(browser: Browser, webui: WebUI) -> Session:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=webui.url)
    ctx.set_default_timeout(UI_TIMEOUT_MS)
    session = Session(context=ctx, page=ctx.new_page())
    here = urlsplit(webui.url).netloc

    def on_request(url: str) -> None:
        if urlsplit(url).netloc != here and not url.startswith(("data:", "blob:")):
            session.foreign.append(url)

    session.page.on("request", lambda req: on_request(req.url))
    return session


def signed_in(session: Session, webui: WebUI) -> None:
    """Read the session token the page stored, and who it is, from Open WebUI."""
    token = session.page.evaluate("() => localStorage.getItem('token')")
    assert isinstance(token, str) and token
    with webui.api(token) as api:
        me = api.get("/api/v1/auths/").json()
    session.token, session.user_id = token, str(me["id"])


@pytest.fixture(scope="module")
def admin(browser: Browser, webui: WebUI) -> Iterator[Session]:
    """The first user, signed up through the page: Open WebUI makes them its admin."""
    session = open_session(browser, webui)
    page = session.page
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/auth"))  # no one is signed in
    page.get_by_role("button", name="Get started").click()
    page.locator("#name").fill("Ada Admin")
    page.locator("#email").fill("ada@hospital.example")
    page.locator("#password").fill(secrets.token_urlsafe(16))
    page.get_by_role("button", name="Create Admin Account").click()
    # An admin's first visit opens the release notes over the chat.
    page.get_by_role("button", name="Okay, Let's Go!").click()
    expect(page.locator("#chat-input")).to_be_visible()
    signed_in(session, webui)
    yield session
    session.context.close()
    assert not session.foreign, session.foreign


# ---------------------------------------------------------------------------- helpers


def ask(page: Page, text: str) -> None:
    page.locator("#chat-input").click()
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def answer(page: Page) -> Locator:
    return page.locator("#response-content-container").last


def stop_button(page: Page) -> Locator:
    return page.get_by_role("button", name="Stop", exact=True)


def tokens_shown(page: Page) -> int:
    """How many of the load-test engine's tokens the last answer shows."""
    return len(TOKEN.findall(answer(page).inner_text()))


def see_it_stream(page: Page) -> None:
    """The answer appears and grows while it is being written."""
    expect(answer(page)).to_contain_text("tok2")
    first = tokens_shown(page)
    expect(stop_button(page)).to_be_visible()
    expect(answer(page)).to_contain_text(f"tok{first + 10}")
    assert tokens_shown(page) >= first + 10


def terminal_event(webui: WebUI, job_id: str) -> dict[str, Any] | None:
    """The job's done or error event in its Redis event log, if it has ended."""
    redis = sync_redis(webui.stack.redis_url, decode_responses=True)
    try:
        entries = cast(list[tuple[str, dict[str, str]]], redis.xrange(KEYS.job_log(job_id)))
        for _id, fields in entries:
            event: dict[str, Any] = json.loads(fields["e"])
            if event["type"] in ("done", "error"):
                return event
        return None
    finally:
        redis.close()


def rate_limit_count(webui: WebUI, user_id: str) -> int:
    """Chat requests counted against ``user_id`` in the gateway's per-minute window."""
    redis = sync_redis(webui.stack.redis_url, decode_responses=True)
    try:
        return int(redis.zcard(f"{KEYS.prefix}:rl:{owner_tag(user_id)}:rpm"))
    finally:
        redis.close()


# ---------------------------------------------------------------------------- tests


def test_the_first_user_signs_up_as_admin_and_picks_the_served_model(
    admin: Session, webui: WebUI
) -> None:
    with webui.api(admin.token) as api:
        assert api.get("/api/v1/auths/").json()["role"] == "admin"
    page = admin.page
    picker = page.locator("#model-selector-model-button")
    expect(picker).to_have_attribute("aria-label", f"Selected model: {MODEL}")
    picker.click()
    expect(page.get_by_role("option", name=f"Select {MODEL} model", exact=True)).to_be_visible()
    page.keyboard.press("Escape")
    # Open WebUI listed the gateway's models for this user, through the service key.
    lists = [r for r in webui.audit() if r["action"] == "models.list"]
    assert any(r["user_id"] == f"{SERVICE}/{admin.user_id}" for r in lists), lists


def test_an_answer_streams_into_the_page_and_stop_cancels_its_job(
    admin: Session, webui: WebUI
) -> None:
    page = admin.page
    page.goto("/")
    ask(page, "What is a normal resting heart rate? Please explain at length.")
    see_it_stream(page)
    shown = tokens_shown(page)
    stop_button(page).click()
    clicked = time.monotonic()
    expect(stop_button(page)).to_be_hidden()

    # The gateway saw its client leave: Open WebUI closed the stream at once.
    def left() -> list[dict[str, Any]]:
        return [r for r in webui.chats(admin.user_id) if r["outcome"] == "client_left"]

    wait_for(lambda: bool(left()), STOP_WITHIN_S, "the gateway to see the stream closed")
    (line,) = left()
    assert line["service"] == SERVICE and line["model"] == MODEL and line["status"] == 200
    # ... and the worker stopped generating: the job ended cancelled, soon after the click.
    job_id = line["job_id"]
    wait_for(
        lambda: terminal_event(webui, job_id) is not None,
        STOP_WITHIN_S,
        "the job to end after Stop",
    )
    took = time.monotonic() - clicked
    done = terminal_event(webui, job_id)
    assert done is not None and done["type"] == "done", done
    assert done["finish_reason"] == "cancelled", done
    assert took < STOP_WITHIN_S, took
    # It had not run on: at 20 tokens/s, a few seconds' worth past what the page showed,
    # far below the GENERATION_S × 20 tokens it would have written unstopped.
    written = int(done["usage"]["completion_tokens"])
    assert shown <= written <= shown + 20 * STOP_WITHIN_S < 20 * GENERATION_S, (shown, written)
    assert tokens_shown(page) <= written  # the page shows nothing the job did not write


def test_two_users_chat_at_once_as_two_end_users_of_the_service(
    admin: Session, browser: Browser, webui: WebUI
) -> None:
    """A second user, created by the admin with Open WebUI's default role for it ("user"),
    signs in through the page; both ask at the same time. The gateway counts each under
    their own Open WebUI id, scoped to the service."""
    password = secrets.token_urlsafe(16)
    with webui.api(admin.token) as api:
        created = api.post(
            "/api/v1/auths/add",
            json={
                "name": "Ben Clinician",
                "email": "ben@hospital.example",
                "password": password,
                "role": "user",
            },
        )
        assert created.status_code == 200, created.text
        ben_token = created.json()["token"]
        # Open WebUI's default: a connection's models are the admin's only, until the admin
        # makes them visible (Admin → Models → the model → visibility Public).
        with webui.api(ben_token) as as_ben:
            assert MODEL not in {m["id"] for m in as_ben.get("/api/models").json()["data"]}
        public = api.post(
            "/api/v1/models/create",
            json={
                "id": MODEL,
                "name": MODEL,
                "meta": {},
                "params": {},
                "access_grants": [
                    {"principal_type": "user", "principal_id": "*", "permission": "read"}
                ],
            },
        )
        assert public.status_code == 200, public.text

    ben = open_session(browser, webui)
    try:
        page = ben.page
        page.goto("/auth")
        page.locator("#email").fill("ben@hospital.example")
        page.locator("#password").fill(password)
        page.get_by_role("button", name="Sign in", exact=True).click()
        expect(page.locator("#chat-input")).to_be_visible()
        expect(page.locator("#model-selector-model-button")).to_have_attribute(
            "aria-label", f"Selected model: {MODEL}"
        )
        signed_in(ben, webui)
        assert ben.user_id != admin.user_id

        admin.page.goto("/")
        ask(page, "Ben's question: what does a troponin test measure?")
        ask(admin.page, "Ada's question: when is a fever dangerous?")
        for p in (page, admin.page):
            see_it_stream(p)
        for p in (page, admin.page):  # each answer runs to GATEWAY_MAX_GENERATION_S
            finished = p.locator("#continue-response-button")  # shown once it is done
            expect(finished).to_be_visible(timeout=(GENERATION_S + 20) * 1000)
            assert tokens_shown(p) > 20
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
    finally:
        ben.context.close()
    assert not ben.foreign, ben.foreign

    # The gateway's audit log names each of them, with the service that named them.
    def answered(who: str) -> bool:
        return any(r["outcome"] == "ok" and r["completion_tokens"] for r in webui.chats(who))

    for who in (admin.user_id, ben.user_id):
        wait_for(partial(answered, who), 10, f"the audit line of {who}'s answer")
    chats = [r for r in webui.audit() if r["action"] == "chat.openai"]
    names = {f"{SERVICE}/{admin.user_id}", f"{SERVICE}/{ben.user_id}"}
    # Every chat request (answers and Open WebUI's own title/tag tasks) named its end user.
    assert {r["user_id"] for r in chats} == names, chats
    assert all(r["service"] == SERVICE and r["role"] == "user" for r in chats), chats
    # Two users in the gateway's per-user state: each has their own rate-limit window, and
    # nothing was counted against the service itself.
    for who in names:
        assert rate_limit_count(webui, who) >= 1, who
    assert rate_limit_count(webui, SERVICE) == 0
