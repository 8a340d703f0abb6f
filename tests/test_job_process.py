"""The daemon side of a job process against the real runner, without a LiveKit server.

Every test runs with both start methods: a fresh interpreter and a fork of a zygote.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from lkrun.jobs.fields import JobStatus
from lkrun.supervision.forkserver import ForkServer
from lkrun.supervision.job_process import AppSpec, JobProcess, Launcher, LaunchError, SpawnLauncher
from lkrun.supervision.lifecycle import Cause, Verdict, conclude
from tests.conftest import REPO, pid_alive, wait_for

SUCCESS, FAILED = JobStatus.SUCCESS, JobStatus.FAILED

pytestmark = pytest.mark.e2e  # job processes

JOB = {"id": "AJ_test", "room": {"name": "r"}, "metadata": "meta", "type": "JT_ROOM"}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


Make = Callable[[str, Lines], JobProcess]


@pytest.fixture(params=["spawn", "forkserver"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    servers: list[ForkServer] = []

    def launcher(entrypoint: str) -> Launcher:
        if request.param == "spawn":
            return SpawnLauncher(app=AppSpec(entrypoint), cwd=Path(REPO), env=env)
        server = ForkServer(
            label="test",
            app=AppSpec(entrypoint),
            cwd=Path(REPO),
            env=env,
            load_timeout=30,
        )
        servers.append(server)
        return server

    def make(entrypoint: str, lines: Lines) -> JobProcess:
        logger = logging.getLogger(f"test.job.{id(lines)}")
        logger.addHandler(lines)
        logger.setLevel(logging.INFO)
        return JobProcess(launcher=launcher(entrypoint), log=logging.LoggerAdapter(logger, {}))

    yield make
    for server in servers:
        await server.close(timeout=10)


async def start(make: Make, entrypoint: str) -> tuple[JobProcess, Lines]:
    lines = Lines()
    proc = make(entrypoint, lines)
    await proc.spawn()
    await asyncio.wait_for(proc.ready.wait(), 30)
    proc.start(job=JOB, url="ws://127.0.0.1:1", token="t", identity="me", agent="a")
    return proc, lines


async def test_returning_entrypoint_succeeds_and_print_goes_to_log(make: Make) -> None:
    proc, lines = await start(make, "tests.agents.behaviours:returns_at_once")
    facts = await asyncio.wait_for(proc.wait(), 30)
    assert conclude(facts) == Verdict(SUCCESS, Cause.CLEAN, "entrypoint returned"), facts
    assert facts.exit_code == 0 and facts.running and proc.started_running
    assert "about to return" in lines.lines
    assert any("metadata 'meta'" in line for line in lines.lines)


async def test_raising_entrypoint_fails_with_error_text(make: Make) -> None:
    proc, _ = await start(make, "tests.agents.behaviours:raises")
    facts = await asyncio.wait_for(proc.wait(), 30)
    outcome = conclude(facts)
    assert (outcome.status, outcome.cause) == (FAILED, Cause.RAISED)
    assert outcome.error == "RuntimeError: boom from job AJ_test"
    assert facts.exit_code == 1


async def test_unimportable_entrypoint_fails_before_ready(make: Make) -> None:
    lines = Lines()
    proc = make("tests.agents.no_such_module:entrypoint", lines)
    try:
        await proc.spawn()
    except LaunchError as exc:  # the fork server could not load it: no process at all
        error = str(exc)
    else:
        outcome = conclude(await asyncio.wait_for(proc.wait(), 30))
        assert (outcome.status, outcome.cause) == (FAILED, Cause.START_FAILED)
        assert not proc.ready.is_set()
        error = outcome.error
    assert error.startswith("cannot load entrypoint tests.agents.no_such_module:entrypoint")
    assert "ModuleNotFoundError" in error


async def test_shutdown_request_runs_callbacks_and_succeeds(make: Make) -> None:
    proc, lines = await start(make, "tests.agents.behaviours:waits_for_shutdown")
    await wait_for(lambda: proc.started_running, 10)
    await proc.stop("test says stop", timeout=10, cause=Cause.TERMINATED)
    outcome = conclude(await proc.wait())
    assert outcome == Verdict(SUCCESS, Cause.TERMINATED, "test says stop"), outcome
    assert "shutdown callback: test says stop" in lines.lines


async def test_job_ignoring_shutdown_is_killed_with_reason(make: Make) -> None:
    proc, _ = await start(make, "tests.agents.behaviours:blocks_forever")
    await wait_for(lambda: proc.started_running, 10)
    await proc.stop("test says stop", timeout=0.5, cause=Cause.TERMINATED)
    outcome = conclude(await proc.wait())
    assert (outcome.status, outcome.cause) == (FAILED, Cause.TERMINATED)
    assert outcome.error == "did not stop within 0.5s of a shutdown request (test says stop)"


async def test_killed_process_fails_with_signal_name(make: Make) -> None:
    proc, _ = await start(make, "tests.agents.behaviours:waits_for_shutdown")
    await wait_for(lambda: proc.started_running, 10)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    facts = await proc.wait()
    outcome = conclude(facts)
    assert (outcome.status, outcome.cause) == (FAILED, Cause.SIGNAL)
    assert facts.exit_code == -signal.SIGKILL and facts.signal == signal.SIGKILL
    assert outcome.error.startswith("job process killed by SIGKILL")


@pytest.mark.parametrize("when", ["before start", "while running"])
async def test_stdin_eof_ends_the_job(make: Make, when: str) -> None:
    lines = Lines()
    proc = make("tests.agents.behaviours:waits_for_shutdown", lines)
    await proc.spawn()
    await asyncio.wait_for(proc.ready.wait(), 30)
    if when == "while running":
        proc.start(job=JOB, url="ws://127.0.0.1:1", token="t", identity="me", agent="a")
        await wait_for(lambda: proc.started_running, 10)
    internal: Any = proc
    internal._proc.stdin.close()  # what the daemon dying looks like to the child
    await asyncio.wait_for(proc.wait(), 10)
    assert proc.pid is not None and not pid_alive(proc.pid)


async def test_shutdown_right_after_start_is_not_lost(make: Make) -> None:
    # The shutdown can reach the runner before it has made the job's context.
    proc, _ = await start(make, "tests.agents.behaviours:waits_for_shutdown")
    await proc.stop("stop at once", timeout=10, cause=Cause.DRAIN)
    outcome = conclude(await proc.wait())
    assert outcome == Verdict(SUCCESS, Cause.DRAIN, "stop at once"), outcome


async def test_sys_exit_code_is_the_exit_code(make: Make) -> None:
    proc, _ = await start(make, "tests.agents.behaviours:exits_with_3")
    facts = await asyncio.wait_for(proc.wait(), 30)
    outcome = conclude(facts)
    assert outcome.status is FAILED and facts.exit_code == 3, facts


async def test_what_a_job_starts_cannot_read_the_protocol(make: Make) -> None:
    # A subprocess that inherits stdin (ffmpeg reads it by default) would swallow the
    # daemon's shutdown and drain messages if fd 0 were the protocol pipe.
    proc, lines = await start(make, "tests.agents.behaviours:reports_child_stdin")
    outcome = conclude(await asyncio.wait_for(proc.wait(), 30))
    assert outcome.status is SUCCESS, outcome
    assert "child stdin: /dev/null" in lines.lines


async def test_what_a_job_started_ends_with_it(make: Make) -> None:
    proc, lines = await start(make, "tests.agents.behaviours:leaves_a_child")
    outcome = conclude(await asyncio.wait_for(proc.wait(), 30))
    assert outcome.status is SUCCESS, outcome
    [helper] = [int(line.split()[-1]) for line in lines.lines if line.startswith("helper pid")]
    await wait_for(lambda: not pid_alive(helper), 5, what="the job's helper to be gone")
