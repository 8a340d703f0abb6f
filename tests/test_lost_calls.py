"""No call lost to a busy moment: a CPU peak keeps the agent available, and `dispatch --wait`
re-creates a dispatch the server dropped while no worker was available."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from tests.conftest import unique, wait_for
from tests.helpers import agent_full, agent_table, dispatch, job_in_room

TICKER = "tests.agents.behaviours:ticker"
# Each busy loop ends by itself after this long, should the test die without cleaning up.
BUSY_CAP = 60


@contextlib.contextmanager
def busy_cpu(processes: int = 4) -> Iterator[None]:
    """Every core busy, as jobs ending and a burst of connects make it on a small machine."""
    code = f"import time\nend = time.monotonic() + {BUSY_CAP}\nwhile time.monotonic() < end: pass"
    loops = [
        subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
        for _ in range(processes)
    ]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


async def test_a_cpu_peak_loses_no_dispatch(start_daemon: Any, livekit_server: Any) -> None:
    name = unique("steady")
    # The defaults: load_threshold 0.75, overload_after 30s.
    daemon = await start_daemon(agent_table(name, TICKER, max_jobs=20))
    worker_ids = {(await daemon.status())["agents"][0]["worker_id"]}
    rooms = [unique("peak") for _ in range(6)]
    with busy_cpu():

        async def busy() -> bool:
            return (await daemon.status())["cpu_high_for"] >= 2

        await wait_for(busy, 20, what="the daemon to see the CPU busy")
        for room in rooms:
            await dispatch(livekit_server, room, name)
            assert not (await daemon.status())["agents"][0]["full"]
        for room in rooms:
            await job_in_room(daemon, room, "running")
    # Never FULL once it was ready (before, it is FULL "starting" while its code loads): as
    # LiveKit recorded the worker's statuses, and as the daemon counts the time it spent
    # FULL for any reason but starting.
    worker_ids.add((await daemon.status())["agents"][0]["worker_id"])
    for worker_id in worker_ids:
        statuses = livekit_server.worker_statuses(worker_id)
        assert "WS_AVAILABLE" in statuses
        assert "WS_FULL" not in statuses[statuses.index("WS_AVAILABLE") :], statuses
    for reason in ("cpu", "max_jobs", "draining"):
        assert await daemon.metric("lkrun_agent_full_seconds_total", agent=name, reason=reason) == 0


async def test_dispatch_wait_recreates_a_dispatch_the_server_dropped(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, busy_room, room = unique("single"), unique("busy"), unique("late")
    daemon = await start_daemon(agent_table(name, TICKER, max_jobs=1))
    await dispatch(livekit_server, busy_room, name)
    first = await job_in_room(daemon, busy_room, "running")
    await wait_for(lambda: agent_full(daemon, True), 10, what="the agent to report FULL")
    assert "FULL (1 job(s), max_jobs=1)" in daemon.log()
    command = ["dispatch", "--room", room, "--agent", name, "--wait", "--timeout", "90s"]
    cli = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "lkrun", *command, "--retries", "4", "--json"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=daemon.env,
    )
    try:
        assert cli.stderr is not None
        # The first dispatch found the only worker full and was dropped; so was its
        # replacement, while the agent is still full.
        line = (await asyncio.wait_for(cli.stderr.readline(), 40)).decode()
        assert "LiveKit dropped it" in line and "(retry 1/4)" in line, line
        assert daemon.cli("jobs", "kill", first["id"]).returncode == 0
        await wait_for(lambda: agent_full(daemon, False), 20, what="the agent to be free")
        out, err = await asyncio.wait_for(cli.communicate(), 80)
    finally:
        if cli.returncode is None:
            cli.kill()
            await cli.communicate()
    assert cli.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["retries"] >= 2 and result["job_id"]
    job = await job_in_room(daemon, room, "running")
    assert job["dispatch_id"] == result["dispatch_id"]
    assert "AVAILABLE again" in daemon.log()
