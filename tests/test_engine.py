"""worker.engines with a real tiny Gemma 3 (random weights, the MedGemma classes) on the CPU.

The model's output is gibberish but deterministic under greedy decoding, which is all these
tests need: streaming, cancellation, length limits, stop strings and context trimming are
properties of the engine, not of the answer's quality.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from devstack.tiny_gemma import build_tiny_gemma
from shared.protocol import ChatMessage, SamplingParams, TextPart
from tests.engines import load_tiny, make_engine, one_torch_thread, tiny_entry  # noqa: F401
from worker.engines.base import PromptTooLong
from worker.engines.detokenize import DeltaStreamer
from worker.engines.model import ModelEngine
from worker.weights.loader import LoadedModel

# With the tiny model's seed-0 weights this prompt never produces an end-of-turn token within
# 30 greedy steps (checked in test_prompt_runs_to_the_length_limit).
PROMPT = "Hello! How are you today?"
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def _msg(role: str, text: str) -> ChatMessage:
    return ChatMessage(role=role, content=[TextPart(text=text)])  # type: ignore[arg-type]


def _load(folder: Path) -> LoadedModel:
    return load_tiny(tiny_entry(folder), folder)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def loaded(tiny_gemma_dir: Path) -> LoadedModel:
    return _load(tiny_gemma_dir)


@pytest.fixture(scope="module")
def engine(loaded: LoadedModel) -> Iterator[ModelEngine]:
    e = make_engine(loaded)
    yield e
    e.close()


class _Capture:
    """Wraps ``model.generate`` to keep the ids it returned."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.real = model.generate
        self.outputs: list[torch.Tensor] = []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.real(*args, **kwargs)
        self.outputs.append(out)
        return out


@pytest.fixture
def captured(loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Capture]:
    cap = _Capture(loaded.model)
    monkeypatch.setattr(loaded.model, "generate", cap)
    yield cap


# --- streaming ---------------------------------------------------------------------------------


def test_deltas_add_up_to_the_answer(
    engine: ModelEngine, loaded: LoadedModel, captured: _Capture
) -> None:
    deltas: list[str] = []
    result = engine.generate([_msg("user", PROMPT)], GREEDY, on_text=deltas.append)
    assert len(deltas) > 1  # streamed, not sent in one piece
    assert all(deltas)
    assert "".join(deltas) == result.text
    new_ids = captured.outputs[-1][0, result.prompt_tokens :].tolist()
    assert len(new_ids) == result.completion_tokens
    decoded = loaded.tokenizer.decode(new_ids, skip_special_tokens=True)
    # An undecodable tail (an incomplete UTF-8 sequence) is held back; nothing else differs.
    assert result.text == decoded.rstrip("\ufffd")
    assert result.text
    assert result.first_token_s is not None and result.first_token_s >= 0


def test_greedy_is_deterministic(engine: ModelEngine) -> None:
    first: list[str] = []
    second: list[str] = []
    a = engine.generate([_msg("user", PROMPT)], GREEDY, on_text=first.append)
    b = engine.generate([_msg("user", PROMPT)], GREEDY, on_text=second.append)
    assert a.text == b.text
    assert first == second
    assert a.completion_tokens == b.completion_tokens


def test_seeded_sampling_is_reproducible(engine: ModelEngine) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16, seed=1234)
    a = engine.generate([_msg("user", PROMPT)], params, on_text=lambda _t: None)
    b = engine.generate([_msg("user", PROMPT)], params, on_text=lambda _t: None)
    assert a.text == b.text


def test_should_stop_cancels(engine: ModelEngine) -> None:
    deltas: list[str] = []
    params = SamplingParams(temperature=0.0, max_new_tokens=30)
    result = engine.generate(
        [_msg("user", PROMPT)], params, on_text=deltas.append, should_stop=lambda: len(deltas) >= 3
    )
    assert result.finish_reason == "cancelled"
    # transformers checks stopping criteria before it streams the step's token, so the token
    # of the step that saw the flag may still arrive; nothing after it does.
    assert 3 <= len(deltas) <= 4
    assert result.completion_tokens <= 5
    assert result.text == "".join(deltas)


def test_prompt_runs_to_the_length_limit(engine: ModelEngine) -> None:
    long = engine.generate(
        [_msg("user", PROMPT)],
        SamplingParams(temperature=0.0, max_new_tokens=30),
        on_text=lambda _t: None,
    )
    assert long.finish_reason == "length"  # the premise of the tests that use PROMPT
    assert long.completion_tokens == 30


def test_max_new_tokens(engine: ModelEngine) -> None:
    deltas: list[str] = []
    result = engine.generate(
        [_msg("user", PROMPT)],
        SamplingParams(temperature=0.0, max_new_tokens=5),
        on_text=deltas.append,
    )
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5
    assert 1 <= len(deltas) <= 5


def test_stop_string_ends_generation(engine: ModelEngine) -> None:
    full = engine.generate([_msg("user", PROMPT)], GREEDY, on_text=lambda _t: None)
    # Pick a stop string from the middle of the greedy answer.
    words = full.text.split(" ")
    assert len(words) > 4
    stop = " " + words[3]
    cut = full.text.index(stop)
    deltas: list[str] = []
    params = SamplingParams(temperature=0.0, max_new_tokens=12, stop=[stop])
    result = engine.generate([_msg("user", PROMPT)], params, on_text=deltas.append)
    assert result.finish_reason == "stop"
    assert result.text == full.text[:cut]
    assert "".join(deltas) == result.text
    assert stop not in "".join(deltas)
    assert result.completion_tokens < full.completion_tokens


def test_system_message_and_history(engine: ModelEngine) -> None:
    messages = [
        _msg("system", "You are a helpful medical assistant."),
        _msg("user", "What is a fever?"),
        _msg("assistant", "A raised temperature."),
        _msg("user", PROMPT),
    ]
    result = engine.generate(messages, GREEDY, on_text=lambda _t: None)
    alone = engine.prompter.build([_msg("user", PROMPT)], 12)
    assert result.prompt_tokens > alone.prompt_tokens
    assert result.trimmed_messages == 0


def test_text_only_gemma(tmp_path: Path) -> None:
    """Gemma3ForCausalLM + tokenizer (no processor) goes through the tokenizer's template."""
    loaded = _load(build_tiny_gemma(tmp_path / "text-only", multimodal=False))
    engine = make_engine(loaded, 512)
    assert not engine.multimodal
    deltas: list[str] = []
    result = engine.generate(
        [_msg("system", "Be brief."), _msg("user", PROMPT)],
        SamplingParams(temperature=0.0, max_new_tokens=6),
        on_text=deltas.append,
    )
    assert result.completion_tokens <= 6
    assert "".join(deltas) == result.text


# --- context trimming ------------------------------------------------------------------------


def _history(pairs: int, last: str = "LAST-QUESTION what now?") -> list[ChatMessage]:
    messages = [_msg("system", "SYSTEM-RULE be careful.")]
    for i in range(pairs):
        messages.append(_msg("user", f"Q{i} cough?"))
        messages.append(_msg("assistant", f"A{i} rest."))
    messages.append(_msg("user", last))
    return messages


def test_long_history_is_trimmed_oldest_first(loaded: LoadedModel) -> None:
    small = make_engine(loaded, 120)
    messages = _history(6)
    full = make_engine(loaded, 100_000).prompter.build(messages, 30)
    assert full.prompt_tokens + 30 > 120  # the premise: it does not fit

    prompt = small.prompter.build(messages, 30)
    assert prompt.trimmed > 0
    assert prompt.prompt_tokens + 30 <= 120
    text = loaded.tokenizer.decode(prompt.inputs["input_ids"][0], skip_special_tokens=True)
    assert "SYSTEM-RULE" in text
    assert "LAST-QUESTION" in text
    assert "Q0 " not in text  # the oldest went first
    kept = [i for i in range(6) if f"Q{i} " in text]
    assert kept, text  # and not more than needed: the newest history stayed
    assert kept == list(range(6 - len(kept), 6))
    assert all(f"A{i} " in text for i in kept)
    assert prompt.trimmed == 2 * (6 - len(kept))  # whole question/answer pairs went
    # Dropping one pair fewer would not have fitted.
    one_more = [messages[0], *messages[-2 * len(kept) - 3 :]]
    assert make_engine(loaded, 100_000).prompter.build(one_more, 30).prompt_tokens + 30 > 120


def test_answer_budget_is_cut_to_the_context(loaded: LoadedModel) -> None:
    small = make_engine(loaded, 80)
    messages = _history(4, last=PROMPT)
    result = small.generate(
        messages, SamplingParams(temperature=0.0, max_new_tokens=500), on_text=lambda _t: None
    )
    assert result.trimmed_messages > 0
    assert result.finish_reason == "length"
    assert result.prompt_tokens + result.completion_tokens == 80


def test_an_open_ended_answer_runs_to_the_context(loaded: LoadedModel) -> None:
    """No limit asked for (an OpenAI request without max_tokens): max_new_tokens is only the
    room kept when trimming, and the answer may use all the context that is left."""
    small = make_engine(loaded, 80)
    asked = SamplingParams(temperature=0.0, max_new_tokens=5)
    capped = small.generate([_msg("user", PROMPT)], asked, on_text=lambda _t: None)
    free = small.generate(
        [_msg("user", PROMPT)],
        asked.model_copy(update={"open_ended": True}),
        on_text=lambda _t: None,
    )
    assert capped.completion_tokens == 5
    assert free.finish_reason == "length"
    assert free.prompt_tokens + free.completion_tokens == 80


def test_one_message_too_long(loaded: LoadedModel) -> None:
    small = make_engine(loaded, 120)
    huge = "the patient has a cough and a fever " * 40
    called: list[str] = []
    with pytest.raises(PromptTooLong) as info:
        small.generate(
            [
                _msg("system", "Be brief."),
                _msg("user", "hi"),
                _msg("assistant", "hello"),
                _msg("user", huge),
            ],
            GREEDY,
            on_text=called.append,
        )
    assert info.value.limit == 119
    assert info.value.prompt_tokens > 119
    message = str(info.value)
    assert f"{info.value.prompt_tokens} tokens" in message
    # the limit is named: the context window (120) or the prompt's share of it (119)
    assert re.search(r"\b(119|120) tokens\b", message), message
    assert huge not in str(info.value)
    assert called == []


# --- the streamer on its own -------------------------------------------------------------------


class _PieceTokenizer:
    """Decodes ids to fixed pieces; id 0 is a special token that decodes to nothing."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def _feed(streamer: DeltaStreamer, ids: list[int]) -> None:
    for i in ids:
        streamer.push([i])
        if streamer.stopped_by_string:
            break
    streamer.end()


def test_stop_string_split_across_deltas_is_never_sent() -> None:
    tok = _PieceTokenizer({1: "Hello ", 2: "ST", 3: "OP", 4: " more", 9: "p"})
    sent: list[str] = []
    streamer = DeltaStreamer(tok, sent.append, ("STOP",))
    _feed(streamer, [1, 2, 3, 4])
    assert streamer.stopped_by_string
    assert "".join(sent) == "Hello "
    assert all("S" not in s for s in sent)
    assert streamer.text == "Hello "


def test_held_back_prefix_is_sent_when_it_is_not_a_stop() -> None:
    tok = _PieceTokenizer({1: "Hello ", 2: "ST", 3: "AY", 4: " home", 9: "p"})
    sent: list[str] = []
    streamer = DeltaStreamer(tok, sent.append, ("STOP",))
    streamer.push([1])
    streamer.push([2])
    assert "".join(sent) == "Hello "  # "ST" may still become "STOP": held back
    streamer.push([3])
    streamer.push([4])
    streamer.end()
    assert not streamer.stopped_by_string
    assert "".join(sent) == "Hello STAY home"


def test_held_back_prefix_is_sent_at_the_end() -> None:
    tok = _PieceTokenizer({1: "Hello ", 2: "ST", 9: "p"})
    sent: list[str] = []
    _feed(DeltaStreamer(tok, sent.append, ("STOP",)), [1, 2])
    assert "".join(sent) == "Hello ST"


def test_stop_string_inside_one_delta() -> None:
    tok = _PieceTokenizer({1: "abc</s>def", 2: "ghi", 9: "p"})
    sent: list[str] = []
    streamer = DeltaStreamer(tok, sent.append, ("</s>",))
    _feed(streamer, [1, 2])
    assert "".join(sent) == "abc"
    assert streamer.stopped_by_string


def test_stop_string_at_the_very_start() -> None:
    tok = _PieceTokenizer({1: "</", 2: "s>", 3: "x", 9: "p"})
    sent: list[str] = []
    streamer = DeltaStreamer(tok, sent.append, ("</s>",))
    _feed(streamer, [1, 2, 3])
    assert sent == []
    assert streamer.stopped_by_string


def test_incomplete_utf8_is_held_back(loaded: LoadedModel) -> None:
    tok = loaded.tokenizer
    ids = tok.encode("Hello é", add_special_tokens=False)
    assert tok.decode(ids[-1:]) == "\ufffd"  # "é" is two byte tokens here
    sent: list[str] = []
    streamer = DeltaStreamer(tok, sent.append, ())
    for i in ids[:-1]:
        streamer.push([i])
    assert "\ufffd" not in "".join(sent)
    assert "".join(sent) == "Hello "
    streamer.push([ids[-1]])
    streamer.end()
    assert "".join(sent) == "Hello é"


def test_stop_string_with_the_real_tokenizer(loaded: LoadedModel) -> None:
    tok = loaded.tokenizer
    ids = tok.encode("The heart STOP is normal", add_special_tokens=False)
    sent: list[str] = []
    streamer = DeltaStreamer(tok, sent.append, ("STOP",))
    _feed(streamer, ids)
    assert streamer.stopped_by_string
    assert "".join(sent) == "The heart "


def test_stop_string_completed_in_the_held_back_tail_is_not_sent() -> None:
    # "ST" is held back as a possible start of "STOP"; the last token completes it together
    # with the first byte of a multi-byte character, so its text is held back too (it ends in
    # U+FFFD) and generation ends there. end() must not send "STOP".
    tok = _PieceTokenizer({1: "Hello ", 2: "ST", 3: "OP\ufffd", 9: "p"})
    sent: list[str] = []
    streamer = DeltaStreamer(tok, sent.append, ("STOP",))
    _feed(streamer, [1, 2, 3])
    assert "STOP" not in "".join(sent)
    assert "".join(sent) == "Hello "
