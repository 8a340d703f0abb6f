"""A dead daemon's calls get their agents back (issue 19, item 2), against the real
livekit-server: when it restarts on its state directory, and through `lkrun recover` when it
never comes back. Callers are plain rtc.Room observers."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from typing import Any

from livekit import rtc

from tests.conftest import observer, pid_alive, unique, wait_for, wait_for_participant
from tests.helpers import agent_table, dispatch, job_in_room

RECOVERED_FROM = "lkrun.recovered_from"


def replacement(room: rtc.Room, job_id: str) -> rtc.RemoteParticipant | None:
    """The agent participant that replaces job ``job_id`` in the room, if it is there."""
    return next(
        (
            p
            for p in room.remote_participants.values()
            if p.attributes.get(RECOVERED_FROM) == job_id
        ),
        None,
    )


async def calls_in_progress(
    daemon: Any, server: Any, name: str, rooms: list[str], stack: contextlib.AsyncExitStack
) -> dict[str, tuple[rtc.Room, dict[str, Any]]]:
    """A caller in each room and the agent with it: room -> (caller, running job)."""
    calls = {}
    for room_name in rooms:
        room = await stack.enter_async_context(observer(server, room_name))
        await dispatch(server, room_name, name, metadata=f"call {room_name}")
        await wait_for_participant(room, f"{name}-")
        calls[room_name] = (room, await job_in_room(daemon, room_name, "running"))
    return calls


async def sigkill(daemon: Any, jobs: list[dict[str, Any]]) -> None:
    daemon.signal(signal.SIGKILL)
    await daemon.wait_exit(10)
    # Its job processes die with it (parent-death signal, stdin closed).
    await wait_for(lambda: not any(pid_alive(j["pid"]) for j in jobs), 5, what="its jobs to die")


async def test_a_restarted_daemon_brings_back_the_agents_of_calls_still_on(
    start_daemon: Any, livekit_server: Any
) -> None:
    name = unique("echo")
    daemon = await start_daemon(agent_table(name, on_failure="redispatch", max_redispatches=1))
    staying = [unique("on") for _ in range(3)]
    leaving = unique("left")
    async with contextlib.AsyncExitStack() as stack:
        calls = await calls_in_progress(daemon, livekit_server, name, [*staying, leaving], stack)
        jobs = {room: job for room, (_, job) in calls.items()}
        await sigkill(daemon, list(jobs.values()))
        await calls[leaving][0].disconnect()  # that caller hangs up meanwhile

        daemon.start()  # the same state directory: its history knows what ran
        await daemon.wait_registered()
        ready_at = time.monotonic()
        for room_name in staying:
            room, old = calls[room_name]
            agent = await wait_for(
                lambda room=room, old=old: replacement(room, old["id"]),
                5 - (time.monotonic() - ready_at),
                what=f"the agent of {room_name} back within 5 s of the restart being ready",
            )
            assert agent.attributes["lkrun.attempt"] == "1"
            print(f"{room_name}: agent back {time.monotonic() - ready_at:.2f}s after ready")
            # The dead job's agent participant (a ghost until its connection times out) is
            # removed; the new one is the only agent with the caller.
            await wait_for(
                lambda room=room, old=old: old["identity"] not in room.remote_participants,
                5,
                what="the ghost to be removed",
            )

        async def decided() -> bool:
            found = {j["id"]: j for j in await daemon.jobs()}
            return all(found.get(job["id"], {}).get("recovery") for job in jobs.values())

        await wait_for(decided, 10, what="a recovery decision for every lost job")
        history = {j["id"]: j for j in await daemon.jobs()}
        for room_name in staying:
            old = history[jobs[room_name]["id"]]
            assert old["status"] == "lost"
            assert old["recovery"].startswith("redispatched as attempt 1"), old
            [new] = [j for j in history.values() if j["recovered_from"] == old["id"]]
            assert (new["room"], new["attempt"], new["status"]) == (room_name, 1, "running")
            assert new["metadata"] == f"call {room_name}"  # the call's own, sent again
        left = history[jobs[leaving]["id"]]
        assert left["status"] == "lost" and left["recovery"].startswith("not redispatched"), left
        # Nothing came back to the room whose caller had left.
        assert [j["id"] for j in history.values() if j["room"] == leaving] == [left["id"]]
        assert await daemon.metric("lkrun_recoveries_total", agent=name, cause="lost") == 3


async def test_a_job_being_stopped_on_purpose_when_its_daemon_dies_is_not_redispatched(
    start_daemon: Any, livekit_server: Any
) -> None:
    """`jobs kill` asked, the job still stopping (it ignores the ask), the daemon SIGKILLed:
    at the restart the job is lost, but the call was being ended on purpose."""
    name, room_name = unique("stubborn"), unique("call")
    entry = "tests.agents.behaviours:ignores_shutdown"
    daemon = await start_daemon(
        agent_table(name, entry, on_failure="redispatch", shutdown_timeout="60s")
    )
    async with observer(livekit_server, room_name) as room:
        await dispatch(livekit_server, room_name, name)
        await wait_for_participant(room, f"{name}-")
        job = await job_in_room(daemon, room_name, "running")
        assert daemon.cli("jobs", "kill", job["id"]).returncode == 0

        def stopping() -> bool:
            rows = [r for r in daemon.history() if r["id"] == job["id"]]
            return bool(rows) and (rows[0]["status"], rows[0]["stop_cause"]) == (
                "stopping",
                "killed",
            )

        await wait_for(stopping, 10, what="the kill's ask in the history")
        await sigkill(daemon, [job])

        daemon.start()
        await daemon.wait_registered()

        def decided() -> dict[str, Any] | None:
            rows = [r for r in daemon.history() if r["id"] == job["id"] and r["recovery"]]
            return rows[0] if rows else None

        row = await wait_for(decided, 10, what="the lost job's recovery decision")
        assert (row["status"], row["recovery_skip"]) == ("lost", "stopped"), row
        skipped = await daemon.metric(
            "lkrun_recoveries_skipped_total", agent=name, reason="stopped"
        )
        assert skipped == 1
        assert not replacement(room, job["id"])
        assert [j["id"] for j in await daemon.jobs() if j["room"] == room_name] == [job["id"]]


async def test_recover_redispatches_a_dead_daemon_s_calls_and_is_refused_while_it_lives(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, other = unique("echo"), unique("quiet")
    manifest = agent_table(name, on_failure="redispatch") + agent_table(other)
    dead = await start_daemon(manifest)
    rooms = [unique("call"), unique("call")]
    quiet_room = unique("quiet")
    async with contextlib.AsyncExitStack() as stack:
        calls = await calls_in_progress(dead, livekit_server, name, rooms, stack)
        calls.update(await calls_in_progress(dead, livekit_server, other, [quiet_room], stack))
        jobs = {room: job for room, (_, job) in calls.items()}
        # The survivor serves the same agent, on a state directory of its own.
        survivor = await start_daemon(agent_table(name))
        await sigkill(dead, list(jobs.values()))

        state = dead.dir / "state" / "lkrun"
        busy = survivor.cli("recover", "--state-dir", str(survivor.dir / "state" / "lkrun"))
        assert busy.returncode == 1, busy
        [line] = busy.stderr.splitlines()
        assert line.startswith("error: ") and f"(pid {survivor.pid})" in line, line

        done = survivor.cli("recover", "--state-dir", str(state), "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        outcome = {j["room"]: (j["redispatched"], j["skip"]) for j in report["jobs"]}
        assert outcome == {
            rooms[0]: (True, None),
            rooms[1]: (True, None),
            quiet_room: (False, "policy_off"),  # its agent's on_failure is "none"
        }
        for room_name in rooms:
            room, old = calls[room_name]
            await wait_for(
                lambda room=room, old=old: replacement(room, old["id"]),
                10,
                what=f"the survivor's agent in {room_name}",
            )
            await job_in_room(survivor, room_name, "running")
        assert not replacement(calls[quiet_room][0], jobs[quiet_room]["id"])

        # The dead daemon's history says what was done; the survivor's running jobs are
        # its own and untouched.
        history = {row["room"]: row for row in dead.history()}
        assert {r: history[r]["status"] for r in jobs} == {r: "lost" for r in jobs}
        assert history[rooms[0]]["recovery"].startswith("redispatched as attempt 1")
        again = survivor.cli("recover", "--state-dir", str(state), "--json")
        assert json.loads(again.stdout)["jobs"] == []  # each lost job is recovered once
