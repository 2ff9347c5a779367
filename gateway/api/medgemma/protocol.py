"""Request and response schemas of ``POST /medgemma`` (the seed's API).

Every field of the seed's request body is accepted; unknown fields are refused (422) so a
typo never silently changes nothing. Fields a model does not support are refused with 400 by
:mod:`gateway.api.medgemma.serving`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.core.types import CONVERSATION_ID
from shared.protocol import Priority, Usage


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str = Field(min_length=1, max_length=200_000)


class ImagePart(BaseModel):
    """An image as a base64 data: URL (PNG or JPEG), for models with the image capability."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["image"]
    data_url: str = Field(min_length=1, description="data:image/png;base64,... (or image/jpeg)")


UserPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class MedGemmaRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conversation_id: str | None = Field(
        default=None,
        pattern=CONVERSATION_ID,
        description="Continue this conversation (created if new); omitted: a new one.",
    )
    model: str = Field(min_length=1, max_length=64)
    in_billing: float | str = Field(
        default=0, description="Must match the registry's price if non-zero (0 = not checked)."
    )
    out_billing: float | str = 0
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="0 is greedy; default 0.7."
    )
    reason: int = Field(default=0, ge=0, le=3, description="Reasoning effort; 0 = off.")
    verbosity: int | None = Field(
        default=None, ge=0, le=3, description="0 terse, 1 brief, 2 normal (default), 3 detailed."
    )
    system_message: str | None = Field(default=None, max_length=20_000)
    user_message: list[UserPart] = Field(min_length=1, max_length=64)
    inference: bool = False
    search: bool = False
    deep_research: bool = False
    dan: bool = False
    mcp: list[Any] = Field(default_factory=list, max_length=64)
    stream: bool = True
    priority: Priority | None = Field(
        default=None,
        description="background: give way to interactive work (titles, summaries, batch "
        "jobs); default: the API key's default, interactive unless configured.",
    )


class MedGemmaResponse(BaseModel):
    """The non-streaming answer."""

    conversation_id: str
    model: str
    content: str
    usage: Usage
    finish_reason: str
    job_id: str
    disclaimer: str | None = None
