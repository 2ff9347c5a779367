"""What the bench sends: the synthetic prompt, the request bodies of both APIs, the open loop's
arrival times, and the messages and sampling the gateway builds for a request (for the
in-process engine baseline)."""

from __future__ import annotations

import argparse
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from shared.protocol import ChatMessage, SamplingParams, TextPart
from shared.registry import ModelEntry

if TYPE_CHECKING:
    from gateway.api.medgemma.protocol import MedGemmaRequest

# Clinical and everyday words; the prompt cycles through them to reach --prompt-words words.
_WORDS = (
    "the patient is a 54 year old man with chest pain shortness of breath and a dry cough "
    "for three days blood pressure is 140 over 90 heart rate 98 temperature 38.2 the lungs "
    "are clear on both sides there is no pleural effusion the heart size is normal laboratory "
    "results show white blood cells 12.4 and C-reactive protein 85 he takes metformin and "
    "aspirin and is allergic to penicillin"
).split()


def synthetic_prompt(words: int) -> str:
    """A fixed prompt of exactly ``words`` words: a question, then filler from :data:`_WORDS`."""
    head = "Summarize these notes:".split()
    body = [_WORDS[i % len(_WORDS)] for i in range(max(0, words - len(head)))]
    return " ".join([*head, *body][: max(1, words)])


def request_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    """The body ``--api`` sends: :func:`openai_body` or :func:`medgemma_body`."""
    if args.api == "openai":
        return openai_body(
            args.model, prompt, system_message=args.system_message, max_tokens=args.max_tokens
        )
    return medgemma_body(args, prompt)


def medgemma_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "user_message": [{"type": "text", "text": prompt}],
        "temperature": 0,
        "stream": True,
    }
    if args.verbosity is not None:
        body["verbosity"] = args.verbosity
    if args.system_message:
        body["system_message"] = args.system_message
    return body


def openai_body(
    model: str, prompt: str, *, system_message: str | None = None, max_tokens: int | None = None
) -> dict[str, Any]:
    """The same turn as a streamed, greedy OpenAI chat completion with usage (any
    OpenAI-compatible server)."""
    messages: list[dict[str, str]] = []
    if system_message:
        messages.append({"role": "system", "content": system_message})
    messages.append({"role": "user", "content": prompt})
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if max_tokens:
        body["max_tokens"] = max_tokens
    return body


def arrival_gaps(rate: float, seed: int) -> Iterator[float]:
    """The open loop's gaps between two requests: exponential, mean ``1 / rate`` seconds
    (Poisson arrivals), the same sequence for the same ``seed``."""
    rng = random.Random(seed)
    while True:
        yield rng.expovariate(rate)


def engine_inputs(
    body: dict[str, Any], entry: ModelEntry
) -> tuple[list[ChatMessage], SamplingParams]:
    """The messages and sampling the gateway builds for ``body`` (the gateway's own code)."""
    from gateway.api.medgemma.protocol import MedGemmaRequest
    from gateway.api.medgemma.serving import sampling_for

    req: MedGemmaRequest = MedGemmaRequest.model_validate({**body, "model": entry.model_name})
    sampling, hint = sampling_for(req, entry)
    # As gateway.api.medgemma.serving._system: the request's system message, else the model's
    # default one, then the verbosity hint. The report checks the result: the stack's prompt
    # token count (from the done usage) must equal the engine's.
    default = getattr(entry.serving, "default_system_message", None)
    system = "\n\n".join(p for p in (req.system_message or default or "", hint) if p)
    messages: list[ChatMessage] = []
    if system:
        messages.append(ChatMessage(role="system", content=[TextPart(text=system)]))
    messages.append(
        ChatMessage(role="user", content=[TextPart(text=p["text"]) for p in body["user_message"]])
    )
    return messages, sampling
