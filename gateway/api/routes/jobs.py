"""The caller's own jobs: cancel one, or resume its stream after a dropped connection.

``GET /jobs/{id}/events`` with ``Last-Event-ID: N`` replays exactly the events after N from the
job's log, in the format of the original stream (seed or OpenAI), then follows it live. Jobs of
other users are 404s.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from gateway.api.answer import Framing, sse_response
from gateway.api.deps import AuditDep, PrincipalDep, StateDep, admission
from gateway.api.medgemma.framing import SeedFraming
from gateway.api.openai.framing import ChunkFraming
from gateway.core.errors import APIError
from gateway.core.types import JOB_ID
from gateway.services.following import JobStream
from shared.errors import ErrorCode
from shared.keys import owner_tag
from shared.protocol import JobMeta

router = APIRouter(tags=["jobs"])

JobId = Annotated[str, Path(pattern=JOB_ID)]


async def _own_job(state: StateDep, principal: PrincipalDep, job_id: str) -> JobMeta:
    meta = await state.jobs.meta(job_id)
    if meta is None or meta.owner != owner_tag(principal.user_id):
        raise APIError(404, ErrorCode.NOT_FOUND, f"Job {job_id!r} does not exist (or has expired).")
    return meta


@router.post("/jobs/{job_id}/cancel", status_code=202, summary="Stop a job; frees the GPU")
async def cancel_job(
    job_id: JobId, state: StateDep, principal: PrincipalDep, audit: AuditDep
) -> JSONResponse:
    audit.job(job_id)
    await _own_job(state, principal, job_id)
    await state.jobs.cancel(job_id)
    return JSONResponse({"job_id": job_id, "status": "cancelling"}, status_code=202)


@router.get("/jobs/{job_id}/events", summary="Resume a job's stream after Last-Event-ID")
async def job_events(
    job_id: JobId,
    state: StateDep,
    principal: PrincipalDep,
    audit: AuditDep,
    last_event_id: Annotated[int, Header(ge=0)] = 0,
) -> EventSourceResponse:
    meta = await _own_job(state, principal, job_id)
    audit.job(job_id, model=meta.model, conversation_id=meta.conversation_id)
    async with admission(state, principal, stream=True) as slot:
        timer = state.metrics.stream(meta.model, audit.started, new_turn=False)  # open streams only
        stream = await JobStream.resume(
            state.jobs,
            job_id,
            last_event_id,
            hold=slot.hand_over(),
            audit=audit,
            observer=timer,
        )
        return sse_response(
            stream,
            _framing(meta, resumed=last_event_id > 0),
            headers={"X-Job-Id": job_id},
            ping_s=state.settings.gateway_ping_s,
        )


def _framing(meta: JobMeta, *, resumed: bool) -> Framing:
    """The format the job's stream was asked in."""
    if meta.api == "openai":
        completion_id = f"chatcmpl-{meta.job_id}"
        return ChunkFraming(
            completion_id, meta.model, meta.created, meta.include_usage, opening=not resumed
        )
    return SeedFraming(meta.model, meta.conversation_id)
