"""The inference engine: chat template in, streamed text deltas out. No Celery, no Redis.

One :class:`Engine` wraps one loaded model (see :mod:`worker.loader`) and runs one
generation at a time under a lock; a job's text reaches the caller through ``on_text`` as
soon as each token decodes to printable text.

Decisions worth knowing:

* **Incremental detokenization** follows TGI's two-offset method: decode a short window of
  recent ids and emit only the new suffix, holding back text while it ends in an incomplete
  UTF-8 sequence (``\\ufffd``). Decoding the whole answer per token would be quadratic.
* **Stopping** is cooperative: a :class:`transformers.StoppingCriteria` calls ``should_stop``
  between decoding steps (a local flag set by the caller; no I/O per token), and stop strings
  are matched on the text, holding back any suffix that may still become a stop string, so
  the stop string itself is never sent.
* **Context**: if the prompt plus the answer budget do not fit the model's context, the oldest
  turns are dropped first (the system message and the last user turn are kept) using the
  tokenizer's real counts; the answer budget is then cut to what is left. If the last turn
  alone does not fit, :class:`PromptTooLong` is raised before anything runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from shared.protocol import ChatMessage, ImagePart, SamplingParams, TextPart
from worker.loader import LoadedModel

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]

# End-of-turn markers of the chat formats we serve (Gemma, ChatML, Llama 3).
_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")
_MIN_ANSWER_TOKENS = 1


class GenerationEngine(Protocol):
    """What the job runner needs from an engine (the model one, or the load-test one)."""

    def generate(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        *,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool] = ...,
        images: Mapping[str, Image.Image] | None = None,
        continue_text: str = "",
    ) -> GenerationResult: ...


class ImagesNotSupported(ValueError):
    """The prompt has images but this model has no vision tower."""

    def __init__(self) -> None:
        super().__init__("this model cannot read images; send text only")


class PromptTooLong(ValueError):
    """The newest message alone does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(
            f"The prompt is {prompt_tokens} tokens long, but this model's context window is "
            f"{limit + _MIN_ANSWER_TOKENS} tokens, which must also hold the answer. Shorten "
            "the message."
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


@dataclass
class GenerationResult:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    text: str
    first_token_s: float | None = None
    trimmed_messages: int = 0


@dataclass
class _Prompt:
    inputs: dict[str, Any]
    prompt_tokens: int
    trimmed: int


class _StopFlag(StoppingCriteria):
    """Ends generation between two decoding steps when the callback says so."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self._should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kw: Any) -> Any:
        stop = self._should_stop()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


@dataclass
class _DeltaStreamer(BaseStreamer):
    """Receives token ids from ``generate`` and hands printable text deltas to ``on_text``."""

    tokenizer: Any
    on_text: Callable[[str], None]
    stop_strings: Sequence[str]
    ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    seen_prompt: bool = False
    pending: str = ""  # text held back because it may be the start of a stop string
    text: str = ""  # everything sent so far
    stopped_by_string: bool = False
    first_token_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate() first passes the prompt
            self.seen_prompt = True
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if self.stopped_by_string:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        delta = self._decode_step()
        if delta:
            self._offer(delta)

    def end(self) -> None:
        if self.stopped_by_string:
            return
        tail = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        head = self.tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        rest = tail[len(head) :] if tail.startswith(head) else ""
        rest = rest.replace("\ufffd", "")
        if rest:
            self._offer(rest)  # the tail may complete a stop string
        if self.pending and not self.stopped_by_string:
            self._send(self.pending)
        self.pending = ""

    def _decode_step(self) -> str:
        head = self.tokenizer.decode(
            self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True
        )
        full: str = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(full) > len(head) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(head) :]
        return ""

    def _offer(self, delta: str) -> None:
        if not self.stop_strings:
            self._send(delta)
            return
        buf = self.pending + delta
        for stop in self.stop_strings:
            at = buf.find(stop)
            if at >= 0:
                if at:
                    self._send(buf[:at])
                self.pending = ""
                self.stopped_by_string = True
                return
        # Hold back the longest suffix that is a prefix of some stop string.
        keep = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(buf)), 0, -1):
                if buf.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        cut = len(buf) - keep
        if cut:
            self._send(buf[:cut])
        self.pending = buf[cut:]

    def _send(self, text: str) -> None:
        self.text += text
        self.on_text(text)


class Engine:
    """Generates answers with one loaded model, one request at a time."""

    def __init__(self, loaded: LoadedModel, *, context_length: int) -> None:
        self.loaded = loaded
        self.context_length = context_length
        self._lock = threading.Lock()
        tok = loaded.tokenizer
        eos: set[int] = set()
        gen_eos = loaded.model.generation_config.eos_token_id
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif gen_eos:
            eos.update(int(i) for i in gen_eos)
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        vocab = tok.get_vocab()
        eos.update(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab)
        self.eos_token_ids = sorted(eos)
        self.pad_token_id = (
            tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_ids[0]
        )

    @property
    def multimodal(self) -> bool:
        return self.loaded.processor is not None

    # -- prompt -----------------------------------------------------------------------------

    def _template_messages(
        self, messages: Sequence[ChatMessage], images: Mapping[str, Image.Image]
    ) -> list[dict[str, Any]]:
        if not self.multimodal:
            if any(m.images for m in messages):
                raise ImagesNotSupported()
            return [{"role": m.role, "content": m.text} for m in messages]
        out = []
        for m in messages:
            content: list[dict[str, Any]] = []
            for p in m.content:
                if isinstance(p, ImagePart):
                    content.append({"type": "image", "image": images[p.key]})
                else:
                    content.append({"type": "text", "text": p.text})
            out.append({"role": m.role, "content": content})
        return out

    def _encode(
        self, messages: Sequence[ChatMessage], images: Mapping[str, Image.Image]
    ) -> dict[str, Any]:
        chat = self._template_messages(messages, images)
        templater = self.loaded.processor if self.multimodal else self.loaded.tokenizer
        assert templater is not None
        # A final assistant message is an answer to continue (a handed-over job).
        cont = bool(messages) and messages[-1].role == "assistant"
        enc: Any = templater.apply_chat_template(
            chat,
            add_generation_prompt=not cont,
            continue_final_message=cont,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        return dict(enc)

    def build_prompt(
        self,
        messages: Sequence[ChatMessage],
        max_new_tokens: int,
        images: Mapping[str, Image.Image] | None = None,
    ) -> _Prompt:
        """Encode the chat, dropping the oldest turns until prompt + answer budget fit."""
        system = [m for m in messages if m.role == "system"][:1]
        turns = [m for m in messages if m.role != "system"]
        limit = self.context_length - _MIN_ANSWER_TOKENS
        budget = min(max_new_tokens, self.context_length // 2)
        trimmed = 0
        while True:
            inputs = self._encode([*system, *turns], images or {})
            n = int(inputs["input_ids"].shape[-1])
            if n + budget <= self.context_length or len(turns) <= 1:
                break
            # Drop the oldest turn; keep the history starting with a user turn.
            turns = turns[1:]
            trimmed += 1
            while len(turns) > 1 and turns[0].role != "user":
                turns = turns[1:]
                trimmed += 1
        if n > limit:
            raise PromptTooLong(n, limit)
        return _Prompt(inputs=inputs, prompt_tokens=n, trimmed=trimmed)

    def continuation(
        self, messages: Sequence[ChatMessage], sampling: SamplingParams, continue_text: str
    ) -> tuple[Sequence[ChatMessage], SamplingParams, int]:
        """For a handed-over job: the partial answer as a final assistant message (the chat
        template continues it), the answer budget minus its tokens, and that token count."""
        if not continue_text:
            return messages, sampling, 0
        done = len(self.loaded.tokenizer(continue_text, add_special_tokens=False)["input_ids"])
        partial = ChatMessage(role="assistant", content=[TextPart(text=continue_text)])
        left = max(1, sampling.max_new_tokens - done)
        return [*messages, partial], sampling.model_copy(update={"max_new_tokens": left}), done

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[ChatMessage],
        sampling: SamplingParams,
        *,
        on_text: Callable[[str], None],
        should_stop: Callable[[], bool] = lambda: False,
        images: Mapping[str, Image.Image] | None = None,
        continue_text: str = "",
    ) -> GenerationResult:
        """Run one generation; ``on_text`` gets each text delta as soon as it is printable.

        ``images`` maps the key of each :class:`ImagePart` in ``messages`` to its image.
        ``continue_text`` is an answer already sent by a worker that was lost: it is
        prefilled as the start of the answer and generation goes on from it."""
        messages, sampling, done_tokens = self.continuation(messages, sampling, continue_text)
        prompt = self.build_prompt(messages, sampling.max_new_tokens, images)
        max_new = max(
            _MIN_ANSWER_TOKENS,
            min(sampling.max_new_tokens, self.context_length - prompt.prompt_tokens),
        )
        streamer = _DeltaStreamer(self.loaded.tokenizer, on_text, tuple(sampling.stop))
        cancelled = threading.Event()

        def stop_now() -> bool:
            if streamer.stopped_by_string:
                return True
            if should_stop():
                cancelled.set()
                return True
            return False

        device = self.loaded.model.device
        inputs = {k: v.to(device) if hasattr(v, "to") else v for k, v in prompt.inputs.items()}
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new,
            "eos_token_id": self.eos_token_ids,
            "pad_token_id": self.pad_token_id,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_StopFlag(stop_now)]),
        }
        if sampling.temperature > 0:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with self._lock:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            started = time.perf_counter()
            with torch.inference_mode():
                model: Any = self.loaded.model
                out = model.generate(**inputs, **kwargs)
        new_ids = out[0, prompt.prompt_tokens :].tolist()
        completion = len(new_ids)
        if cancelled.is_set():
            reason: FinishReason = "cancelled"
        elif streamer.stopped_by_string or (new_ids and new_ids[-1] in self.eos_token_ids):
            reason = "stop"
        else:
            reason = "length"
        first = None if streamer.first_token_at is None else streamer.first_token_at - started
        return GenerationResult(
            finish_reason=reason,
            prompt_tokens=prompt.prompt_tokens - done_tokens,
            completion_tokens=completion + done_tokens,
            text=continue_text + streamer.text,
            first_token_s=first,
            trimmed_messages=prompt.trimmed,
        )
