"""What a livekit-agents job process does before its job comes, so that its start runs the
entrypoint sooner: the job's context built while it waits (adopted by the job), and the
job read from the start's protobuf bytes. Real livekit-agents objects; nothing connects."""

from __future__ import annotations

import asyncio
import base64
import logging
import tempfile
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from livekit.agents import JobContext, get_job_context
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.child.framework.app import FrameworkApp
from lkrun.child.framework.job import FrameworkJob, parse_job
from lkrun.decisions import Acceptance
from lkrun.jobs.book import JobRecord
from lkrun.supervision.start import JOB_PB_LIMIT, start_message


def a_job(job_id: str = "AJ_1", room: str = "the-room") -> proto.Job:
    job = proto.Job(id=job_id, room=models.Room(name=room, sid="RM_1"), type=proto.JT_ROOM)
    job.state.participant_identity = "agent-1"
    return job


def start_for(job: proto.Job, **more: Any) -> dict[str, Any]:
    return {
        "type": "start",
        "protocol": 1,
        "job": MessageToDict(job),
        "job_pb": base64.b64encode(job.SerializeToString()).decode(),
        "url": "ws://x",
        "token": "the-token",
        "identity": "agent-1",
        **more,
    }


def entries(path: Path) -> list[Path]:
    return list(path.iterdir())


async def test_a_waiting_process_builds_its_job_s_context_and_the_job_adopts_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the contexts make theirs
    seen: list[Any] = []

    async def entrypoint(ctx: JobContext) -> None:
        seen.append((ctx, get_job_context(), ctx.job.id, ctx._info.token, ctx.room.name))
        seen.append((ctx.session_directory, ctx.session_directory.is_dir()))

    app = FrameworkApp("function", entrypoint)
    await app.prepare()  # before ready, in the process waiting for its job
    spare = app.spare
    assert spare is not None
    job = app.new_job(start_for(a_job()), logging.getLogger("test"))
    assert isinstance(job, FrameworkJob)
    result = await asyncio.wait_for(job.run(lambda: 1.0), 10)
    [(ctx, current, job_id, token, room), (session_directory, made)] = seen
    assert ctx is spare and current is ctx  # the context built ahead, as the job's own
    assert (job_id, token, room) == ("AJ_1", "the-token", "the-room")
    # The job's own temporary directory, its session directory, made when it was adopted
    # and removed by the job's clean-up.
    assert made and session_directory == Path(ctx._tempdir.name)
    assert session_directory.parent == tmp_path and entries(tmp_path) == []
    assert result.reason == "entrypoint returned without connecting"
    assert app.take_spare() is None  # taken once: a process runs one job


async def test_a_waiting_process_discarded_without_a_job_leaves_no_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A warm process that gets no job (a reload, its fork server replaced, the daemon
    stopping) ends with os._exit: no clean-up runs, so what it made is left behind."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    app = FrameworkApp("function", lambda ctx: None)
    await app.prepare()
    spare = app.spare
    assert spare is not None  # the head start is still built
    assert entries(tmp_path) == []  # as os._exit would find it now


async def test_without_a_spare_the_job_builds_its_own_context() -> None:
    seen: list[JobContext] = []

    async def entrypoint(ctx: JobContext) -> None:
        seen.append(ctx)

    app = FrameworkApp("function", entrypoint)
    await app.prepare()
    spare = app.take_spare()  # as if building it had failed
    job = app.new_job(start_for(a_job()), logging.getLogger("test"))
    assert isinstance(job, FrameworkJob)
    await asyncio.wait_for(job.run(lambda: 1.0), 10)
    [ctx] = seen
    assert ctx is not spare and ctx.job.id == "AJ_1" and ctx._info.token == "the-token"


def test_the_job_is_read_from_its_protobuf_bytes_else_from_its_json() -> None:
    start = start_for(a_job("from-bytes"))
    start["job"] = MessageToDict(a_job("from-json"))  # they never differ: tell which is read
    assert parse_job(start).id == "from-bytes"
    assert parse_job({**start, "job_pb": "not base64!"}).id == "from-json"
    assert parse_job({**start, "job_pb": base64.b64encode(b"\xff\xff").decode()}).id == (
        "from-json"
    )
    del start["job_pb"]  # an older daemon
    job = parse_job(start)
    assert job.id == "from-json" and job.state.participant_identity == "agent-1"


def test_the_start_message_carries_the_job_both_ways() -> None:
    job = a_job()
    assignment = proto.JobAssignment(job=job, token="tok")
    record = JobRecord(
        id="AJ_1", agent="a", room="the-room", dispatch_id="AD_1", identity="agent-1"
    )

    class Rules:
        participant_metadata = ""
        empty_timeout = 0.0

        def display_name(self) -> str:
            return "agent"

    start = start_message(
        record=record,
        answer=Acceptance(identity="agent-1", name="agent"),
        assignment=assignment,
        rules=Rules(),
        url="ws://x",
        shutdown_timeout=10.0,
    )
    assert proto.Job.FromString(base64.b64decode(start["job_pb"])) == job
    assert start["job"] == MessageToDict(job)


def test_a_large_job_s_start_carries_it_as_json_only() -> None:
    job = a_job()
    job.metadata = "m" * (JOB_PB_LIMIT + 1)  # the 4 MiB of the pipe are for the metadata

    class Rules:
        participant_metadata = ""
        empty_timeout = 0.0

        def display_name(self) -> str:
            return "agent"

    record = JobRecord(id="AJ_1", agent="a", room="r", dispatch_id="AD_1", identity="agent-1")
    start = start_message(
        record=record,
        answer=None,
        assignment=proto.JobAssignment(job=job, token="tok"),
        rules=Rules(),
        url="ws://x",
        shutdown_timeout=10.0,
    )
    assert "job_pb" not in start and parse_job(start).metadata == job.metadata
