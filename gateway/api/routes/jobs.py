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

from gateway.deps import AuditDep, PrincipalDep, StateDep, admission
from gateway.errors import APIError
from gateway.medgemma.serving import seed_farewell, seed_frame
from gateway.openai_api.serving import DONE_FRAME, ChunkWriter, openai_farewell
from gateway.streaming import JobStream
from shared.errors import ErrorCode
from shared.keys import owner_tag
from shared.protocol import JobMeta

router = APIRouter(tags=["jobs"])

JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{8,64}$")]


async def _own_job(state: StateDep, principal: PrincipalDep, job_id: str) -> JobMeta:
    meta = await state.chat.jobs.meta(job_id)
    if meta is None or meta.owner != owner_tag(principal.user_id):
        raise APIError(404, ErrorCode.NOT_FOUND, f"Job {job_id!r} does not exist (or has expired).")
    return meta


@router.post("/jobs/{job_id}/cancel", status_code=202, summary="Stop a job; frees the GPU")
async def cancel_job(
    job_id: JobId, state: StateDep, principal: PrincipalDep, audit: AuditDep
) -> JSONResponse:
    audit.job_id = job_id
    await _own_job(state, principal, job_id)
    await state.chat.jobs.cancel(job_id)
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
    audit.job_id, audit.model, audit.conversation_id = job_id, meta.model, meta.conversation_id
    async with admission(state, principal, stream=True) as slot:
        timer = state.metrics.stream(meta.model, audit.started, new_turn=False)  # open streams only
        stream = await JobStream.resume(
            state.chat.jobs,
            job_id,
            last_event_id,
            hold=slot.hand_over(),
            audit=audit,
            observer=timer,
        )
        headers = {"X-Job-Id": job_id}
        ping = state.settings.gateway_ping_s
        if meta.api == "openai":
            writer = ChunkWriter(f"chatcmpl-{job_id}", meta.model, meta.created, meta.include_usage)
            first = [writer.first()] if last_event_id == 0 else []
            return stream.sse(
                writer.frames,
                headers=headers,
                ping_s=0,  # see ChunkWriter: keep-alive comments break the SDKs after an id
                first=first,
                last=[DONE_FRAME],
                farewell=openai_farewell,
            )
        cid = meta.conversation_id
        return stream.sse(
            lambda e: [seed_frame(e, meta.model, cid)],
            headers=headers,
            ping_s=ping,
            farewell=seed_farewell,
        )
