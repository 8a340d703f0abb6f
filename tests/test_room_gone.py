"""A job whose room was deleted before its agent joined (issue 17, item 16).

Joining with the job's token would create the room anew (a new sid) and the job would run
for ever in an empty room. The job must end at once, failed, saying why, and the daemon
deletes the room the join made (only agents were in it): end to end against a real server.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from tests.conftest import livekit_api, unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room, status_is

CPU_OFF = '[daemon]\nload_threshold = "off"\n'


@pytest.mark.parametrize(
    "entrypoint",
    ["tests.agents.late_join:connects_when_told", "tests.lka_apps.late_join:entrypoint"],
    ids=["lkrun", "livekit-agents"],
)
async def test_job_whose_room_was_deleted_fails_and_does_not_bring_it_back(
    start_daemon: Any, livekit_server: Any, tmp_path: Path, entrypoint: str
) -> None:
    name, room_name = unique("late"), unique("gone")
    go = tmp_path / "go"
    daemon = await start_daemon(CPU_OFF + agent_table(name, entrypoint), "--log-format", "json")
    async with livekit_api(livekit_server) as lk:
        created = await lk.room.create_room(api.CreateRoomRequest(name=room_name))
        await dispatch(livekit_server, room_name, name, metadata=str(go))
        job = await job_in_room(daemon, room_name, "running")  # waiting for the go file
        # Each kind's default identity (item 20): the official worker's form for its apps.
        prefix = name if entrypoint.startswith("tests.agents.") else "agent"
        assert job["identity"] == f"{prefix}-{job['id']}"
        await lk.room.delete_room(api.DeleteRoomRequest(room=room_name))
    go.touch()

    await wait_for(lambda: status_is(daemon, job["id"], "failed"), 30, what="a failure")
    listing = daemon.cli("jobs", "ls", "--all", "--json")
    [listed] = [j for j in json.loads(listing.stdout) if j["id"] == job["id"]]
    said = re.search(
        rf"room {re.escape(repr(room_name))} was deleted before the agent joined "
        rf"\(assigned sid {created.sid}, joined (\w+)\)$",
        listed["error"],
    )
    assert said is not None, listed["error"]
    assert said[1] != created.sid  # the join made a new room

    # The join made a new room (auto_create): the daemon deletes it, as only agents were in it.
    async with livekit_api(livekit_server) as lk:

        async def room_is_gone() -> bool:
            listed = await lk.room.list_rooms(api.ListRoomsRequest(names=[room_name]))
            return not listed.rooms

        await wait_for(room_is_gone, 30, what=f"room {room_name} deleted")

    def deletion() -> dict[str, Any] | None:
        lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
        ours = (e for e in lines if e.get("logger") == "lkrun.rooms" and e.get("room") == room_name)
        return next(ours, None)

    said_deleted = await wait_for(deletion, 10, what="the daemon's line about the room")
    assert said_deleted["deleted"] is True and said_deleted["job_id"] == job["id"]
    assert (said_deleted["assigned_sid"], said_deleted["joined_sid"]) == (created.sid, said[1])
