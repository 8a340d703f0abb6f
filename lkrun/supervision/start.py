"""A job's start message (the job pipe's ``start``), made from what the supervisor holds.

A pure function: the job's record, the answer its offer was given, LiveKit's assignment and
the agent's settings in, the message out. No callback: the way from an assignment to the
job's start does not go back to the agent host.
"""

from __future__ import annotations

import base64
from typing import Any, Protocol

from google.protobuf.json_format import MessageToDict
from livekit.protocol import agent as proto

from lkrun.decisions import Acceptance
from lkrun.jobs.book import JobRecord


class StartRules(Protocol):
    """The manifest's part of a start message (an AgentSpec is one)."""

    @property
    def participant_metadata(self) -> str: ...

    @property
    def empty_timeout(self) -> float: ...

    def display_name(self) -> str: ...


# A job's bytes go in its start up to this size: beyond, the copy would eat into the pipe's
# 4 MiB that large metadata needs, for a saving that no longer counts.
JOB_PB_LIMIT = 64 * 1024


def _job_bytes(job: proto.Job) -> dict[str, str]:
    """The job as protobuf bytes, ``job_pb``: lkrun's runner parses them in microseconds,
    where protobuf's JSON mapping takes half a millisecond (benchmarks/issue20-offer-prep)."""
    packed = job.SerializeToString()
    return {"job_pb": base64.b64encode(packed).decode()} if len(packed) <= JOB_PB_LIMIT else {}


def start_message(
    *,
    record: JobRecord,
    answer: Acceptance | None,
    assignment: proto.JobAssignment,
    rules: StartRules,
    url: str,
    shutdown_timeout: float,
) -> dict[str, Any]:
    """``answer`` is None for an assignment without an offer of ours (its slot expired, or
    it was answered on a connection since lost): the agent's own values stand in."""
    return {
        "job": MessageToDict(assignment.job),
        **_job_bytes(assignment.job),
        # The open-source server leaves the assignment's url empty: the configured one.
        "url": assignment.url or url,
        "token": assignment.token,
        "identity": record.identity,
        "agent": record.agent,
        "shutdown_timeout": shutdown_timeout,
        # Alone in its room that long, the job ends itself (lkrun.shared.empty_room); 0: off.
        "empty_timeout": rules.empty_timeout,
        # For a livekit-agents job's RunningJobInfo: how it was accepted, and when.
        "name": answer.name if answer else rules.display_name(),
        "metadata": answer.metadata if answer else rules.participant_metadata,
        "attributes": dict(answer.attributes) if answer else {},
        "worker_id": record.worker_id,
        # A redispatch of a failed job (lkrun.recovery): which job it replaces ("" if none),
        # and its attempt (0 for a call's first job).
        "recovered_from": record.recovered_from,
        "attempt": record.attempt,
        "received_at": record.offered_at or 0.0,
        "assigned_at": record.accepted_at,
    }
