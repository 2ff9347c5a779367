"""worker.runtime.runner.JobRunner: one job from claim to terminal event, on fake Redis and a
real engine.

The engine is the tiny random Gemma 3 of ``devstack.tiny_gemma``; Redis is fakeredis. What is
checked is what a client or an operator sees in Redis: the job's replay log and live channel,
the stored conversation turn and its lock.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from PIL import Image
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

from devstack.processes import wait_for
from shared.keys import Keys
from shared.protocol import (
    ChatMessage,
    ConversationRef,
    DoneEvent,
    ErrorEvent,
    ImagePart,
    Job,
    SamplingParams,
    TextPart,
    TokenEvent,
    decode_event,
)
from shared.registry import ModelEntry
from tests.engines import load_tiny, make_engine, one_torch_thread, tiny_entry  # noqa: F401
from worker.engines.loadtest import LoadTestEngine
from worker.engines.model import ModelEngine
from worker.runtime.runner import JobRunner, RunnerConfig
from worker.weights.loader import LoadedModel

PROMPT = "Hello! How are you today?"  # runs to the length limit with the tiny model (greedy)
SECRET = "PATIENT-NAME-Jane-Doe-1970"
JOB_TTL_S = 600
CONFIG = RunnerConfig(
    worker_id="w-test", job_ttl_s=JOB_TTL_S, conversation_ttl_s=3600, claim_ttl_s=900
)
KEYS = Keys()
Event = TokenEvent | DoneEvent | ErrorEvent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def entry(tiny_gemma_dir: Path) -> ModelEntry:
    return tiny_entry(
        tiny_gemma_dir, in_billing="1000", out_billing="2000", serving={"max_new_tokens": 8}
    )


@pytest.fixture(scope="module")
def loaded(entry: ModelEntry, tiny_gemma_dir: Path) -> LoadedModel:
    return load_tiny(entry, tiny_gemma_dir)


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Iterator[ModelEngine]:
    e = make_engine(loaded, 1024)
    yield e
    e.close()


@pytest.fixture
def blobs(server: fakeredis.FakeServer) -> fakeredis.FakeRedis:
    """A bytes client on the same server, as the worker has for image bytes."""
    return fakeredis.FakeRedis(server=server)


@pytest.fixture
def make_runner(redis: fakeredis.FakeRedis, blobs: fakeredis.FakeRedis) -> Callable[..., JobRunner]:
    def make(engine: Any, entry: ModelEntry, **kw: Any) -> JobRunner:
        return JobRunner(redis, blobs, KEYS, engine, entry, CONFIG, **kw)

    return make


def _job(
    job_id: str = "job-0000000001",
    *,
    text: str = PROMPT,
    conversation: ConversationRef | None = None,
    deadline_in: float = 60.0,
    max_new_tokens: int = 8,
) -> Job:
    now = time.time()
    return Job(
        job_id=job_id,
        model="tiny-gemma",
        messages=[ChatMessage(role="user", content=[TextPart(text=text)])],
        sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
        conversation=conversation,
        enqueued_at=now,
        start_deadline=now + deadline_in,
    )


def _log(redis: fakeredis.FakeRedis, job_id: str) -> list[tuple[str, Event]]:
    return [(sid, decode_event(f["e"])) for sid, f in redis.xrange(KEYS.job_log(job_id))]


# --- a job that runs --------------------------------------------------------------------------


def test_job_streams_tokens_then_done(
    redis: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    engine: ModelEngine,
    entry: ModelEntry,
) -> None:
    job = _job()
    make_runner(engine, entry).run(job)
    log = _log(redis, job.job_id)
    assert len(log) >= 3
    assert [sid for sid, _ in log] == [f"{i}-0" for i in range(1, len(log) + 1)]
    assert [e.seq for _, e in log] == list(range(1, len(log) + 1))
    assert all(e.job_id == job.job_id for _, e in log)
    *tokens, (_, done) = [e for e in log]
    assert all(isinstance(e, TokenEvent) and e.text for _, e in tokens)
    assert isinstance(done, DoneEvent)
    assert done.finish_reason == "length"
    assert done.disclaimer == entry.disclaimer
    timing = done.timing  # when it passed each stage, for benchmarks (bench/ reads the log)
    assert timing is not None and timing.enqueued_at == job.enqueued_at
    assert timing.first_token_at is not None
    assert timing.enqueued_at <= timing.started_at <= timing.first_token_at
    assert 0 < redis.ttl(KEYS.job_log(job.job_id)) <= JOB_TTL_S
    assert redis.get(KEYS.job_claim(job.job_id)) == "done:w-test"  # never runs again
    assert 0 < redis.ttl(KEYS.job_claim(job.job_id)) <= CONFIG.claim_ttl_s


def test_done_usage_and_cost(
    redis: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    engine: ModelEngine,
    entry: ModelEntry,
) -> None:
    job = _job(max_new_tokens=6)
    make_runner(engine, entry).run(job)
    done = _log(redis, job.job_id)[-1][1]
    assert isinstance(done, DoneEvent)
    prompt_tokens = engine.prompter.build(job.messages, 6).prompt_tokens
    usage = done.usage
    assert usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == 6  # finish_reason "length"
    assert usage.total_tokens == prompt_tokens + 6
    expected = (1000 * prompt_tokens + 2000 * 6) / 1_000_000
    assert usage.cost == pytest.approx(expected)
    assert usage.cost == pytest.approx(entry.cost(prompt_tokens, 6))


def test_live_channel_gets_the_same_events(
    redis: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    engine: ModelEngine,
    entry: ModelEntry,
) -> None:
    job = _job()
    pubsub = redis.pubsub()
    pubsub.subscribe(KEYS.job_channel(job.job_id))
    assert pubsub.get_message(timeout=1)["type"] == "subscribe"  # type: ignore[index]
    make_runner(engine, entry).run(job)
    live: list[Event] = []
    while (msg := pubsub.get_message(timeout=0.2)) is not None:
        live.append(decode_event(msg["data"]))
    pubsub.close()
    assert live == [e for _, e in _log(redis, job.job_id)]


def test_turn_is_stored_and_lock_released(
    redis: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    engine: ModelEngine,
    entry: ModelEntry,
) -> None:
    ref = ConversationRef(user_id="alice", conversation_id="c1")
    job = _job(conversation=ref)
    lock = KEYS.conversation_lock("alice", "c1")
    redis.set(lock, job.job_id, ex=600)
    make_runner(engine, entry).run(job)

    answer = "".join(e.text for _, e in _log(redis, job.job_id) if isinstance(e, TokenEvent))
    stored = [
        ChatMessage.model_validate_json(r)
        for r in redis.lrange(KEYS.conversation("alice", "c1"), 0, -1)
    ]
    assert [(m.role, m.text) for m in stored] == [("user", PROMPT), ("assistant", answer)]
    assert redis.get(lock) is None
    assert redis.zscore(KEYS.conversations("alice"), "c1") is not None
    assert redis.ttl(KEYS.conversation("alice", "c1")) > 0
    assert redis.ttl(KEYS.conversations("alice")) > 0


def test_lock_of_another_turn_is_kept(
    redis: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    engine: ModelEngine,
    entry: ModelEntry,
) -> None:
    ref = ConversationRef(user_id="alice", conversation_id="c1")
    job = _job(conversation=ref)
    lock = KEYS.conversation_lock("alice", "c1")
    redis.set(lock, "job-someone-else", ex=600)
    make_runner(engine, entry).run(job)
    assert redis.get(lock) == "job-someone-else"


def test_second_run_of_a_job_is_skipped(
    redis: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    engine: ModelEngine,
    entry: ModelEntry,
) -> None:
    ref = ConversationRef(user_id="alice", conversation_id="c1")
    job = _job(conversation=ref)
    runner = make_runner(engine, entry)
    runner.run(job)
    before = _log(redis, job.job_id)
    runner.run(job)
    make_runner(engine, entry).run(job)  # another worker: same claim key
    assert _log(redis, job.job_id) == before
    assert redis.llen(KEYS.conversation("alice", "c1")) == 2  # stored once
    assert runner.jobs_running == 0


# --- jobs that end with an error -------------------------------------------------------------


class _Boom:
    """An engine that fails with the prompt in its exception, as a real one might."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, messages: Any, sampling: Any, **kw: Any) -> Any:
        self.calls += 1
        raise RuntimeError(f"CUDA error while processing {messages[-1].text}")


def test_job_past_its_deadline(
    redis: fakeredis.FakeRedis, make_runner: Callable[..., JobRunner], entry: ModelEntry
) -> None:
    ref = ConversationRef(user_id="alice", conversation_id="c1")
    job = _job(conversation=ref, deadline_in=5.0)
    lock = KEYS.conversation_lock("alice", "c1")
    redis.set(lock, job.job_id, ex=600)
    engine = _Boom()
    make_runner(engine, entry, clock=lambda: job.start_deadline + 1).run(job)
    log = _log(redis, job.job_id)
    assert len(log) == 1
    sid, event = log[0]
    assert sid == "1-0"
    assert isinstance(event, ErrorEvent)
    assert event.error.code == "queue_timeout"
    assert engine.calls == 0
    assert redis.get(lock) is None  # the conversation is not left busy
    assert redis.llen(KEYS.conversation("alice", "c1")) == 0
    assert redis.ttl(KEYS.job_log(job.job_id)) > 0


def test_engine_failure_is_an_error_event_without_the_prompt(
    redis: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    entry: ModelEntry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ref = ConversationRef(user_id="alice", conversation_id="c1")
    job = _job(text=f"My name is {SECRET}, what is wrong?", conversation=ref)
    lock = KEYS.conversation_lock("alice", "c1")
    redis.set(lock, job.job_id, ex=600)
    runner = make_runner(_Boom(), entry)
    runner.run(job)
    log = _log(redis, job.job_id)
    assert len(log) == 1
    event = log[0][1]
    assert isinstance(event, ErrorEvent)
    assert event.error.code == "generation_failed"
    assert SECRET not in event.error.message
    assert SECRET not in redis.xrange(KEYS.job_log(job.job_id))[0][1]["e"]
    assert SECRET not in caplog.text
    assert job.job_id in caplog.text  # the operator can find the job
    assert redis.get(lock) is None
    assert runner.jobs_running == 0


def test_prompt_too_long_is_an_error_event(
    redis: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    loaded: LoadedModel,
    entry: ModelEntry,
) -> None:
    small = make_engine(loaded, 40)
    job = _job(text=f"{SECRET} " + "the patient has a cough and a fever " * 20)
    make_runner(small, entry).run(job)
    log = _log(redis, job.job_id)
    assert len(log) == 1
    event = log[0][1]
    assert isinstance(event, ErrorEvent)
    assert event.error.code == "prompt_too_long"
    assert event.error.type == "invalid_request_error"
    # the limit is named: the context window (40) or the prompt's share of it (39)
    assert re.search(r"\b(39|40) tokens\b", event.error.message), event.error.message
    assert SECRET not in event.error.message


# --- images ------------------------------------------------------------------------------------


def _png(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def _image_job(
    blobs: fakeredis.FakeRedis, data: bytes, *, stored: bytes | None, ref: ConversationRef | None
) -> Job:
    job_id = "job-img-000001"
    key = KEYS.job_image(job_id, 0)
    if stored is not None:
        blobs.set(key, stored, ex=600)
    now = time.time()
    image = ImagePart(key=key, mime_type="image/png", sha256=hashlib.sha256(data).hexdigest())
    return Job(
        job_id=job_id,
        model="tiny-gemma",
        messages=[ChatMessage(role="user", content=[image, TextPart(text="Describe the image.")])],
        sampling=SamplingParams(temperature=0.0, max_new_tokens=4),
        conversation=ref,
        enqueued_at=now,
        start_deadline=now + 60,
    )


def test_image_job_runs_and_its_bytes_are_deleted(
    redis: fakeredis.FakeRedis,
    blobs: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    engine: ModelEngine,
    entry: ModelEntry,
) -> None:
    data = _png()
    ref = ConversationRef(user_id="alice", conversation_id="c-img")
    job = _image_job(blobs, data, stored=data, ref=ref)
    make_runner(engine, entry).run(job)
    done = _log(redis, job.job_id)[-1][1]
    assert isinstance(done, DoneEvent), done
    text_only = engine.prompter.build([_job(text="Describe the image.").messages[0]], 4)
    assert done.usage.prompt_tokens > text_only.prompt_tokens  # the image's tokens are in it
    assert blobs.exists(KEYS.job_image(job.job_id, 0)) == 0
    stored = [
        ChatMessage.model_validate_json(r)
        for r in redis.lrange(KEYS.conversation("alice", "c-img"), 0, -1)
    ]
    assert stored[0].text == "[image]Describe the image."
    assert stored[0].images == []  # history keeps no image reference


@pytest.mark.parametrize("stored", [None, b"other bytes"], ids=["expired", "wrong-digest"])
def test_missing_image_is_an_error_event(
    redis: fakeredis.FakeRedis,
    blobs: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    entry: ModelEntry,
    stored: bytes | None,
) -> None:
    engine = _Boom()
    ref = ConversationRef(user_id="alice", conversation_id="c-img")
    job = _image_job(blobs, _png(), stored=stored, ref=ref)
    redis.set(KEYS.conversation_lock("alice", "c-img"), job.job_id, ex=600)
    make_runner(engine, entry).run(job)
    log = _log(redis, job.job_id)
    assert len(log) == 1
    event = log[0][1]
    assert isinstance(event, ErrorEvent)
    assert event.error.code == "image_expired"
    assert engine.calls == 0
    assert blobs.exists(KEYS.job_image(job.job_id, 0)) == 0
    assert redis.get(KEYS.conversation_lock("alice", "c-img")) is None


def test_a_redis_error_before_the_start_gives_the_claim_back(
    redis: fakeredis.FakeRedis, make_runner: Callable[..., JobRunner], entry: ModelEntry
) -> None:
    """Redis fails between the claim and the start of generation: the lease stops being
    renewed (it used to be renewed forever), so the claim lapses and the job can move on."""
    runner = make_runner(_Boom(), entry)
    job = _job()
    real_pipeline = redis.pipeline
    calls = {"n": 0}

    def failing_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:  # the record of the start

            def boom() -> None:
                raise RedisConnectionError("injected")

            pipe.execute = boom
        return pipe

    redis.pipeline = failing_pipeline  # type: ignore[method-assign]
    with pytest.raises(RedisConnectionError):
        runner.run(job)
    redis.pipeline = real_pipeline  # type: ignore[method-assign]
    assert runner._leases._held == set()  # nothing left for the lease keeper to renew
    # The claim is not renewed: it lapses with its lease, then the gateway hands the job over.
    assert 0 < redis.pttl(KEYS.job_claim(job.job_id)) <= CONFIG.claim_ttl_s * 1000
    assert runner.jobs_running == 0


def test_a_log_that_lost_events_in_a_failover_stops_the_job_for_a_handover(
    redis: fakeredis.FakeRedis,
    make_runner: Callable[..., JobRunner],
    entry: ModelEntry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Mid-answer, the log loses its last event (a Redis master acknowledged it and died before
    its replica had it). The worker writes nothing after the hole — no token, no terminal
    event — and leaves the job to a handover: its claim is not marked done and lapses with
    its lease, so the gateway hands the job over and it continues from what the log holds."""
    runner = make_runner(LoadTestEngine(tokens_per_s=20), entry)
    job = _job(max_new_tokens=40)  # 2 s of answer
    log = KEYS.job_log(job.job_id)

    def lose_the_last_event() -> None:
        wait_for(lambda: redis.xlen(log) >= 2, 10, "two tokens")
        with redis.pipeline() as pipe:
            while True:  # the last event, whichever it is when it goes
                try:
                    pipe.watch(log)
                    last_id = pipe.xrevrange(log, count=1)[0][0]
                    pipe.multi()
                    pipe.xdel(log, last_id)
                    pipe.execute()
                    break
                except WatchError:
                    continue
        lost.append(int(last_id.split("-")[0]))

    lost: list[int] = []
    failover = threading.Thread(target=lose_the_last_event)
    failover.start()
    with caplog.at_level(logging.INFO):
        runner.run(job)
    failover.join()
    seqs = [e.seq for _id, e in _log(redis, job.job_id)]
    assert seqs == list(range(1, lost[0]))  # nothing after the hole
    assert all(e.type == "token" for _id, e in _log(redis, job.job_id))
    assert redis.get(KEYS.job_claim(job.job_id)) == CONFIG.worker_id  # not done: it lapses
    assert runner._leases._held == set()  # and is no longer renewed
    assert "log lost events" in caplog.text
    assert PROMPT not in caplog.text
