"""Processes still starting when their owner stops, and faults in a job's start path, with
scripted fake processes: nothing is left running, and nothing breaks the registration."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.credentials import Credentials
from lkrun.load import WorkerLoad
from lkrun.registration import Acceptance, Decision, Registration, WorkerSpec
from lkrun.supervision.request_process import RequestProcess
from lkrun.supervision.warm_pool import WarmPool
from tests.test_supervisor import FakeProcess, settle


async def cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)


async def test_a_warm_process_still_loading_when_the_pool_closes_is_killed() -> None:
    made: list[FakeProcess] = []

    def factory() -> Any:
        made.append(FakeProcess())
        return made[-1]

    pool = WarmPool(label="a", factory=factory, size=1, timeout=60)
    task = asyncio.create_task(pool.run())
    await settle()
    [proc] = made
    assert proc.kinds() == ["spawn"] and not pool.idle  # spawned, importing: not ready yet
    await cancel(task)  # the agent was retired meanwhile
    assert proc.kinds() == ["spawn", "kill"] and proc.exited


async def test_a_warm_process_cancelled_before_it_exists_needs_no_kill() -> None:
    proc = FakeProcess()
    proc.spawn_gate.clear()  # the launch itself is under way
    pool = WarmPool(label="a", factory=lambda: proc, size=1, timeout=60)  # type: ignore[arg-type,return-value]
    task = asyncio.create_task(pool.run())
    await settle()
    await cancel(task)
    assert proc.kinds() == ["spawn"] and proc.pid is None


async def test_a_request_process_still_loading_when_the_agent_stops_is_killed() -> None:
    made: list[FakeProcess] = []

    def factory() -> Any:
        made.append(FakeProcess())
        return made[-1]

    requests = RequestProcess(label="a", factory=factory, timeout=5, start_timeout=60)
    task = asyncio.create_task(requests.run())
    await settle()
    [proc] = made
    assert proc.kinds() == ["spawn"] and not requests.ready
    await cancel(task)
    assert proc.kinds() == ["spawn", "kill"] and proc.exited


class RaisingHandler:
    """A handler whose job callbacks fail, as a bug in a job's start path would."""

    def on_availability(self, job: proto.Job) -> Decision:
        return Acceptance(identity="i")

    def on_answered(self, job_id: str, decision: Decision, seconds: float) -> None:
        pass

    def on_registered(self, worker_id: str, again: bool) -> None:
        pass

    def on_assignment(self, assignment: proto.JobAssignment) -> None:
        raise ValueError("odd job id")

    def on_termination(self, job_id: str) -> None:
        raise KeyError(job_id)

    def worker_load(self) -> WorkerLoad:
        return WorkerLoad(full=False, load=0.0, job_count=0)


async def test_a_handler_fault_on_an_assignment_does_not_end_the_connection() -> None:
    spec = WorkerSpec("a", "room", "", models.ParticipantPermission())
    reg = Registration(
        label="a",
        spec=spec,
        credentials=Credentials("ws://127.0.0.1:1", "k", "s"),
        handler=RaisingHandler(),
        session=None,  # type: ignore[arg-type]  # never connects here
    )
    job = proto.Job(id="AJ_1", room=models.Room(name="r"))
    internal: Any = reg
    # _read hands each message to _dispatch: an exception here would drop the connection.
    internal._dispatch(proto.ServerMessage(assignment=proto.JobAssignment(job=job)), 0.0)
    termination = proto.JobTermination(job_id="AJ_1")
    internal._dispatch(proto.ServerMessage(termination=termination), 0.0)
