"""From chat messages to token ids: the chat template, context trimming and continuation.

* **Context**: if the prompt plus the answer budget do not fit the model's context, the oldest
  turns are dropped first (the system message and the last user turn are kept) using the
  tokenizer's real counts; the answer budget is then cut to what is left (or is all that is
  left, for a request that asked for no limit: ``SamplingParams.open_ended``). If the last turn
  alone does not fit, :class:`~worker.engines.base.PromptTooLong` is raised before anything
  runs.
* **Continuation**: a job handed over from a lost worker carries the text already streamed; it
  becomes a final assistant message that the chat template continues
  (``continue_final_message``), and the answer budget shrinks by its tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from shared.protocol import ChatMessage, ImagePart, SamplingParams, TextPart
from worker.engines.base import (
    MIN_ANSWER_TOKENS,
    Continuation,
    ImagesNotSupported,
    PromptTooLong,
)
from worker.engines.detokenize import DeltaStreamer
from worker.weights.loader import LoadedModel

# End-of-turn markers of the chat formats we serve (Gemma, ChatML, Llama 3).
_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>")


@dataclass
class Prompt:
    """An encoded prompt: the model inputs (ids, mask, pixel values), their length, how many
    old messages were dropped to fit the context, and how many images it was given."""

    inputs: dict[str, Any]
    prompt_tokens: int
    trimmed: int
    images: int = 0

    @property
    def ids(self) -> list[int]:
        ids: list[int] = self.inputs["input_ids"][0].tolist()
        return ids


class Prompter:
    """Encodes chats for one loaded model with its context length."""

    def __init__(self, loaded: LoadedModel, *, context_length: int) -> None:
        self.loaded = loaded
        self.context_length = context_length
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
        self.pad_token_id: int = (
            tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_ids[0]
        )

    @property
    def multimodal(self) -> bool:
        return self.loaded.processor is not None

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

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

    def build(
        self,
        messages: Sequence[ChatMessage],
        max_new_tokens: int,
        images: Mapping[str, Image.Image] | None = None,
    ) -> Prompt:
        """Encode the chat, dropping the oldest turns until prompt + answer budget fit."""
        system = [m for m in messages if m.role == "system"][:1]
        turns = [m for m in messages if m.role != "system"]
        limit = self.context_length - MIN_ANSWER_TOKENS
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
        return Prompt(inputs=inputs, prompt_tokens=n, trimmed=trimmed, images=len(images or {}))

    def budget(self, prompt: Prompt, max_new_tokens: int, *, open_ended: bool = False) -> int:
        """The answer's token budget: what was asked, cut to what the context has left (all
        of it when ``open_ended``: no limit was asked for)."""
        left = self.context_length - prompt.prompt_tokens
        return max(MIN_ANSWER_TOKENS, left if open_ended else min(max_new_tokens, left))

    def continuation(
        self, messages: Sequence[ChatMessage], sampling: SamplingParams, continue_text: str
    ) -> Continuation:
        """For a handed-over job: the partial answer as a final assistant message (the chat
        template continues it: it is prefilled), the answer budget minus its tokens, and that
        token count."""
        if not continue_text:
            return Continuation(messages, sampling)
        done = len(self.loaded.tokenizer(continue_text, add_special_tokens=False)["input_ids"])
        partial = ChatMessage(role="assistant", content=[TextPart(text=continue_text)])
        left = max(1, sampling.max_new_tokens - done)
        return Continuation(
            [*messages, partial],
            sampling.model_copy(update={"max_new_tokens": left}),
            done_tokens=done,
            prefilled=True,
        )

    def text_stream(
        self, on_text: Callable[[str], None], stop_strings: Sequence[str]
    ) -> DeltaStreamer:
        """Ids to printable text deltas with this tokenizer, stop strings cut."""
        return DeltaStreamer(self.tokenizer, on_text, tuple(stop_strings))
