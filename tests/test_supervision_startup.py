"""Processes still starting when their owner stops, with scripted fake processes: nothing
is left running. (A fault in a job's start path does not stop the agent host's event loop:
tests/test_agent_host_events.py.)"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from lkrun.supervision.lifecycle import Asked, Cause
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


async def test_a_warm_process_s_failure_is_named_by_its_facts_not_its_wording() -> None:
    """The pool says "prewarm took longer" for a load timeout (the process's own fact),
    and keeps any other start failure's error as it is."""
    made: list[FakeProcess] = []

    def factory() -> Any:
        made.append(FakeProcess())
        return made[-1]

    pool = WarmPool(label="a", factory=factory, size=1, timeout=7)
    task = asyncio.create_task(pool.run())
    await settle()
    slow = made[0]
    slow.load_timed_out = True
    slow.asked.append(Asked(Cause.START_FAILED, "no ready in 7 s", force=True))
    slow.exit(None, exit_code=-15)
    slow.ready(False)
    await settle()
    assert pool.last_error == "prewarm took longer than prewarm_timeout=7s"
    await cancel(task)
    refused = FakeProcess()
    pool = WarmPool(label="a", factory=lambda: refused, size=1, timeout=7)  # type: ignore[arg-type,return-value]
    task = asyncio.create_task(pool.run())
    await settle()
    why = "job process speaks job protocol 2; this lkrun speaks 1"
    refused.asked.append(Asked(Cause.START_FAILED, why, force=True))
    refused.exit(None, exit_code=-15)
    refused.ready(False)
    await settle()
    assert pool.last_error == why
    await cancel(task)
