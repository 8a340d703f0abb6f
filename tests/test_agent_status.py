"""What an agent reports to LiveKit as its status changes, without a server or processes."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lkrun.agent_host import AgentHost, HostSettings
from lkrun.credentials import Credentials
from lkrun.jobs.book import JobBook
from lkrun.load import CpuPressure
from lkrun.manifest import AgentSpec
from lkrun.supervision.job_monitor import MB, Usage
from tests.conftest import REPO


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def make_host(session: aiohttp.ClientSession, cpu: CpuPressure, **fields: object) -> AgentHost:
    spec = AgentSpec(name="a", entrypoint="m:f", start_method="spawn", **fields)  # type: ignore[arg-type]
    return AgentHost(
        spec=spec,
        workdir=Path(REPO),
        credentials=Credentials("ws://127.0.0.1:1", "key", "secret"),
        book=JobBook(),
        session=session,
        settings=HostSettings(shutdown_timeout=5, cpu=cpu),
    )


Start = Callable[[AgentHost], Awaitable[AgentHost]]


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start a host's processes (spawn, no warm process: nothing loads, so ready at once)."""
    hosts: list[AgentHost] = []

    async def start(host: AgentHost) -> AgentHost:
        hosts.append(host)
        await host.processes.start()
        return host

    yield start
    for host in hosts:
        await host.processes.close()


def full_seconds(host: AgentHost, reason: str) -> float:
    value = host.settings.metrics.registry.get_sample_value(
        "lkrun_agent_full_seconds_total", {"agent": "a", "reason": reason}
    )
    return value or 0.0


async def test_a_cpu_peak_leaves_the_agent_available_and_a_sustained_one_does_not(
    session: aiohttp.ClientSession, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    cpu = CpuPressure(threshold=0.75, overload_after=10.0, clock=clock)
    host = await start(make_host(session, cpu))
    caplog.set_level(logging.INFO, logger="lkrun.agent")
    cpu.observe(1.0)  # a peak: both cores busy for a sample
    load = host.worker_load()
    assert not load.full and load.load > 0.5  # steers jobs elsewhere, still takes them
    assert host.jobs.offer("J1", "r", cpu_overload="") is None
    for _ in range(11):
        clock.now += 1
        cpu.observe(1.0)
    load = host.worker_load()
    assert load.full and load.reason == "cpu"
    [full] = [r for r in caplog.records if "FULL" in r.getMessage()]
    assert full.levelno == logging.WARNING
    assert "CPU at or over load_threshold=75% for 11s" in full.getMessage()
    clock.now += 1
    cpu.observe(0.2)
    assert not host.worker_load().full
    assert any("AVAILABLE again" in r.getMessage() for r in caplog.records)
    assert full_seconds(host, "cpu") > 0


async def test_max_jobs_and_draining_make_the_agent_full_at_once(
    session: aiohttp.ClientSession, start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    host = await start(make_host(session, CpuPressure(threshold=0.75), max_jobs=1))
    caplog.set_level(logging.INFO, logger="lkrun.agent")
    assert not host.worker_load().full
    assert host.jobs.offer("J1", "r") is None  # the one slot is reserved
    load = host.worker_load()
    assert load.full and load.reason == "max_jobs"
    assert "FULL (1 job(s), max_jobs=1)" in caplog.text
    host.jobs.release("J1")
    assert not host.worker_load().full
    host.stop_accepting()
    assert host.worker_load().reason == "draining"
    assert caplog.text.count("FULL") == 2 and caplog.text.count("AVAILABLE again") == 1


async def test_idle_memory_keeps_only_the_processes_still_idle(
    session: aiohttp.ClientSession,
) -> None:
    host = make_host(session, CpuPressure(threshold=0.75))
    idle = [101]
    host.processes.idle_pids = lambda: list(idle)  # type: ignore[method-assign]
    for _ in range(50):  # a day of warm processes, each sampled, then taken by a job
        [target] = host.monitor_targets()
        target.on_sample(Usage(rss_bytes=40 * MB, cpu_percent=0.0, processes=1))
        idle[0] += 1
    host.monitor_targets()  # the monitor's next round; nobody asked for /v1/status
    internal: Any = host
    assert list(internal._idle_memory) == []  # pid 151 is idle but not sampled yet
    [target] = host.monitor_targets()
    target.on_sample(Usage(rss_bytes=40 * MB, cpu_percent=0.0, processes=1))
    assert host.idle_memory_mb() == 40.0
