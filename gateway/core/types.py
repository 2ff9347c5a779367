"""Small shared names of the gateway: id patterns both APIs and the routes accept, and the image
limits the settings hold."""

from __future__ import annotations

from dataclasses import dataclass

#: A conversation id as clients send it (body field, header or path).
CONVERSATION_ID = r"^[A-Za-z0-9._-]{1,128}$"
#: A job id (``shared.protocol.Job.job_id``) in a path.
JOB_ID = r"^[A-Za-z0-9_-]{8,64}$"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
