"""AgentHost's job bookkeeping without a LiveKit server: offers, assignments, start failures."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.agent_host import AgentHost
from lkrun.decisions import Acceptance
from lkrun.jobs.book import JobStatus
from lkrun.manifest import AgentSpec, FrozenMap
from lkrun.registration import Assigned, Terminated
from tests.conftest import wait_for
from tests.helpers import unit_host

pytestmark = pytest.mark.e2e  # job processes

MakeHost = Callable[..., AgentHost]


@pytest.fixture
async def make_host() -> AsyncIterator[MakeHost]:
    hosts: list[AgentHost] = []
    async with aiohttp.ClientSession() as session:

        def make(**fields: Any) -> AgentHost:
            fields.setdefault("entrypoint", "tests.agents.behaviours:returns_at_once")
            spec = AgentSpec(name="a", **fields)
            host = unit_host(session, spec)
            hosts.append(host)
            return host

        yield make
        for host in hosts:
            await host.stop_jobs("test over")
            await host.processes.close()
            if host.forkserver is not None:
                await host.forkserver.close(5)


async def started(host: AgentHost, *, wait: bool = True) -> AgentHost:
    """Its processes started (as AgentHost.run does before it registers), and with
    ``wait``, ready: until then it declines every offer ("starting")."""
    await host.processes.start()
    if wait:
        await wait_for(lambda: not host.processes.not_ready(), 30, what="the agent to be ready")
    return host


async def offer(host: AgentHost, job_id: str) -> proto.Job:
    """Taken: a slot is reserved for it."""
    job = proto.Job(id=job_id, room=models.Room(name="r"), type=proto.JT_ROOM)
    assert isinstance(await host.decide(job), Acceptance)
    return job


def assign(host: AgentHost, job: proto.Job) -> None:
    """As LiveKit's JobAssignment reaches it (through its registration's events)."""
    host.handle(Assigned(proto.JobAssignment(job=job, token="t"), worker_id="AW_1"))


def updates(host: AgentHost) -> list[tuple[str, int, str]]:
    """Job status updates waiting for a registration (none is connected here)."""
    return [(u.job_id, u.status, u.error) for u in host.registration.updates.unsent()]


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
async def test_an_unexpected_error_while_starting_fails_the_job_and_frees_its_slot(
    make_host: MakeHost, method: str
) -> None:
    # A NUL byte in the environment: ValueError from the process start, not OSError.
    host = await started(make_host(start_method=method, env=FrozenMap({"BAD": "a\0b"})))
    job = await offer(host, "AJ_nul")
    assign(host, job)
    await wait_for(lambda: host.job_count() == 0, 10, what="the slot to be freed")
    [(job_id, status, error)] = updates(host)
    assert (job_id, status) == ("AJ_nul", proto.JS_FAILED)
    assert "embedded null byte" in error


async def test_an_assignment_for_a_running_job_is_ignored(make_host: MakeHost) -> None:
    host = await started(make_host(start_method="spawn"))
    job = await offer(host, "AJ_dup")
    assign(host, job)
    first = host.book.get("AJ_dup")
    assign(host, job)  # again, while it runs
    assert host.book.get("AJ_dup") is first and host.job_count() == 1


async def test_an_assignment_without_a_slot_is_refused_when_full(make_host: MakeHost) -> None:
    host = await started(make_host(start_method="spawn", max_jobs=1))
    assign(host, await offer(host, "AJ_1"))
    stray = proto.Job(id="AJ_stray", room=models.Room(name="r"))
    assign(host, stray)
    assert host.book.get("AJ_stray") is None and host.job_count() == 1
    assert ("AJ_stray", proto.JS_FAILED) in [(j, s) for j, s, _ in updates(host)]
    # With room to spare, one whose reservation expired is taken.
    roomy = await started(make_host(start_method="spawn", max_jobs=2))
    late = proto.Job(id="AJ_late", room=models.Room(name="r"))
    assign(roomy, late)
    record = roomy.book.get("AJ_late")
    assert record is not None and record.status in (JobStatus.STARTING, JobStatus.RUNNING)


SLOW = "tests.agents.slow_import:entrypoint"


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
@pytest.mark.parametrize("how", ["stop", "kill", "terminate"])
async def test_a_stop_while_the_process_is_starting_takes_effect(
    make_host: MakeHost, method: str, how: str
) -> None:
    # Not ready (its fork server imports for 1.5 s): an offer would be declined, but an
    # assignment LiveKit makes anyway is taken while the module loads.
    host = await started(make_host(start_method=method, entrypoint=SLOW), wait=False)
    job = proto.Job(id="AJ_slow", room=models.Room(name="r"), type=proto.JT_ROOM)
    assign(host, job)
    if how == "stop":
        assert host.kill_job("AJ_slow", force=False) == "shutdown requested"
    elif how == "kill":
        assert host.kill_job("AJ_slow", force=True) == "killed"
    else:
        host.handle(Terminated("AJ_slow"))  # LiveKit's JobTermination
    await wait_for(lambda: host.job_count() == 0, 30, what="the job to end")
    [(job_id, status, error)] = updates(host)
    assert job_id == "AJ_slow"
    if how == "kill":
        assert status == proto.JS_FAILED and "killed by `lkrun jobs kill --force`" in error
    else:
        assert status == proto.JS_SUCCESS
    assert not any(r.id == "AJ_slow" for r in host.book.active())
