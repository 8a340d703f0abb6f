"""End to end against a real livekit-server: dispatch, jobs, limits, failures."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from tests.conftest import (
    livekit_api,
    observer,
    pid_alive,
    unique,
    wait_for,
    wait_for_participant,
)
from tests.helpers import (
    agent_table,
    dispatch,
    echo_roundtrip,
    job_in_room,
    status_is,
)


async def test_explicit_dispatch_with_cli_echoes(start_daemon: Any, livekit_server: Any) -> None:
    name, room_name = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name, identity="{agent}-{job_id}"))
    async with observer(livekit_server, room_name) as room:
        result = daemon.cli(
            "dispatch", "--room", room_name, "--agent", name, "--metadata", "m1", "--json"
        )
        assert result.returncode == 0, result.stderr
        dispatch_id = json.loads(result.stdout)["dispatch_id"]
        assert dispatch_id.startswith("AD_")

        agent = await wait_for_participant(room, f"{name}-")
        assert await echo_roundtrip(room, agent.identity, b"ping-1") == b"ping-1"

        job = await job_in_room(daemon, room_name, "running")
        assert job["dispatch_id"] == dispatch_id
        # connect() announces the job id, which also makes LiveKit show the agent at once.
        await wait_for(
            lambda: agent.attributes.get("lkrun.job_id") == job["id"],
            10,
            what="the lkrun.job_id attribute",
        )
        assert job["agent"] == name and job["identity"] == agent.identity

        listing = daemon.cli("jobs", "ls", "--json")
        assert listing.returncode == 0, listing.stderr
        [listed] = [j for j in json.loads(listing.stdout) if j["id"] == job["id"]]
        assert listed["status"] == "running" and listed["pid"] == job["pid"]
        table = daemon.cli("jobs", "ls")
        assert job["id"] in table.stdout and room_name in table.stdout
    # The entrypoint saw the dispatch's metadata.
    assert (
        f"[{name} {job['id']}] INFO lkrun.job.{name}: echo ready in room {room_name} "
        "(dispatch metadata: 'm1')" in daemon.log()
    )


async def test_automatic_dispatch_joins_new_room(start_daemon: Any, livekit_server: Any) -> None:
    name, room_name = unique("greeter"), unique("auto")
    daemon = await start_daemon(
        agent_table(name, "lkrun.examples.greeter:entrypoint", dispatch="automatic")
    )
    greetings: list[str] = []
    async with observer(livekit_server, room_name) as room:
        room.on("data_received", lambda p: greetings.append(p.data.decode()))
        agent = await wait_for_participant(room, f"{name}-")
        assert agent.attributes.get("lk.agent.name", "") == ""  # automatic: registered unnamed
        await wait_for(
            lambda: any(g.startswith("hello observer-") for g in greetings), 15, what="a greeting"
        )
    job = await job_in_room(daemon, room_name)
    assert job["agent"] == name
    [agent_status] = (await daemon.status())["agents"]
    assert agent_status["dispatch"] == "automatic" and agent_status["registered_name"] == ""


async def test_two_agents_each_in_own_subprocess(start_daemon: Any, livekit_server: Any) -> None:
    a, b, room_name = unique("alpha"), unique("beta"), unique("room")
    daemon = await start_daemon(agent_table(a) + agent_table(b))
    async with observer(livekit_server, room_name) as room:
        await dispatch(livekit_server, room_name, a)
        await dispatch(livekit_server, room_name, b)
        pa = await wait_for_participant(room, f"{a}-")
        pb = await wait_for_participant(room, f"{b}-")
        assert await echo_roundtrip(room, pa.identity, b"to-a") == b"to-a"
        assert await echo_roundtrip(room, pb.identity, b"to-b") == b"to-b"
        jobs = await wait_for(
            lambda: _running_in(daemon, room_name, 2), 20, what="two running jobs"
        )
    assert {j["agent"] for j in jobs} == {a, b}
    pids = {j["pid"] for j in jobs}
    assert len(pids) == 2 and daemon.pid not in pids
    zygotes = set()
    for pid in pids:  # forked by the agent's own fork server, which the daemon started
        cmdline, ppid = proc_info(pid)
        assert b"lkrun.child.zygote" in cmdline
        zygotes.add(ppid)
        assert proc_info(ppid)[1] == daemon.pid
        assert os.getpgid(pid) == pid  # its own process group
    assert len(zygotes) == 2 and not zygotes & pids


def proc_info(pid: int) -> tuple[list[bytes], int]:
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return cmdline, ppid


async def _running_in(daemon: Any, room: str, count: int) -> list[dict[str, Any]] | None:
    jobs = [j for j in await daemon.jobs() if j["room"] == room and j["status"] == "running"]
    return jobs if len(jobs) == count else None


async def test_rooms_pattern_declines_other_rooms(start_daemon: Any, livekit_server: Any) -> None:
    name = unique("support")
    daemon = await start_daemon(agent_table(name, rooms=["support-*"]))
    wrong, right = unique("sales"), unique("support")
    await dispatch(livekit_server, wrong, name)
    await wait_for(
        lambda: f"room {wrong!r} matches none of" in daemon.log(), 20, what="the decline"
    )
    async with observer(livekit_server, right) as room:
        await dispatch(livekit_server, right, name)
        await wait_for_participant(room, f"{name}-")
    jobs = await daemon.jobs()
    assert [j["room"] for j in jobs] == [right]  # the declined job never started


async def test_max_jobs_reports_full_and_frees(start_daemon: Any, livekit_server: Any) -> None:
    name = unique("single")
    daemon = await start_daemon(agent_table(name, max_jobs=1))
    [agent] = (await daemon.status())["agents"]
    worker_id = agent["worker_id"]
    first, second, third = unique("r1"), unique("r2"), unique("r3")
    d1 = await dispatch(livekit_server, first, name)
    job1 = await job_in_room(daemon, first, "running")

    # The server itself recorded WS_FULL for this worker.
    await wait_for(
        lambda: livekit_server.worker_statuses(worker_id)[-1:] == ["WS_FULL"],
        10,
        what="the server to see WS_FULL",
    )
    [agent] = (await daemon.status())["agents"]
    assert agent["full"] is True and agent["jobs"] == 1
    # A full worker is not offered the next job.
    await dispatch(livekit_server, second, name)

    async with livekit_api(livekit_server) as lk:
        await lk.agent_dispatch.delete_dispatch(d1, first)
    await wait_for(lambda: status_is(daemon, job1["id"], "success"), 20, what="job 1 to end")
    await wait_for(
        lambda: livekit_server.worker_statuses(worker_id)[-1:] == ["WS_AVAILABLE"],
        10,
        what="the server to see WS_AVAILABLE again",
    )
    assert not (await daemon.status())["agents"][0]["full"]
    await dispatch(livekit_server, third, name)
    await job_in_room(daemon, third, "running")
    assert all(j["room"] != second for j in await daemon.jobs())
    # Never even offered: two offers in all (the first and the third room), none declined.
    assert await daemon.metric("lkrun_offers_total", agent=name, result="accepted") == 2
    assert await daemon.metric("lkrun_offers_total", agent=name, result="declined") == 0


async def test_deleting_dispatch_ends_job_as_success(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name))
    async with observer(livekit_server, room_name) as room:
        dispatch_id = await dispatch(livekit_server, room_name, name)
        agent = await wait_for_participant(room, f"{name}-")
        job = await job_in_room(daemon, room_name, "running")
        async with livekit_api(livekit_server) as lk:
            await lk.agent_dispatch.delete_dispatch(dispatch_id, room_name)
        await wait_for(lambda: not pid_alive(job["pid"]), 20, what="the job process to exit")
        await wait_for(
            lambda: agent.identity not in room.remote_participants, 20, what="the agent to leave"
        )
    ended = await daemon.job(job["id"])
    assert ended is not None and ended["status"] == "success", ended
    assert ended["error"] == "" and ended["exit_code"] == 0


async def test_entrypoint_that_raises_fails_with_error_text(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("raiser"), unique("room")
    daemon = await start_daemon(agent_table(name, "tests.agents.behaviours:raises"))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "failed")
    assert job["error"] == f"RuntimeError: boom from job {job['id']}"
    listing = daemon.cli("jobs", "ls", "--all")
    assert "failed" in listing.stdout and "RuntimeError: boom" in listing.stdout
    assert f"[{name} {job['id']}]" in daemon.log()  # the traceback, tagged with the job id

    # LiveKit was told too (the open-source server records it in its log, not in ListDispatch).
    def server_recorded() -> bool:
        return any(
            "job ended" in line
            and job["id"] in line
            and '"status": "JS_FAILED"' in line
            and "RuntimeError: boom" in line
            for line in livekit_server.log_path.read_text(errors="replace").splitlines()
        )

    await wait_for(server_recorded, 15, what="the server to record the failure")


async def test_entrypoint_printing_to_stdout_still_works(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("printer"), unique("room")
    daemon = await start_daemon(agent_table(name, "tests.agents.behaviours:prints_then_echoes"))
    async with observer(livekit_server, room_name) as room:
        await dispatch(livekit_server, room_name, name)
        agent = await wait_for_participant(room, f"{name}-")
        assert await echo_roundtrip(room, agent.identity, b"still here") == b"still here"
        job = await job_in_room(daemon, room_name, "running")
    log = daemon.log()
    assert f"[{name} {job['id']}] hello from print()" in log
    assert f"[{name} {job['id']}] raw write to fd 1" in log


async def test_daemon_sigkill_takes_jobs_with_it(start_daemon: Any, livekit_server: Any) -> None:
    name, room_name = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "running")
    os.kill(daemon.pid, signal.SIGKILL)
    await wait_for(lambda: not pid_alive(job["pid"]), 5, what="the job process to die")
