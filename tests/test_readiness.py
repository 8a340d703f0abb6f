"""One readiness for an agent: its worker status stays FULL ("starting"), its offers are
declined and the daemon's /readyz says not ready until a job would start at the agent's
normal speed (code loaded, first warm process up, request process answering). Fakes only."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.agent_host import AgentHost
from lkrun.manifest import AgentSpec
from lkrun.registration import AvailableSeen
from lkrun.supervision.forkserver import ForkServer
from lkrun.supervision.job_process import AppSpec
from lkrun.supervision.request_process import RequestProcess
from tests.conftest import wait_for
from tests.helpers import unit_host
from tests.test_supervisor import FakeProcess, settle

Made = list[FakeProcess]


@pytest.fixture
async def make_host() -> AsyncIterator[Callable[..., AgentHost]]:
    hosts: list[AgentHost] = []
    async with aiohttp.ClientSession() as session:

        def make(**fields: Any) -> AgentHost:
            spec = AgentSpec(name="a", entrypoint="m:f", start_method="spawn", **fields)
            host = unit_host(session, spec)
            hosts.append(host)
            return host

        yield make
        for host in hosts:
            await host.processes.close()


def fakes(made: Made) -> Callable[[], Any]:
    def factory() -> FakeProcess:
        made.append(FakeProcess())
        return made[-1]

    return factory


def connected(host: AgentHost) -> AgentHost:
    host.registration.state.connected = True  # as after the server's pong
    host.registration.state.available_seen = True  # and the one to its first AVAILABLE
    return host


async def offer_reason(host: AgentHost, job_id: str) -> str:
    job = proto.Job(id=job_id, room=models.Room(name="r"), type=proto.JT_ROOM)
    decision = await host.decide(job)
    host.jobs.release(job_id)
    return getattr(decision, "reason", "")


async def test_full_and_declining_until_the_first_warm_process_is_ready(
    make_host: Callable[..., AgentHost],
) -> None:
    host = connected(make_host(idle_processes=1))
    made: Made = []
    host.pool.factory = fakes(made)
    pushed: list[str] = []
    host.processes.on_readiness = lambda: pushed.append(host.processes.not_ready())
    assert host.worker_load().reason == "starting"  # not even started
    await host.processes.start()
    await settle()
    [proc] = made  # spawned, loading its prewarm
    load = host.worker_load()
    assert load.full and load.reason == "starting"
    assert host.not_ready() == "starting: its first warm process is starting"
    assert await offer_reason(host, "J1") == "starting"
    proc.ready()
    await settle()
    assert pushed[-1] == ""  # the registration was told at once, not at its next refresh
    assert not host.worker_load().full and host.not_ready() == ""
    assert await offer_reason(host, "J2") == ""
    proc.exit()  # the pool refills later; the agent stays available meanwhile (cold starts)
    await settle()
    assert not host.worker_load().full


async def test_a_pool_that_cannot_fill_does_not_hold_the_agent_back(
    make_host: Callable[..., AgentHost],
) -> None:
    host = connected(make_host(idle_processes=1))
    made: Made = []
    host.pool.factory = fakes(made)
    await host.processes.start()
    await settle()
    made[0].exit()  # its prewarm failed: jobs fail the same way, and say why
    await settle()
    assert host.not_ready() == "" and not host.worker_load().full


async def test_full_while_the_request_process_is_not_answering(
    make_host: Callable[..., AgentHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lkrun.supervision import request_process

    monkeypatch.setattr(request_process, "BACKOFF_BASE", 0.01)
    host = connected(make_host())
    made: Made = []
    processes: Any = host.processes
    processes.requests = RequestProcess(
        label="a",
        factory=fakes(made),
        timeout=5,
        start_timeout=60,
        on_change=processes._helper_changed,
    )
    await host.processes.start()
    await settle()
    assert host.not_ready() == "starting: its request process is starting"
    assert host.worker_load().reason == "starting" and await offer_reason(host, "J1") == "starting"
    made[0].ready()
    await settle()
    assert host.not_ready() == "" and not host.worker_load().full
    made[0].exit()  # it crashed: offers would be declined until a new one is up
    await settle()
    assert host.worker_load().reason == "starting"
    assert "its request process is not ready: the request process exited" in host.not_ready()
    await wait_for(lambda: len(made) == 2, 5, what="a new request process")
    made[1].ready()
    await settle()
    assert host.not_ready() == "" and not host.worker_load().full


async def test_the_fork_server_is_loading_until_it_says_ready_or_failed() -> None:
    changes: list[bool] = []
    server = ForkServer(
        label="a", app=AppSpec("m:f"), cwd=Path("."), env={}, load_timeout=1, on_change=None
    )
    server.on_change = lambda: changes.append(server.loading)
    internal: Any = server
    assert not server.loading  # not started
    internal._proc = object()  # as start() leaves it: the zygote imports the module
    assert server.loading
    internal._on_message({"type": "ready", "pid": 1})
    assert not server.loading and changes == [False]
    server.loaded = False
    internal._on_message({"type": "failed", "error": "ImportError: no module m"})
    assert not server.loading and changes == [False, False]  # broken is not loading
    internal._proc = None


def test_the_status_log_says_why_it_is_full(
    make_host: Callable[..., AgentHost], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lkrun.agent")
    host = make_host()
    host.worker_load()
    [record] = [r for r in caplog.records if "FULL" in r.getMessage()]
    assert record.levelno == logging.INFO and "starting" in record.getMessage()


async def test_not_ready_until_livekit_has_taken_its_available_status(
    make_host: Callable[..., AgentHost],
) -> None:
    """A dispatch made as /readyz turns ready must find the agent: readiness waits for the
    pong to the ping sent behind the first AVAILABLE, unless the agent is FULL anyway."""
    host = make_host(idle_processes=1)
    host.registration.state.connected = True
    made: Made = []
    host.pool.factory = fakes(made)
    await host.processes.start()
    await settle()
    made[0].ready()
    await settle()
    assert not host.worker_load().full
    assert host.not_ready() == "starting: LiveKit has not yet taken its AVAILABLE status"
    waiter = asyncio.create_task(host.wait_ready())
    await settle()
    assert not waiter.done()
    host.registration.state.available_seen = True
    host.handle(AvailableSeen(connection=1))
    await asyncio.wait_for(waiter, 5)
    assert host.not_ready() == ""
    # FULL for a reason of its own (here draining): nothing to wait for from LiveKit.
    host.registration.state.available_seen = False
    host.stop_accepting()
    assert host.worker_load().full and host.not_ready() == ""
