"""Production lifecycle against the real livekit-server: drain, outages, limits, orphans."""

from __future__ import annotations

import re
import signal
from typing import Any

import psutil
from livekit import api

from tests.conftest import livekit_api, observer, pid_alive, unique, wait_for, wait_for_participant
from tests.helpers import agent_table, dispatch, echo_roundtrip, job_in_room, status_is


async def test_sigterm_drains_then_exits_zero(start_daemon: Any, livekit_server: Any) -> None:
    name, room_name, later = unique("drainer"), unique("room"), unique("later")
    daemon = await start_daemon(agent_table(name, "tests.agents.behaviours:drain_aware"))
    worker_id = (await daemon.status())["agents"][0]["worker_id"]
    assert (await daemon.http("/readyz"))[0] == 200
    heard: list[bytes] = []
    async with observer(livekit_server, room_name) as room:
        room.on("data_received", lambda p: heard.append(p.data))
        dispatch_id = await dispatch(livekit_server, room_name, name)
        agent = await wait_for_participant(room, f"{name}-")
        job = await job_in_room(daemon, room_name, "running")

        daemon.signal(signal.SIGTERM)
        await wait_for(
            lambda: b"draining" in heard, 10, what="the entrypoint to learn of the drain"
        )
        code, body = await daemon.http("/readyz")
        assert code == 503 and body["reason"] == "draining"
        assert (await daemon.http("/healthz"))[0] == 200
        await wait_for(
            lambda: livekit_server.worker_statuses(worker_id)[-1:] == ["WS_FULL"],
            10,
            what="the server to see WS_FULL",
        )
        # No new job is accepted while draining; the running one still works.
        await dispatch(livekit_server, later, name)
        assert await echo_roundtrip(room, agent.identity, b"still serving") == b"still serving"
        assert daemon.proc.poll() is None
        assert await daemon.metric("lkrun_offers_total", agent=name) == 1  # the first job's

        async with livekit_api(livekit_server) as lk:
            await lk.agent_dispatch.delete_dispatch(dispatch_id, room_name)
        assert await daemon.wait_exit(30) == 0
    assert not pid_alive(job["pid"])
    # Its history, read after the exit: the drained job succeeded, and no other ever started.
    assert [(j["id"], j["room"], j["status"], j["cause"]) for j in daemon.history()] == [
        (job["id"], room_name, "success", "terminated")
    ]


async def test_second_signal_skips_the_drain(start_daemon: Any, livekit_server: Any) -> None:
    name, room_name = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "running")
    daemon.signal(signal.SIGTERM)
    await wait_for(lambda: "draining:" in daemon.log(), 10, what="the drain to start")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(30) == 0
    assert not pid_alive(job["pid"])
    assert f"job {job['id']} succeeded (daemon shutting down)" in daemon.log()


async def test_drain_timeout_asks_jobs_to_stop(start_daemon: Any, livekit_server: Any) -> None:
    name, room_name = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name), "--drain-timeout", "1s")
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "running")
    daemon.signal(signal.SIGTERM)
    assert await daemon.wait_exit(30) == 0
    assert "drain over with jobs still running" in daemon.log()
    assert f"job {job['id']} succeeded (daemon shutting down)" in daemon.log()


async def test_server_outage_keeps_jobs_and_reconnects(start_daemon: Any, own_server: Any) -> None:
    server = own_server.info
    name, first, second, third = unique("steady"), unique("r1"), unique("r2"), unique("r3")
    # This agent does not depend on its room, so only the daemon could end its jobs.
    daemon = await start_daemon(
        agent_table(name, "tests.agents.behaviours:waits_for_shutdown"), server=server
    )
    old_worker = (await daemon.status())["agents"][0]["worker_id"]
    await dispatch(server, first, name)
    await dispatch(server, second, name)
    keeper = await job_in_room(daemon, first, "running")
    victim = await job_in_room(daemon, second, "running")

    own_server.stop()

    async def down() -> bool:
        return not (await daemon.status())["agents"][0]["connected"]

    await wait_for(down, 30, what="the registration to notice the outage")
    code, body = await daemon.http("/readyz")
    assert code == 503 and "not registered" in body["reason"]
    # A job that ends during the outage is recorded now and reported later.
    psutil.Process(victim["pid"]).kill()
    await job_in_room(daemon, second, "failed")

    own_server.start()
    status = await daemon.wait_registered(60)
    agent = status["agents"][0]
    assert agent["reconnects"] >= 1 and agent["worker_id"] != old_worker
    assert (await daemon.http("/readyz"))[0] == 200

    def reported() -> bool:
        return any(
            "job update for unknown job" in line and victim["id"] in line
            for line in server.log_path.read_text(errors="replace").splitlines()
        )

    await wait_for(reported, 15, what="the final status to reach the restarted server")
    await dispatch(server, third, name)
    await job_in_room(daemon, third, "running")
    assert pid_alive(keeper["pid"])
    assert (await daemon.job(keeper["id"]))["status"] == "running"


async def _failed_job(daemon: Any, server: Any, name: str) -> dict[str, Any]:
    room_name = unique("room")
    await dispatch(server, room_name, name)
    return await job_in_room(daemon, room_name, "failed")


async def test_job_killed_by_signal_fails_with_reason(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "running")
    psutil.Process(job["pid"]).kill()
    failed = await job_in_room(daemon, room_name, "failed")
    assert failed["error"].startswith("job process killed by SIGKILL"), failed
    assert (failed["exit_code"], failed["cause"]) == (-9, "signal")


async def test_hung_job_is_killed_after_shutdown_timeout(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("hung"), unique("room")
    daemon = await start_daemon(
        agent_table(name, "tests.agents.behaviours:ignores_shutdown"), "--shutdown-timeout", "1s"
    )
    dispatch_id = await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "running")
    async with livekit_api(livekit_server) as lk:
        await lk.agent_dispatch.delete_dispatch(dispatch_id, room_name)
    failed = await job_in_room(daemon, room_name, "failed")
    assert failed["error"] == (
        "did not stop within 1s of a shutdown request (terminated by LiveKit)"
    ), failed
    assert failed["cause"] == "terminated"  # a kill lkrun did, for LiveKit's termination
    assert not pid_alive(job["pid"])


async def test_job_over_memory_limit_is_killed(start_daemon: Any, livekit_server: Any) -> None:
    name = unique("hog")
    daemon = await start_daemon(
        agent_table(name, "tests.agents.behaviours:eats_memory", memory_limit_mb=150)
    )
    failed = await _failed_job(daemon, livekit_server, name)
    assert re.fullmatch(
        r"memory limit exceeded: \d+ MB in \d+ process\(es\) > memory_limit_mb=150", failed["error"]
    ), failed
    assert failed["peak_memory_mb"] > 150 and failed["cause"] == "memory_limit"


async def test_job_past_its_timeout_fails(start_daemon: Any, livekit_server: Any) -> None:
    name = unique("slow")
    daemon = await start_daemon(agent_table(name, job_timeout="2s"))
    failed = await _failed_job(daemon, livekit_server, name)
    assert failed["error"] == "job exceeded job_timeout=2s", failed
    assert failed["exit_code"] == 0  # it stopped when asked, and still counts as failed
    assert failed["cause"] == "job_timeout"


async def test_entrypoint_that_fails_to_import_at_job_time(
    start_daemon: Any, livekit_server: Any
) -> None:
    name = unique("fragile")
    daemon = await start_daemon(
        agent_table(name, "fragile_agent:entrypoint"),
        files={"fragile_agent.py": "from lkrun.examples.echo import entrypoint\n"},
    )
    # Broken on disk after the daemon checked it: each job imports the code anew.
    (daemon.dir / "fragile_agent.py").write_text("raise ImportError('broken on disk')\n")
    failed = await _failed_job(daemon, livekit_server, name)
    assert failed["error"].startswith("cannot load entrypoint fragile_agent:entrypoint"), failed
    assert "broken on disk" in failed["error"] and failed["cause"] == "start_failed"


async def test_daemon_sigkill_leaves_no_process(start_daemon: Any, livekit_server: Any) -> None:
    name, room_name = unique("parent"), unique("room")
    daemon = await start_daemon(agent_table(name, "tests.agents.behaviours:spawns_grandchild"))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "running")
    match = await wait_for(
        lambda: re.search(rf"\[{name} {job['id']}\] .*grandchild pid (\d+)", daemon.log()),
        10,
        what="the grandchild's pid",
    )
    grandchild = int(match.group(1))
    tree = [job["pid"], grandchild]
    assert all(psutil.pid_exists(p) for p in tree)
    daemon.signal(signal.SIGKILL)

    def all_gone() -> bool:
        return not any(pid_alive(p) for p in tree)

    await wait_for(all_gone, 2.0, interval=0.05, what="the job and its child to die")


async def test_job_ends_when_room_is_deleted(start_daemon: Any, livekit_server: Any) -> None:
    name, room_name = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name))
    async with observer(livekit_server, room_name) as room:
        await dispatch(livekit_server, room_name, name)
        await wait_for_participant(room, f"{name}-")  # in the room, not only started
    job = await job_in_room(daemon, room_name, "running")
    async with livekit_api(livekit_server) as lk:
        await lk.room.delete_room(api.DeleteRoomRequest(room=room_name))
    await wait_for(lambda: status_is(daemon, job["id"], "success"), 20, what="the job to end")
    assert not pid_alive(job["pid"])


async def test_server_unreachable_at_start_is_retried(start_daemon: Any, own_server: Any) -> None:
    name = unique("early")
    own_server.stop()
    daemon = await start_daemon(agent_table(name), server=own_server.info, wait=False)

    async def retrying() -> bool:
        try:
            agent = (await daemon.status())["agents"][0]
        except Exception:
            return False
        return agent["reconnects"] >= 1 and "connect" in agent["last_error"].lower()

    await wait_for(retrying, 30, what="the daemon to retry the unreachable server")
    assert daemon.proc.poll() is None
    own_server.start()
    await daemon.wait_registered(60)
