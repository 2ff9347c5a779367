"""Every Redis key and channel name the stack uses, in one place.

Layout (``{p}`` is the key prefix, ``mg`` by default):

========================================  ==========  =============================================
key                                       type        what
========================================  ==========  =============================================
``{p}:job:{job_id}:events``               channel     live token events of one job (pub/sub)
``{p}:job:{job_id}:log``                  stream      the same events, kept for replay (TTL)
``{p}:job:{job_id}:claim``                string      the worker that runs the job (SET NX, TTL)
``{p}:job:{job_id}:meta``                 string      owner, API format and outcome (JobMeta, TTL)
``{p}:job:{job_id}:payload``              string      the Job itself, to hand it over (TTL)
``{p}:job:{job_id}:handover:{n}``         string      guard: the n-th handover was sent (TTL)
``{p}:job:{job_id}:promoted``             string      guard: background job sent again, promoted
``{p}:job:{job_id}:cancel``               string      set when the job is cancelled (TTL)
``{p}:job:{job_id}:watchers``             string      open SSE streams of the job (TTL)
``{p}:cancel``                            channel     job ids to cancel, heard by every worker
``{p}:job:{job_id}:image:{n}``            string      bytes of the job's n-th image (TTL; deleted
                                                      by the worker when the job ends)
``{p}:queue:{model}``                     zset        job ids waiting for a worker, by enqueue time
``{p}:queue:{model}@background``          zset        the same for background work (after the above)
``{p}:starts:{model}``                    zset        job ids started in the last minute
``{p}:workers:{model}``                   zset        worker ids by last heartbeat time
``{p}:worker:{worker_id}``                string      that worker's last heartbeat (TTL)
``{p}:conv:{owner}:{conversation_id}``    list        the conversation's messages (JSON, TTL)
``{p}:conv:{owner}:{conversation_id}:lock``  string   job id of the turn in progress (TTL)
``{p}:conv:{owner}:{cid}:jobs``           set         the conversation's job ids (for erasure, TTL)
``{p}:convs:{owner}``                     zset        conversation ids of one owner by last use
========================================  ==========  =============================================

``owner`` is a hash of the user id, so user ids never appear in key names and a client's
conversation id cannot collide with another user's.
"""

from __future__ import annotations

import hashlib

MAX_HANDOVERS = 2  # how many times a job may move to another worker after a worker died
DONE_PREFIX = "done:"  # a finished job's claim: ``done:<worker id>`` (it never runs again)


def owner_tag(user_id: str) -> str:
    """A stable, opaque tag for a user id, safe to put in a key name."""
    return hashlib.sha256(user_id.encode()).hexdigest()[:24]


class Keys:
    """Builds key and channel names under one prefix."""

    def __init__(self, prefix: str = "mg") -> None:
        self.prefix = prefix

    def job_channel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:events"

    def job_log(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:log"

    def job_image(self, job_id: str, n: int) -> str:
        return f"{self.prefix}:job:{job_id}:image:{n}"

    def job_meta(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:meta"

    def job_payload(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:payload"

    def job_handover(self, job_id: str, n: int) -> str:
        return f"{self.prefix}:job:{job_id}:handover:{n}"

    def job_promoted(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:promoted"

    def job_cancel(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:cancel"

    def job_watchers(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:watchers"

    @property
    def cancel_channel(self) -> str:
        return f"{self.prefix}:cancel"

    def job_claim(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:claim"

    def workers(self, model: str) -> str:
        return f"{self.prefix}:workers:{model}"

    def queue_book(self, model: str, priority: str = "interactive") -> str:
        """The model's line of ``priority`` (model names cannot hold ``@``)."""
        book = f"{self.prefix}:queue:{model}"
        return book if priority == "interactive" else f"{book}@{priority}"

    def queue_starts(self, model: str) -> str:
        return f"{self.prefix}:starts:{model}"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def conversation(self, user_id: str, conversation_id: str) -> str:
        return f"{self.prefix}:conv:{owner_tag(user_id)}:{conversation_id}"

    def conversation_lock(self, user_id: str, conversation_id: str) -> str:
        return f"{self.conversation(user_id, conversation_id)}:lock"

    def conversation_jobs(self, user_id: str, conversation_id: str) -> str:
        return f"{self.conversation(user_id, conversation_id)}:jobs"

    def job_keys(self, job_id: str) -> list[str]:
        """Every per-job key that may hold data, for erasure."""
        base = f"{self.prefix}:job:{job_id}"
        kinds = ("log", "meta", "payload", "claim", "cancel", "watchers", "promoted")
        return [f"{base}:{s}" for s in kinds] + [
            f"{base}:handover:{n}" for n in range(1, MAX_HANDOVERS + 1)
        ]

    def conversations(self, user_id: str) -> str:
        return f"{self.prefix}:convs:{owner_tag(user_id)}"
