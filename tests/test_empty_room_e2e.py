"""A job left alone ends (issue 19, item 3), end to end against the real livekit-server.

An agent with ``empty_timeout = "3s"``: its caller (a plain rtc.Room) leaves, and the job
ends about 3 s later, a success with the reason "room empty"; a job nobody ever joined ends
the same way; an agent without the setting stays. livekit-agents apps (each tested version,
in its own virtualenv): the AgentSession's close_on_disconnect closes the session when the
caller leaves, but that does not end the job; empty_timeout does.

The server itself closes a room 20 s (its departure_timeout) after the last non-agent left,
which would end every job: each "still running" check here comes well before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from livekit import rtc

from lkrun.child.framework import compat
from tests.conftest import room_token, unique, wait_for, wait_for_participant
from tests.envs import EnvFactory
from tests.helpers import agent_table, dispatch, job_in_room, status_is
from tests.test_framework_apps import CPU_OFF, events
from tests.test_framework_versions import agents_env

ECHO = "lkrun.examples.echo:entrypoint"
VERSIONS_APP = Path(__file__).parent / "lka_apps" / "versions.py"
# When the job ended, in seconds after its caller left: empty_timeout = 3 s, plus the
# server telling the agent of the leave and the job's own shutdown, on a busy machine.
BAND = (2.5, 6.0)
STAYS_FOR = 7.0  # how long after the leave a job without the setting is seen still running


@contextlib.asynccontextmanager
async def caller(server: Any, room_name: str) -> AsyncIterator[rtc.Room]:
    """A plain participant, whom the test makes leave (disconnect) when it chooses."""
    room = rtc.Room()
    await room.connect(server.url, room_token(server, room_name, unique("caller")))
    try:
        yield room
    finally:
        if room.isconnected():
            await room.disconnect()


def row(daemon: Any, job_id: str) -> dict[str, Any]:
    [found] = [r for r in daemon.history() if r["id"] == job_id]
    return found


def assert_room_empty(record: dict[str, Any]) -> None:
    assert (record["status"], record["stop_reason"]) == ("success", "room empty"), record
    assert not record["error"]
    assert record["cause"] == "room_empty", record


async def still_running_until(daemon: Any, job_id: str, deadline: float) -> None:
    """The job does not end before ``deadline`` (time.time()), and is running then."""
    with pytest.raises(AssertionError, match="timed out"):
        await wait_for(
            lambda: status_is(daemon, job_id, "success"),
            max(0.0, deadline - time.time()),
            what="the job without empty_timeout to end (it must not)",
        )
    assert await status_is(daemon, job_id, "running")


async def test_a_job_left_alone_ends_after_empty_timeout_and_one_without_stays(
    start_daemon: Any, livekit_server: Any
) -> None:
    quick, stays = unique("quick"), unique("stays")
    left_room, kept_room, nobody_room = unique("left"), unique("kept"), unique("nobody")
    daemon = await start_daemon(
        agent_table(quick, ECHO, empty_timeout="3s") + agent_table(stays, ECHO)
    )
    async with caller(livekit_server, left_room) as a, caller(livekit_server, kept_room) as b:
        await asyncio.gather(
            dispatch(livekit_server, left_room, quick),
            dispatch(livekit_server, kept_room, stays),
            dispatch(livekit_server, nobody_room, quick),  # creates the room; nobody comes
        )
        await wait_for_participant(a, f"{quick}-")
        await wait_for_participant(b, f"{stays}-")
        left_job = await job_in_room(daemon, left_room, "running")
        kept_job = await job_in_room(daemon, kept_room, "running")

        # Nobody ever came: counted from the job's being in the room.
        nobody_job = await job_in_room(daemon, nobody_room)
        await wait_for(lambda: status_is(daemon, nobody_job["id"], "success"), 20)
        record = row(daemon, nobody_job["id"])
        assert_room_empty(record)
        # started_at is the entrypoint's call, before its join: the 3 s begin a bit later.
        assert 3.0 <= record["ended_at"] - record["started_at"] <= 3.0 + BAND[1], record

        # The callers leave together; only the job of the agent with empty_timeout ends.
        assert await status_is(daemon, left_job["id"], "running")
        await asyncio.gather(a.disconnect(), b.disconnect())
        left_at = time.time()
        await wait_for(lambda: status_is(daemon, left_job["id"], "success"), 20)
        record = row(daemon, left_job["id"])
        assert_room_empty(record)
        assert BAND[0] <= record["ended_at"] - left_at <= BAND[1], record["ended_at"] - left_at

        await still_running_until(daemon, kept_job["id"], left_at + STAYS_FOR)


async def test_someone_joining_stops_the_count(start_daemon: Any, livekit_server: Any) -> None:
    """Alone for 2 of its 4 s, then a caller comes: the job is still running 4 s after it
    was first alone; it ends 4 s after the caller left."""
    name, room_name = unique("recount"), unique("recount")
    daemon = await start_daemon(agent_table(name, ECHO, empty_timeout="4s"))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "running")
    alone_since = time.time()  # about: the job joins an empty room
    await wait_for(lambda: time.time() - alone_since >= 2.0, 5, what="2 s alone")
    async with caller(livekit_server, room_name) as room:
        await wait_for_participant(room, f"{name}-")
        await wait_for(lambda: time.time() - alone_since >= 5.0, 10, what="past the first 4 s")
        assert await status_is(daemon, job["id"], "running")
        await room.disconnect()
        left_at = time.time()
    await wait_for(lambda: status_is(daemon, job["id"], "success"), 20)
    record = row(daemon, job["id"])
    assert_room_empty(record)
    assert BAND[0] + 1 <= record["ended_at"] - left_at <= BAND[1] + 1, record["ended_at"] - left_at


@pytest.mark.parametrize("version", compat.TESTED)
async def test_a_livekit_agents_session_closed_on_disconnect_leaves_the_job_to_empty_timeout(
    python_env: EnvFactory, start_daemon: Any, livekit_server: Any, tmp_path: Path, version: str
) -> None:
    """RoomOptions.close_on_disconnect (on by default) closes the AgentSession as soon as
    its caller leaves, but the job goes on (the agent stays in the room, its process runs);
    empty_timeout ends it, as "room empty", with the framework's shutdown."""
    env = agents_env(python_env, version)
    name, room_name = unique("lka-empty"), unique("lka-empty")
    log = tmp_path / "events.jsonl"
    table = agent_table(
        name,
        f"{VERSIONS_APP}:server",
        python=str(env.python),
        empty_timeout="4s",
        env={"LKA_EVENTS": str(log), "LKA_AGENT_NAME": name},
    )
    daemon = await start_daemon(CPU_OFF + table)
    async with caller(livekit_server, room_name) as room:
        await dispatch(livekit_server, room_name, name)
        agent = await wait_for_participant(room, "agent-")
        await wait_for(
            lambda: agent.attributes.get("lka.version") == version, 60, what="the session"
        )
        job = await job_in_room(daemon, room_name, "running")
        await room.disconnect()
        left_at = time.time()

    def closed() -> dict[str, Any] | None:
        return next((e for e in events(log) if e["event"] == "session_closed"), None)

    session_closed = await wait_for(closed, 10, what="the AgentSession to close")
    assert session_closed["reason"] == "participant_disconnected"
    # The session is closed; the job is not: it runs until its empty_timeout.
    await still_running_until(daemon, job["id"], left_at + 3.0)
    await wait_for(lambda: status_is(daemon, job["id"], "success"), 20)
    record = row(daemon, job["id"])
    assert_room_empty(record)
    assert BAND[0] + 1 <= record["ended_at"] - left_at <= BAND[1] + 1, record["ended_at"] - left_at
    [shutdown] = [e for e in events(log) if e["event"] == "shutdown"]
    assert shutdown["reason"] == "room empty"  # the app's shutdown callback heard why
