"""Background work never delays a clinician, and is never starved.

One worker of the 20 tokens/s load-test model with two slots, so that every rule below is
visible: without it, a background job would simply take the free slot.

* A background job waits while interactive work runs on the worker, and starts when it is
  done (the worker stops reading the background queue meanwhile).
* Interactive work waiting in line is taken before background work sent earlier.
* A background job that is running when interactive work arrives pauses (no token while the
  interactive answer streams) and then continues exactly where it stopped.
* Under a steady interactive load, a background job still finishes: once it has waited
  ``GATEWAY_BACKGROUND_MAX_WAIT_S`` in line it is promoted and taken first into a background
  slot, and once it has paused that long in all it no longer pauses.
* Promoted work never takes the slots kept for clinicians, and still pauses for them: under
  a background flood that outlasts its share of waiting, a clinician still starts at once.
* How a request names its class: ``priority``, a ``<model>@background`` alias (listed in
  ``/v1/models`` for a front end's task model), OpenAI's ``service_tier: "flex"``, or a key
  whose default is background.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from gateway.services.apikeys import KeyConfigError, KeyStore
from shared.keys import Keys
from shared.protocol import JobMeta
from tests.stack import (
    TASKS_KEY,
    BackgroundStream,
    Stack,
    ask,
    finished,
    slow_model_stack,
    stream_in_background,
    streamed_text,
)

pytestmark = pytest.mark.integration

MODEL = "slow-model"
MAX_WAIT_S = 10.0


def _two_slots(workdir: Path, tiny_gemma_dir: Path, max_wait_s: float) -> Iterator[Stack]:
    """One worker with two slots, one of them for background work, whose share of giving way
    is ``max_wait_s``."""
    settings = {
        "WORKER_CONCURRENCY": "2",
        "GATEWAY_IDLE_TIMEOUT_S": "20",
        "GATEWAY_BACKGROUND_MAX_WAIT_S": str(max_wait_s),
    }
    with slow_model_stack(workdir, tiny_gemma_dir, workers=1, settings=settings) as s:
        yield s


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    yield from _two_slots(tmp_path_factory.mktemp("priorities"), tiny_gemma_dir, MAX_WAIT_S)


def _ask(verbosity: int, **fields: object) -> dict[str, object]:
    return ask("question", model=MODEL, verbosity=verbosity, **fields)


def _token_times(s: BackgroundStream) -> list[float]:
    return [at for (kind, _), at in zip(s.events, s.at, strict=True) if kind == "token"]


def _first_token(s: BackgroundStream, timeout_s: float) -> float:
    with s._seen:
        assert s._seen.wait_for(lambda: bool(_token_times(s)), timeout_s), s.events
    return _token_times(s)[0]


def _whole(s: BackgroundStream, done: dict[str, object]) -> None:
    """The answer is every token once, in order (load-test tokens are numbered)."""
    n = done["usage"]["completion_tokens"]  # type: ignore[index]
    assert streamed_text(s) == "".join(f"tok{i} " for i in range(n)), streamed_text(s)


def test_background_work_waits_while_interactive_work_runs(worker: Stack) -> None:
    clinician = stream_in_background(worker, _ask(0))  # 50 tokens, 2.5 s
    _first_token(clinician, 30)
    title = stream_in_background(worker, _ask(0, priority="background"))
    done = finished(clinician, 30)
    assert done["finish_reason"] == "length"
    clinician_done_at = clinician.at[-1]
    started_at = _first_token(title, 30)
    # A slot was free the whole time: only the rule kept the background job out of it.
    assert started_at >= clinician_done_at, "background work started beside a clinician's"
    assert any(kind == "queued" for kind, _ in title.events), title.events
    _whole(title, finished(title, 30))


def test_interactive_work_in_line_goes_before_earlier_background_work(worker: Stack) -> None:
    busy = [stream_in_background(worker, _ask(0)) for _ in range(2)]  # both slots
    for s in busy:
        _first_token(s, 30)
    title = stream_in_background(worker, _ask(0, priority="background"))
    assert title.wait_for_events(1, 10)  # in line (a queued event)
    clinician = stream_in_background(worker, _ask(0))
    assert clinician.wait_for_events(1, 10)
    clinician_started = _first_token(clinician, 30)
    title_started = _first_token(title, 30)
    finished(clinician, 30)
    assert clinician_started < title_started
    assert title_started >= clinician.at[-1]  # (and it waited for the clinician's answer)
    for s in busy:
        finished(s, 30)
    _whole(title, finished(title, 30))


def test_running_background_work_pauses_for_a_clinician_and_resumes_exactly(
    worker: Stack,
) -> None:
    title = stream_in_background(worker, _ask(1, priority="background"))  # 100 tokens, 5 s
    assert title.wait_for_events(10, 30)
    clinician = stream_in_background(worker, _ask(0))  # 50 tokens, 2.5 s
    clinician_first = _first_token(clinician, 30)
    finished(clinician, 30)
    clinician_last = clinician.at[-1]
    done = finished(title, 60)
    during = [t for t in _token_times(title) if clinician_first + 0.3 < t < clinician_last]
    assert not during, f"{len(during)} background tokens streamed beside the clinician's answer"
    assert any(t > clinician_last for t in _token_times(title)), "it never resumed"
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 100
    _whole(title, done)
    assert "pauses for interactive work" in worker.logs()


def test_background_work_finishes_under_a_steady_interactive_load(worker: Stack) -> None:
    stop = threading.Event()
    answered: list[float] = []

    def clinician() -> None:
        while not stop.is_set():
            s = stream_in_background(worker, _ask(0))
            finished(s, 60)
            answered.append(time.monotonic())

    load = [threading.Thread(target=clinician) for _ in range(2)]  # both slots, always
    for t in load:
        t.start()
    try:
        while len(answered) < 2:  # the load is steady
            time.sleep(0.1)
        sent = time.monotonic()
        title = stream_in_background(worker, _ask(0, priority="background"))
        done = finished(title, MAX_WAIT_S + 40)
        took = time.monotonic() - sent
        served_meanwhile = sum(1 for t in answered if t > sent)
    finally:
        stop.set()
        for t in load:
            t.join(60)
    _whole(title, done)
    assert served_meanwhile >= 2, "the interactive load was not steady"
    # It waited its share behind the clinicians, then ran: not starved.
    assert took >= MAX_WAIT_S - 1, f"it ran after {took:.1f}s, before its share of waiting"
    assert took < MAX_WAIT_S + 30


SHORT_WAIT_S = 4.0


@pytest.fixture(scope="module")
def short_wait(tmp_path_factory: pytest.TempPathFactory, tiny_gemma_dir: Path) -> Iterator[Stack]:
    yield from _two_slots(tmp_path_factory.mktemp("short-wait"), tiny_gemma_dir, SHORT_WAIT_S)


def test_promoted_background_work_leaves_the_clinicians_slot_free_and_still_pauses(
    short_wait: Stack,
) -> None:
    """A background flood that outlasts the share: the waiting title is promoted, yet takes only
    the background slot, and once running it still pauses for a clinician (its share counts
    its pauses, not its time in line behind other background work)."""
    report = stream_in_background(short_wait, _ask(2, priority="background"))  # 200 tokens, 10 s
    _first_token(report, 30)  # it holds the one background slot
    title = stream_in_background(short_wait, _ask(1, priority="background"))  # 100 tokens, 5 s
    assert title.wait_for_events(1, 10)  # in line: the background slot is taken
    promoted = Keys().job_promoted(title.job_id)
    with redis.Redis.from_url(short_wait.redis_url) as r:
        deadline = time.monotonic() + SHORT_WAIT_S + 10
        while not r.exists(promoted):  # it waited its share: sent again, on the promoted line
            assert time.monotonic() < deadline, "the title was never promoted"
            time.sleep(0.05)
    clinician = stream_in_background(short_wait, _ask(0))  # 50 tokens, 2.5 s
    clinician_started = _first_token(clinician, 30)
    finished(clinician, 30)
    report_done = finished(report, 30)
    title_started = _first_token(title, 30)
    # The slot kept for clinicians stayed free for the clinician: the promoted title did not
    # take it, and started as soon as the background slot was free, before any other work.
    assert clinician_started < report.at[-1], "the clinician waited for the background report"
    assert title_started >= report.at[-1], "promoted work took a slot kept for clinicians"
    colleague = stream_in_background(short_wait, _ask(0))
    colleague_started = _first_token(colleague, 30)
    finished(colleague, 30)
    during = [t for t in _token_times(title) if colleague_started + 0.3 < t < colleague.at[-1]]
    assert not during, f"{len(during)} title tokens streamed beside the colleague's answer"
    _whole(title, finished(title, 30))
    _whole(report, report_done)


def _meta(stack: Stack, job_id: str) -> JobMeta:
    with redis.Redis.from_url(stack.redis_url) as r:
        raw = r.get(Keys().job_meta(job_id))
    assert raw is not None
    return JobMeta.model_validate_json(raw)


def _is_background(stack: Stack, response: httpx.Response) -> bool:
    assert response.status_code == 200, response.text
    return _meta(stack, response.headers["x-job-id"]).yields_until is not None


def test_how_a_request_names_background_work(worker: Stack) -> None:
    with worker.client() as c:
        listed = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert listed[:2] == [MODEL, f"{MODEL}@background"]  # served, then its alias

        def chat(model: str = MODEL, **fields: object) -> httpx.Response:
            body = {"model": model, "messages": [{"role": "user", "content": "q"}]}
            return c.post("/v1/chat/completions", json={**body, "max_tokens": 2, **fields})

        assert not _is_background(worker, chat())
        assert _is_background(worker, chat(f"{MODEL}@background"))
        assert _is_background(worker, chat(service_tier="flex"))
        assert _is_background(worker, chat(priority="background"))
        assert _is_background(worker, chat(priority=1))  # vLLM's form: above 0 goes later
        assert not _is_background(worker, chat(priority=0))
        assert not _is_background(worker, chat(service_tier="default"))
        seed = c.post("/medgemma", json=_ask(0, priority="background", stream=False))
        assert _is_background(worker, seed)
        bad = chat(priority="urgent")
        assert bad.status_code == 422 and "priority" in bad.text
        unknown = chat("ghost@background")
        assert unknown.status_code == 404, unknown.text
    with worker.client(TASKS_KEY) as tasks:  # a key whose default is background...
        body = {"model": MODEL, "messages": [{"role": "user", "content": "q"}], "max_tokens": 2}
        assert _is_background(worker, tasks.post("/v1/chat/completions", json=body))
        # ...unless the request asks otherwise.
        asks = tasks.post("/v1/chat/completions", json={**body, "priority": "interactive"})
        assert not _is_background(worker, asks)


def test_a_key_names_its_default_priority() -> None:
    store = KeyStore.from_config(
        "key-aaaaaaaa:app:service:background,key-bbbbbbbb:dr:user", None, development=False
    )
    app, dr = store.authenticate("key-aaaaaaaa"), store.authenticate("key-bbbbbbbb")
    assert app is not None and dr is not None
    assert app.priority == "background" and dr.priority == "interactive"
    assert app.on_behalf_of("u1").priority == "background"  # its end users' requests too
    with pytest.raises(KeyConfigError, match="priority must be interactive or background"):
        KeyStore.from_config("key-aaaaaaaa:app:service:urgent", None, development=False)
