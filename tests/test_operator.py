"""Operator experience against the real livekit-server: history, logs, kill, metrics, JSON."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import livekit_api, pid_alive, unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room, status_is

pytestmark = pytest.mark.e2e  # daemons and the lkrun command, each in a process of its own

TICKER = "tests.agents.behaviours:ticker"


def spawn_cli(daemon: Any, *args: str) -> subprocess.Popen[str]:
    """A long-running CLI command (follow, watch), read while it runs."""
    return subprocess.Popen(
        [sys.executable, "-m", "lkrun", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=daemon.env,
        text=True,
    )


def cli_json(daemon: Any, *args: str) -> Any:
    result = daemon.cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def end_job(server: Any, dispatch_id: str, room: str) -> None:
    async with livekit_api(server) as lk:
        await lk.agent_dispatch.delete_dispatch(dispatch_id, room)


async def test_history_survives_restart_and_sigkill_marks_lost(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, done_room, lost_room = unique("hist"), unique("done"), unique("lost")
    daemon = await start_daemon(agent_table(name, TICKER))
    d1 = await dispatch(livekit_server, done_room, name)
    done = await job_in_room(daemon, done_room, "running")
    await end_job(livekit_server, d1, done_room)
    await wait_for(lambda: status_is(daemon, done["id"], "success"), 20, what="job 1 to end")
    await dispatch(livekit_server, lost_room, name)
    running = await job_in_room(daemon, lost_room, "running")
    old_pid = daemon.pid

    daemon.signal(signal.SIGKILL)
    await daemon.wait_exit(10)
    daemon.start()  # same manifest, same state directory
    await daemon.wait_registered()

    history = {j["id"]: j for j in cli_json(daemon, "jobs", "ls", "--all")}
    # `jobs ls --json` carries why each ended: LiveKit ended one, the daemon's death the other.
    assert (history[done["id"]]["status"], history[done["id"]]["cause"]) == (
        "success",
        "terminated",
    )
    lost = history[running["id"]]
    assert (lost["status"], lost["cause"]) == ("lost", "lost")
    assert lost["error"] == f"the daemon stopped while the job was running (pid {old_pid})"
    assert cli_json(daemon, "jobs", "ls") == []  # nothing runs now
    assert "1 job(s) were running when the previous daemon died" in daemon.log()
    shown = cli_json(daemon, "jobs", "show", done["id"])
    assert shown["job"]["status"] == "success" and any("tick" in x for x in shown["log"])


async def test_jobs_ls_filters(start_daemon: Any, livekit_server: Any) -> None:
    a, b = unique("fa"), unique("fb")
    daemon = await start_daemon(
        agent_table(a, TICKER) + agent_table(b, "tests.agents.behaviours:raises")
    )
    ra, rb = unique("ra"), unique("rb")
    await dispatch(livekit_server, ra, a)
    await dispatch(livekit_server, rb, b)
    await job_in_room(daemon, ra, "running")
    await job_in_room(daemon, rb, "failed")

    def ids(*args: str) -> list[str]:
        return [j["room"] for j in cli_json(daemon, "jobs", "ls", *args)]

    assert ids() == [ra]
    assert ids("--status", "failed") == [rb]
    assert ids("--status", "failed", "--status", "running") in ([ra, rb], [rb, ra])
    assert ids("--agent", a, "--all") == [ra]
    assert ids("--room", rb) == [rb]
    assert ids("--since", "1h", "--limit", "1") in ([ra], [rb])
    cut = daemon.cli("jobs", "ls", "--all", "--limit", "1")  # says when there may be more
    assert "the newest 1 shown; --limit N for more, --limit 0 for all" in cut.stderr
    assert "the newest" not in daemon.cli("jobs", "ls", "--all", "--limit", "0").stderr
    assert ids("--since", "2000-01-01T00:00", "--agent", b) == [rb]
    assert ids("--since", "0s") == []
    bad = daemon.cli("jobs", "ls", "--status", "exploded")
    assert bad.returncode == 1 and "unknown status 'exploded'" in bad.stderr


async def test_jobs_logs_follow(start_daemon: Any, livekit_server: Any) -> None:
    name, room = unique("tick"), unique("room")
    daemon = await start_daemon(agent_table(name, TICKER))
    dispatch_id = await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    follower = spawn_cli(daemon, "jobs", "logs", job["id"], "-f", "--tail", "1")
    try:
        seen: list[int] = []

        async def read_ticks() -> None:
            assert follower.stdout is not None
            while len(seen) < 5:
                line = await asyncio.to_thread(follower.stdout.readline)
                assert line, follower.stderr.read() if follower.stderr else "follow ended"
                if match := re.search(r"tick (\d+)$", line.strip()):
                    seen.append(int(match.group(1)))

        await asyncio.wait_for(read_ticks(), 20)
        assert seen == sorted(seen) and seen[-1] - seen[0] >= 4  # new lines, as they come
        await end_job(livekit_server, dispatch_id, room)
        # The follow ends by itself once the job has ended.
        assert await asyncio.to_thread(follower.wait, 20) == 0
    finally:
        if follower.poll() is None:
            follower.kill()
    plain = daemon.cli("jobs", "logs", job["id"], "--tail", "3")
    assert plain.returncode == 0 and len(plain.stdout.splitlines()) == 3


async def test_jobs_kill(start_daemon: Any, livekit_server: Any) -> None:
    name, r1, r2 = unique("victim"), unique("r1"), unique("r2")
    daemon = await start_daemon(agent_table(name, TICKER))
    await dispatch(livekit_server, r1, name)
    await dispatch(livekit_server, r2, name)
    gentle = await job_in_room(daemon, r1, "running")
    forced = await job_in_room(daemon, r2, "running")

    assert cli_json(daemon, "jobs", "kill", gentle["id"]) == {
        "job_id": gentle["id"],
        "action": "shutdown requested",
    }
    await wait_for(lambda: status_is(daemon, gentle["id"], "success"), 20, what="a clean stop")
    ended = await daemon.job(gentle["id"])
    assert ended["stop_reason"] == "stopped by `lkrun jobs kill`" and ended["cause"] == "killed"

    result = daemon.cli("jobs", "kill", forced["id"], "--force")
    assert result.returncode == 0 and result.stdout.strip() == f"{forced['id']}: killed"
    await wait_for(lambda: status_is(daemon, forced["id"], "failed"), 20, what="the kill")
    killed = await daemon.job(forced["id"])
    assert (killed["error"], killed["cause"]) == ("killed by `lkrun jobs kill --force`", "killed")
    assert not pid_alive(forced["pid"])

    again = daemon.cli("jobs", "kill", forced["id"])
    assert again.returncode == 1 and "is not running (status failed)" in again.stderr
    unknown = daemon.cli("jobs", "kill", "AJ_nope")
    assert unknown.returncode == 1 and "no job AJ_nope" in unknown.stderr


async def test_metrics_match_the_jobs_run(start_daemon: Any, livekit_server: Any) -> None:
    good, bad = unique("good"), unique("bad")
    daemon = await start_daemon(
        agent_table(good, TICKER, rooms=["m-*"])
        + agent_table(bad, "tests.agents.behaviours:raises")
    )
    rooms = [unique("m-") for _ in range(2)]
    ids = [await dispatch(livekit_server, room, good) for room in rooms]
    for room in rooms:
        await job_in_room(daemon, room, "running")
    for dispatch_id, room in zip(ids, rooms, strict=True):
        await end_job(livekit_server, dispatch_id, room)
    failed_room, declined_room = unique("m-"), unique("other")
    await dispatch(livekit_server, failed_room, bad)
    await job_in_room(daemon, failed_room, "failed")
    await dispatch(livekit_server, declined_room, good)
    await wait_for(lambda: f"room {declined_room!r} matches none" in daemon.log(), 20)
    for room in rooms:
        await job_in_room(daemon, room, "success")

    port = (await daemon.status())["http_port"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    assert value("lkrun_jobs_started_total", agent=good, warm="false") == 2
    assert value("lkrun_jobs_ended_total", agent=good, status="success") == 2
    assert value("lkrun_jobs_ended_total", agent=bad, status="failed") == 1
    assert value("lkrun_offers_total", agent=good, result="accepted") == 2
    assert value("lkrun_offers_total", agent=good, result="declined") == 1
    assert value("lkrun_offer_declines_total", agent=good, reason="rooms") == 1
    assert value("lkrun_offer_answer_seconds_count", agent=good) == 3
    assert value("lkrun_offer_to_entrypoint_seconds_count", agent=good, warm="false") == 2
    assert value("lkrun_registration_up", agent=good) == 1
    assert value("lkrun_jobs_running", agent=good) == 0
    assert value("lkrun_jobs_max", agent=good) == 16


async def test_every_json_output_parses(start_daemon: Any, livekit_server: Any) -> None:
    name, room = unique("js"), unique("room")
    daemon = await start_daemon(agent_table(name, TICKER))
    dispatched = cli_json(daemon, "dispatch", "--room", room, "--agent", name, "--wait")
    job_id = dispatched["job_id"]
    await job_in_room(daemon, room, "running")
    status = cli_json(daemon, "status")
    assert status["ready"] is True and status["agents"][0]["agent"] == name
    running = cli_json(daemon, "jobs", "ls")
    assert {"id", "agent", "room", "status", "pid", "age", "dispatch_id"} <= set(running[0])
    history = cli_json(daemon, "jobs", "ls", "--all")
    assert set(history[0]) >= set(running[0]) - {"memory_mb", "cpu_percent"}
    shown = cli_json(daemon, "jobs", "show", job_id)
    assert shown["job"]["id"] == job_id and isinstance(shown["log"], list)
    killed = cli_json(daemon, "jobs", "kill", job_id)
    assert killed["action"] == "shutdown requested"


async def test_status_exit_code_and_watch(start_daemon: Any, livekit_server: Any) -> None:
    name, room = unique("w"), unique("room")
    daemon = await start_daemon(agent_table(name, TICKER))
    assert daemon.cli("status").returncode == 0
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    watcher = spawn_cli(daemon, "jobs", "ls", "--watch")
    seen: list[str] = []
    try:

        def read_until_table() -> None:
            assert watcher.stdout is not None
            while line := watcher.stdout.readline():
                seen.append(line)
                if job["id"] in line:
                    return

        await asyncio.wait_for(asyncio.to_thread(read_until_table), 20)
        watcher.send_signal(signal.SIGINT)  # as a user stops it
        assert await asyncio.to_thread(watcher.wait, 10) == 0
    finally:
        if watcher.poll() is None:
            watcher.kill()
    out = "".join(seen)
    assert job["id"] in out and "MEM" in out and "CPU" in out
    daemon.signal(signal.SIGTERM)  # draining: not ready any more
    await wait_for(lambda: daemon.cli("status").returncode == 1, 10, what="status to fail")


def test_shell_completion() -> None:
    from tests.conftest import run_cli

    env = dict(os.environ, _LKRUN_COMPLETE="complete_bash", COMP_WORDS="lkrun jo", COMP_CWORD="1")
    result = subprocess.run(
        [sys.executable, "-c", "from lkrun.cli import app; app(prog_name='lkrun')"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.stdout.split() == ["jobs"]
    assert "--install-completion" in run_cli("--help").stdout
