"""The job's start message, a pure function of what the supervisor holds (no agent host)."""

from __future__ import annotations

import base64

from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.decisions import Acceptance
from lkrun.jobs.book import JobRecord
from lkrun.manifest import AgentSpec
from lkrun.supervision.start import start_message
from lkrun.supervision.supervisor import effective_shutdown_timeout


def record() -> JobRecord:
    return JobRecord(
        id="AJ_1",
        agent="helper",
        room="r",
        dispatch_id="AD_1",
        identity="helper-AJ_1",
        offered_at=10.0,
        accepted_at=11.0,
        worker_id="AW_1",
    )


def assignment(url: str = "") -> proto.JobAssignment:
    job = proto.Job(id="AJ_1", room=models.Room(name="r", sid="RM_1"), metadata="m")
    return proto.JobAssignment(job=job, token="tok", url=url)


def test_the_start_carries_the_answer_and_the_assignment() -> None:
    spec = AgentSpec(name="helper", entrypoint="m:f")
    answer = Acceptance(
        identity="helper-AJ_1", name="Helper", metadata="pm", attributes=(("k", "v"),)
    )
    start = start_message(
        record=record(),
        answer=answer,
        assignment=assignment(),
        rules=spec,
        url="ws://configured",
        shutdown_timeout=7.0,
    )
    assert start == {
        "job": {"id": "AJ_1", "room": {"name": "r", "sid": "RM_1"}, "metadata": "m"},
        # The same job as protobuf bytes, for runners that read them faster (docs/protocol.md).
        "job_pb": base64.b64encode(assignment().job.SerializeToString()).decode(),
        "url": "ws://configured",  # the open-source server leaves the assignment's empty
        "token": "tok",
        "identity": "helper-AJ_1",
        "agent": "helper",
        "shutdown_timeout": 7.0,
        "empty_timeout": 0.0,
        "name": "Helper",
        "metadata": "pm",
        "attributes": {"k": "v"},
        "worker_id": "AW_1",
        "recovered_from": "",
        "attempt": 0,
        "received_at": 10.0,
        "assigned_at": 11.0,
    }


def test_an_assignment_without_an_answer_gets_the_agents_own_values() -> None:
    spec = AgentSpec(
        name="helper", entrypoint="m:f", participant_name="Hi", participant_metadata="meta"
    )
    start = start_message(
        record=record(),
        answer=None,
        assignment=assignment(url="wss://cloud"),
        rules=spec,
        url="ws://configured",
        shutdown_timeout=7.0,
    )
    assert (start["url"], start["name"], start["metadata"], start["attributes"]) == (
        "wss://cloud",
        "Hi",
        "meta",
        {},
    )


def test_a_jobs_shutdown_timeout_is_its_agents_else_the_daemons_and_none_when_told_now() -> None:
    assert effective_shutdown_timeout(3.0, 10.0) == 3.0
    assert effective_shutdown_timeout(0.0, 10.0) == 10.0  # the agent sets none
    assert effective_shutdown_timeout(3.0, 0.0) == 0.0  # the third stop signal
