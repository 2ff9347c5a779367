"""The caller's own conversations: list, read, delete. Anyone else's is a 404."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import Response

from gateway.api.deps import PrincipalDep, StateDep
from gateway.core.errors import APIError
from gateway.core.types import CONVERSATION_ID
from gateway.services.conversations import ConversationSummary
from shared.errors import ErrorCode

router = APIRouter(tags=["conversations"])

ConversationId = Annotated[str, Path(pattern=CONVERSATION_ID)]


def _not_found(cid: str) -> APIError:
    return APIError(
        404,
        ErrorCode.CONVERSATION_NOT_FOUND,
        f"Conversation {cid!r} does not exist (or has expired).",
        param="conversation_id",
    )


@router.get("/conversations", summary="Your conversations, most recent first")
async def list_conversations(state: StateDep, principal: PrincipalDep) -> list[ConversationSummary]:
    return await state.conversations.list(principal.user_id)


@router.get("/conversations/{conversation_id}", summary="One of your conversations")
async def get_conversation(
    conversation_id: ConversationId, state: StateDep, principal: PrincipalDep
) -> dict[str, Any]:
    messages = await state.conversations.history(principal.user_id, conversation_id)
    if not messages:
        raise _not_found(conversation_id)
    return {
        "conversation_id": conversation_id,
        "messages": [{"role": m.role, "content": m.text} for m in messages],
    }


@router.delete("/conversations/{conversation_id}", status_code=204, summary="Erase one")
async def delete_conversation(
    conversation_id: ConversationId, state: StateDep, principal: PrincipalDep
) -> Response:
    if not await state.conversations.delete(principal.user_id, conversation_id):
        raise _not_found(conversation_id)
    return Response(status_code=204)
