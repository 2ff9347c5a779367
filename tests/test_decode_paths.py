"""The engine's two decoding paths on the real tiny Gemma 3 (float32, CPU): a job alone decodes
alone, a job that arrives moves it into the batch, and the answers stay exactly the greedy
answers of one job at a time; images and seeds decode alone beside the batch; the compiled
paths (the CUDA ones too, run here on the CPU at toy size) give the eager answers."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from shared.protocol import ChatMessage, ImagePart, SamplingParams, TextPart
from tests.engines import load_tiny, make_engine, one_torch_thread, tiny_entry  # noqa: F401
from worker.engines.base import GenerationResult
from worker.engines.batching import BatchUnavailable
from worker.engines.model import ModelEngine
from worker.weights.loader import LoadedModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["Hello! How are you today?", "What is fever?", "Define sepsis.", "Heart rate?"]
LONG = SamplingParams(temperature=0.0, max_new_tokens=48)
IMAGE_KEY = "img-0"


def _ask(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=[TextPart(text=text)])]


def _with_image(text: str) -> list[ChatMessage]:
    part = ImagePart(key=IMAGE_KEY, mime_type="image/png", sha256="0" * 64)
    return [ChatMessage(role="user", content=[part, TextPart(text=text)])]


@pytest.fixture(scope="module")
def loaded(tiny_gemma_dir: Path) -> LoadedModel:
    # float32: the batch and generate() then agree to the last bit.
    return load_tiny(tiny_entry(tiny_gemma_dir, serving={"dtype": "float32"}), tiny_gemma_dir)


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Iterator[ModelEngine]:
    e = make_engine(loaded, 512, concurrency=4)
    e.warmup()
    yield e
    e.close()


@pytest.fixture(scope="module")
def solo(engine: ModelEngine) -> list[GenerationResult]:
    """Each question's answer with the worker otherwise idle."""
    return [engine.generate(_ask(q), LONG, on_text=lambda _t: None) for q in QUESTIONS]


def _first_then_others(
    engine: ModelEngine, first: list[ChatMessage], others: list[list[ChatMessage]], **kw: object
) -> list[GenerationResult]:
    """Start ``first``; once it has streamed text, start ``others`` at once."""
    results: list[GenerationResult | None] = [None] * (1 + len(others))
    streaming = threading.Event()

    def run(i: int, messages: list[ChatMessage], sampling: SamplingParams) -> None:
        def on_text(_t: str) -> None:
            streaming.set()

        results[i] = engine.generate(messages, sampling, on_text=on_text, **kw)  # type: ignore[arg-type]

    threads = [threading.Thread(target=run, args=(0, first, LONG))]
    threads[0].start()
    assert streaming.wait(30)
    for i, m in enumerate(others, start=1):
        threads.append(threading.Thread(target=run, args=(i, m, LONG)))
        threads[-1].start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_alone_a_job_decodes_alone(solo: list[GenerationResult]) -> None:
    assert [r.path for r in solo] == ["single"] * len(QUESTIONS)
    assert all(r.completion_tokens == LONG.max_new_tokens for r in solo)  # no early end


def test_a_job_that_arrives_moves_the_running_one_into_the_batch(
    engine: ModelEngine, solo: list[GenerationResult]
) -> None:
    got = _first_then_others(engine, _ask(QUESTIONS[0]), [_ask(q) for q in QUESTIONS[1:]])
    assert got[0].path == "single+batch"  # started alone, went on in the batch
    assert [r.path for r in got[1:]] == ["batch"] * 3
    for mixed, alone in zip(got, solo, strict=True):
        assert mixed.text == alone.text  # one continuous answer, nothing lost or repeated
        assert mixed.completion_tokens == alone.completion_tokens
        assert mixed.finish_reason == alone.finish_reason == "length"
    # The worker is idle again: the next job decodes alone.
    again = engine.generate(_ask(QUESTIONS[1]), LONG, on_text=lambda _t: None)
    assert again.path == "single"
    assert again.text == solo[1].text


def test_cancel_and_stop_strings_work_in_the_batch(
    engine: ModelEngine, solo: list[GenerationResult]
) -> None:
    stop = " " + solo[1].text.split(" ")[3]
    cut = solo[1].text.index(stop)
    sent: list[str] = []
    results: dict[str, GenerationResult] = {}
    streaming = threading.Event()

    def first() -> None:
        def on_text(_t: str) -> None:
            streaming.set()

        results["long"] = engine.generate(_ask(QUESTIONS[0]), LONG, on_text=on_text)

    def stopped() -> None:
        params = LONG.model_copy(update={"stop": [stop]})
        results["stop"] = engine.generate(_ask(QUESTIONS[1]), params, on_text=lambda _t: None)

    def cancelled() -> None:
        results["cancel"] = engine.generate(
            _ask(QUESTIONS[2]), LONG, on_text=sent.append, should_stop=lambda: len(sent) >= 3
        )

    t0 = threading.Thread(target=first)
    t0.start()
    assert streaming.wait(30)
    others = [threading.Thread(target=f) for f in (stopped, cancelled)]
    for t in others:
        t.start()
    for t in [t0, *others]:
        t.join(60)
    assert results["stop"].path == results["cancel"].path == "batch"
    assert results["stop"].finish_reason == "stop"
    assert results["stop"].text == solo[1].text[:cut]
    assert results["cancel"].finish_reason == "cancelled"
    assert results["cancel"].text == "".join(sent) and 3 <= len(sent) <= 4
    assert results["long"].text == solo[0].text  # the neighbours' stop did not touch it


def test_a_job_that_others_leave_for_decodes_alone_and_the_batch_stops(
    engine: ModelEngine, solo: list[GenerationResult]
) -> None:
    """Background work pausing for a clinician: the clinician's job does not join the batch the
    others are leaving; it decodes alone, and the batch's thread stops once they are out."""
    assert engine.batch is not None
    leaving = threading.Event()
    results: dict[str, GenerationResult] = {}
    streaming = [threading.Event(), threading.Event()]

    def background(i: int) -> None:
        def on_text(_t: str) -> None:
            streaming[i].set()

        results[f"bg{i}"] = engine.generate(
            _ask(QUESTIONS[i]), LONG, on_text=on_text, should_stop=leaving.is_set
        )

    first = threading.Thread(target=background, args=(0,))
    first.start()
    assert streaming[0].wait(30)
    second = threading.Thread(target=background, args=(1,))
    second.start()
    assert streaming[1].wait(30)  # both decode in the batch now
    assert engine.batch.running()
    leaving.set()
    clinician = engine.generate(
        _ask(QUESTIONS[2]), LONG, on_text=lambda _t: None, others_leaving=True
    )
    for t in (first, second):
        t.join(60)
    assert clinician.path == "single"
    assert clinician.text == solo[2].text  # exactly its answer alone
    assert [results[k].finish_reason for k in ("bg0", "bg1")] == ["cancelled"] * 2
    assert results["bg1"].path == "batch"  # (the first may not have moved in before leaving)
    assert not engine.batch.running()  # stopped as they left, not after its idle delay
    # Everyone can come back: two jobs at once batch again, with the same answers.
    got = _first_then_others(engine, _ask(QUESTIONS[0]), [_ask(QUESTIONS[1])])
    assert [r.text for r in got] == [solo[0].text, solo[1].text]
    assert got[1].path == "batch"


def test_a_job_whose_batch_step_is_interrupted_goes_on_unchanged(
    engine: ModelEngine, solo: list[GenerationResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt abandons the step in flight and stops the batch's thread; a job in it that
    must not stop goes on from the ids it had, and its answer is the same as alone. It runs no
    full garbage collection on the way: in a warm worker one held the GIL ~10 ms while the
    clinician's prefill waited (docs/BENCHMARKS.md §11)."""
    assert engine.batch is not None
    results: dict[int, GenerationResult] = {}
    sent: dict[int, list[str]] = {0: [], 1: []}

    def run(i: int) -> None:
        results[i] = engine.generate(_ask(QUESTIONS[i]), LONG, on_text=sent[i].append)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(sent[1]) < 3 or not engine.batch.running():
        assert time.monotonic() < deadline, "the two jobs never decoded in the batch"
        time.sleep(0.001)
    collections: list[tuple[object, ...]] = []

    def collect(*args: object) -> int:
        collections.append(args)
        return 0

    monkeypatch.setattr(gc, "collect", collect)
    engine.batch.interrupt()
    monkeypatch.undo()
    assert not engine.batch.running()  # its thread is gone when interrupt() returns
    assert collections == []
    for t in threads:
        t.join(60)
    for i in (0, 1):
        assert results[i].text == solo[i].text == "".join(sent[i])
        assert results[i].completion_tokens == solo[i].completion_tokens
        assert results[i].finish_reason == "length"
    assert engine.healthy()


def test_the_model_keeps_one_attention_while_both_paths_decode(
    tiny_gemma_dir: Path, solo: list[GenerationResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths share the model, and its attention is one setting: it is never switched
    while the engine serves, since a forward on one path across a switch made on the other
    (the batch starting, stopping or interrupted) garbles the answer. An eager model, whose
    batch form builds no causal mask for the single path, runs SDPA on both from the start."""
    loaded = load_tiny(tiny_entry(tiny_gemma_dir, serving={"dtype": "float32"}), tiny_gemma_dir)
    loaded.model.set_attn_implementation("eager")
    engine = make_engine(loaded, 512, concurrency=4)
    try:
        assert loaded.model.config._attn_implementation == "sdpa"
        switches: list[object] = []
        monkeypatch.setattr(loaded.model, "set_attn_implementation", switches.append)
        engine.warmup()
        assert engine.batch is not None
        for _ in range(2):  # the batch starts, is interrupted or stops when idle, and restarts
            got = _first_then_others(engine, _ask(QUESTIONS[0]), [_ask(QUESTIONS[1])])
            assert [r.text for r in got] == [solo[0].text, solo[1].text]
            assert got[1].path == "batch"
            engine.batch.interrupt()  # (a no-op if its idle stop came first)
            alone = engine.generate(_ask(QUESTIONS[2]), LONG, on_text=lambda _t: None)
            assert alone.path == "single" and alone.text == solo[2].text
        assert switches == []
        assert loaded.model.config._attn_implementation == "sdpa"
    finally:
        engine.close()


def test_a_model_that_runs_only_eager_attention_is_told_to_turn_batching_off(
    tiny_gemma_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_tiny(tiny_entry(tiny_gemma_dir, serving={"dtype": "float32"}), tiny_gemma_dir)
    loaded.model.set_attn_implementation("eager")

    def no_sdpa(implementation: object) -> None:
        raise ValueError(f"{implementation} is not supported by this model")

    monkeypatch.setattr(loaded.model, "set_attn_implementation", no_sdpa)
    with pytest.raises(BatchUnavailable, match="WORKER_BATCHING=off"):
        make_engine(loaded, 512, concurrency=4)


def test_images_and_seeds_decode_alone_beside_the_batch(
    engine: ModelEngine, solo: list[GenerationResult]
) -> None:
    image = {IMAGE_KEY: Image.new("RGB", (32, 32), (200, 30, 30))}
    seeded = SamplingParams(temperature=1.0, max_new_tokens=16, seed=7)
    alone_image = engine.generate(
        _with_image("Describe it."), LONG, on_text=lambda _t: None, images=image
    )
    alone_seeded = engine.generate(_ask(QUESTIONS[3]), seeded, on_text=lambda _t: None)
    results: dict[str, GenerationResult] = {}
    streaming = threading.Event()

    def text_job() -> None:
        def on_text(_t: str) -> None:
            streaming.set()

        results["text"] = engine.generate(_ask(QUESTIONS[0]), LONG, on_text=on_text)

    def image_job() -> None:
        results["image"] = engine.generate(
            _with_image("Describe it."), LONG, on_text=lambda _t: None, images=image
        )

    def seeded_job() -> None:
        results["seeded"] = engine.generate(_ask(QUESTIONS[3]), seeded, on_text=lambda _t: None)

    t0 = threading.Thread(target=text_job)
    t0.start()
    assert streaming.wait(30)
    others = [threading.Thread(target=f) for f in (image_job, seeded_job)]
    for t in others:
        t.start()
    for t in [t0, *others]:
        t.join(60)
    assert results["image"].path == results["seeded"].path == "single"
    assert results["image"].text == alone_image.text
    # Decoding beside the batch, a seed is best effort (as in OpenAI's API): the batch's
    # sampler draws from the same generator. Alone it is exact (tests/test_engine.py).
    assert results["seeded"].completion_tokens == alone_seeded.completion_tokens
    # The text job made room for them: it went on in the batch, unchanged.
    assert results["text"].path == "single+batch"
    assert results["text"].text == solo[0].text


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_compiled_decoding_gives_the_eager_answers(loaded: LoadedModel, cache: str) -> None:
    """torch.compile of the decoding step, with the CPU's dynamic cache and with the static
    cache that CUDA graphs use on a GPU (compiled here by inductor, at toy size)."""
    eager = make_engine(loaded, 256)
    compiled = make_engine(loaded, 256, compile=True, cache=cache)
    try:
        compiled.warmup()
        assert compiled.single.compiled and compiled.single.cache_kind == cache
        image = {IMAGE_KEY: Image.new("RGB", (32, 32), (10, 120, 200))}
        for messages, images in (
            (_ask(QUESTIONS[0]), None),
            (_ask(QUESTIONS[2]), None),  # another prompt length: no recompile needed
            (_with_image("Describe it."), image),
        ):
            want = eager.generate(messages, LONG, on_text=lambda _t: None, images=images)
            got = compiled.generate(messages, LONG, on_text=lambda _t: None, images=images)
            assert got.text == want.text
            assert got.completion_tokens == want.completion_tokens
    finally:
        eager.close()
        compiled.close()
