"""Warm processes against the real livekit-server."""

from __future__ import annotations

import re
from typing import Any

from tests.conftest import unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room

WARM = "tests.agents.behaviours:shows_userdata"


async def agent(daemon: Any) -> dict[str, Any]:
    return (await daemon.status())["agents"][0]


async def idle_pids(daemon: Any, count: int, jobs: int = 0) -> set[int]:
    """Wait for `count` warm processes (beside `jobs` running ones); all runner pids."""

    async def ready() -> set[int] | None:
        status = await agent(daemon)
        pids = _runner_pids(daemon)
        return pids if status["idle_processes"] == count and len(pids) == count + jobs else None

    return await wait_for(ready, 60, what=f"{count} warm processes")


def _runner_pids(daemon: Any) -> set[int]:
    """Job processes (warm or busy) of this daemon: runners, or forks of its fork servers."""
    import psutil

    pids = set()
    for child in psutil.Process(daemon.pid).children():
        try:
            command = " ".join(child.cmdline())
            if "lkrun.child.runner" in command:
                pids.add(child.pid)
            elif "lkrun.child.zygote" in command:
                pids.update(p.pid for p in child.children())
        except psutil.Error:  # exited (or a zombie) between listing and reading
            continue
    return pids


async def test_job_runs_in_a_warm_process_with_prewarm_result(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room = unique("warm"), unique("room")
    daemon = await start_daemon(
        agent_table(name, WARM, idle_processes=2, prewarm="tests.agents.behaviours:prewarm_model")
    )
    before = await idle_pids(daemon, 2)
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    assert job["warm"] is True and job["pid"] in before
    assert job["offer_to_start_ms"] is not None and job["offer_to_start_ms"] < 1000
    # The prewarm ran in the job's own process, before the job.
    pattern = rf"\[{name} {job['id']}\] .*userdata=\{{'model': 'loaded', 'pid': {job['pid']}\}}"
    await wait_for(lambda: re.search(pattern, daemon.log()), 10, what="the prewarm result")
    # The pool refills with a fresh process; the used one is never reused.
    after = await idle_pids(daemon, 2, jobs=1)
    assert job["pid"] in after and len(after - before) == 1


async def test_cold_start_when_no_warm_process_is_ready(
    start_daemon: Any, livekit_server: Any
) -> None:
    name = unique("warm")
    rooms = [unique("room") for _ in range(3)]
    daemon = await start_daemon(agent_table(name, WARM, idle_processes=1))
    await idle_pids(daemon, 1)
    for room in rooms:
        await dispatch(livekit_server, room, name)
    jobs = [await job_in_room(daemon, room, "running") for room in rooms]
    assert sum(j["warm"] for j in jobs) >= 1
    assert sum(not j["warm"] for j in jobs) >= 1


async def test_failing_prewarm_is_reported_once_and_backs_off(
    start_daemon: Any, livekit_server: Any
) -> None:
    name = unique("broken")
    daemon = await start_daemon(
        agent_table(name, WARM, idle_processes=1, prewarm="tests.agents.behaviours:prewarm_fails")
    )

    async def failed_thrice() -> bool:
        return (await agent(daemon))["warm_failures"] >= 3

    await wait_for(failed_thrice, 60, what="three failed warm-ups")
    status = await agent(daemon)
    assert status["warm_error"] == "prewarm failed: RuntimeError: model file missing"
    reports = [x for x in daemon.log().splitlines() if "a warm process failed to start" in x]
    assert len(reports) == 1, reports
    # Backoff: three attempts took at least 1 + 2 seconds of waiting.
    spawns = [x for x in daemon.log().splitlines() if "prewarm failed" in x and "ERROR" in x]
    assert len(spawns) <= 5


async def test_prewarm_timeout(start_daemon: Any, livekit_server: Any) -> None:
    name = unique("slow")
    daemon = await start_daemon(
        agent_table(
            name,
            WARM,
            idle_processes=1,
            prewarm="tests.agents.behaviours:prewarm_hangs",
            prewarm_timeout="1s",
            # A fork server must import the module within prewarm_timeout too, which a busy
            # machine can miss by itself; a spawned process times out on the prewarm alone.
            start_method="spawn",
        )
    )

    async def timed_out() -> str:
        return (await agent(daemon))["warm_error"]

    error = await wait_for(timed_out, 30, what="the prewarm timeout")
    assert error == "prewarm took longer than prewarm_timeout=1s"


async def test_code_change_replaces_warm_processes(start_daemon: Any, livekit_server: Any) -> None:
    name, room = unique("fresh"), unique("room")
    module = "from lkrun.examples.echo import entrypoint\nVERSION = {v}\n"
    daemon = await start_daemon(
        agent_table(name, "fresh_agent:entrypoint", idle_processes=1),
        files={"fresh_agent.py": module.format(v=1)},
    )
    [old] = await idle_pids(daemon, 1)
    (daemon.dir / "fresh_agent.py").write_text(module.format(v=2))

    async def replaced() -> bool:
        pids = _runner_pids(daemon)
        return bool(pids) and old not in pids and (await agent(daemon))["idle_processes"] == 1

    await wait_for(replaced, 30, what="the warm process to be replaced")
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    assert job["warm"] and job["pid"] != old
