"""Take the README's screenshot, ``docs/screenshot-chat.png``, from the demo stack.

    .venv/bin/python tools/screenshot.py

Starts what ``make demo`` starts (redis-server, one worker with the SmolLM2-135M demo model
on the CPU, the gateway; on free local ports, stopped at the end), opens the chat page in
Debian's chromium (``make browser-deps``), signs in with the demo key, asks a question whose
answer is Markdown (a table), waits for the whole answer and saves the page. The request is
sent with temperature 0, so the answer is the same from run to run. A few minutes on a CPU.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import Route, expect, sync_playwright

from devstack.demo import DEMO_MODEL
from devstack.processes import Proc, free_port, start_gateway, start_redis, start_worker, wait_ready

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "screenshot-chat.png"
CHROMIUM = "/usr/bin/chromium"
# The demo model is tiny and not medical: asked for a list "with the symptom in bold" it
# writes a plain numbered list; asked for a table it writes a real Markdown table.
QUESTION = "Make a short table of three symptoms of anemia, with columns Symptom and Description."


def say(text: str) -> None:
    print(text, flush=True)  # noqa: T201 - a command-line tool


def greedy(route: Route) -> None:
    """The page's own request, with temperature 0 (the answer then repeats run to run)."""
    body = {**(route.request.post_data_json or {}), "temperature": 0}
    route.continue_(post_data=json.dumps(body))


def shoot(base_url: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1100}, base_url=base_url)
        page.set_default_timeout(30_000)
        page.route("**/medgemma", greedy)
        page.goto("/")
        page.locator("#api-key").fill("demo-key")
        page.locator("#api-key").press("Enter")
        expect(page.locator("#model")).to_have_value(DEMO_MODEL)
        page.locator("#question").fill(QUESTION)
        page.locator("#question").press("Enter")
        answer = page.locator("#transcript .msg.assistant").last
        expect(answer).to_have_attribute("data-state", "done", timeout=300_000)
        page.locator("#transcript").evaluate("t => { t.scrollTop = 0; }")  # the question too
        page.locator("#question").blur()
        OUT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(OUT))
        say(answer.locator(".answer").inner_text())
        if answer.locator(".markdown :is(table, ul, ol)").count() == 0:
            say("warning: the answer has no table or list this time; look at the screenshot")
        browser.close()


def main() -> int:
    logs = Path(tempfile.mkdtemp(prefix="medgemma-screenshot-"))
    procs: list[Proc] = []
    try:
        rport, port = free_port(), free_port()
        procs.append(start_redis(rport, logs / "redis", logs / "redis.log"))
        env = {
            "REDIS_URL": f"redis://127.0.0.1:{rport}/0",
            "WORKER_MODEL": DEMO_MODEL,
            "WORKER_DEVICE": "cpu",
            "GATEWAY_DEFAULT_MODEL": DEMO_MODEL,
            "GATEWAY_ENV": "development",  # the demo key, demo-key
            "GATEWAY_API_KEYS": "",
        }
        say(f"starting the demo stack (a minute or more; logs in {logs}) ...")
        worker = start_worker(env, logs / "worker.log")
        procs.append(worker)
        procs.append(start_gateway(env, port, logs / "gateway.log"))
        wait_ready(port, DEMO_MODEL, 900, worker)  # compiling: minutes on a busy CPU
        shoot(f"http://127.0.0.1:{port}")
    except Exception as exc:
        say(f"screenshot failed: {exc!r}; logs in {logs}")
        return 1
    finally:
        for proc in reversed(procs):
            proc.stop()
    say(f"saved {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
