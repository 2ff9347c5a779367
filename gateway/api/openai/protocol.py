"""Schemas of OpenAI's Chat Completions API, as far as this gateway serves it.

Unknown fields are accepted and ignored, as OpenAI's API does. Fields that exist in OpenAI's
API but that this gateway cannot honour (``n`` > 1, tools, logprobs, a JSON response format,
logit bias, penalties) are declared here so :mod:`.serving` can refuse them by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gateway.core.types import CONVERSATION_ID
from shared.protocol import Priority


def _from_vllm_priority(value: object) -> object:
    """vLLM's ``priority`` is an integer, lower first, 0 by default: a client that marks its
    side work with a higher number gets background work here."""
    if isinstance(value, int) and not isinstance(value, bool):
        return "background" if value > 0 else "interactive"
    return value


VllmPriority = Annotated[Priority, BeforeValidator(_from_vllm_priority)]


class TextContent(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str = Field(min_length=1)
    detail: str | None = None


class ImageContent(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["image_url"]
    image_url: ImageURL


Content = Annotated[TextContent | ImageContent, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Content] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, max_length=64)
    messages: list[Message] = Field(min_length=1, max_length=512)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    conversation_id: str | None = Field(
        default=None,
        pattern=CONVERSATION_ID,
        description="Extension: keep history on the server (also as X-Conversation-Id).",
    )
    priority: VllmPriority | None = Field(
        default=None,
        description="Extension: background gives way to interactive work; default: the API "
        "key's default (interactive unless configured). vLLM's integer form is taken too: "
        "above 0 is background, 0 or below interactive.",
    )
    service_tier: Literal["auto", "default", "flex", "priority", "scale"] | None = Field(
        default=None, description='OpenAI\'s tier: "flex" is background work, the rest interactive.'
    )
    # Known but unsupported: refused by name when set to a non-default value.
    n: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    audio: Any = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: str
    logprobs: None = None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
