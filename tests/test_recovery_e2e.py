"""Recovery after a job crash (issue 19, item 1), end to end against the real livekit-server,
with a plain rtc.Room observer as the caller: a job killed mid-call gets its agent back when
the agent's on_failure says so, and the new job knows it recovers the old one; what was
stopped on purpose never comes back."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from livekit import api, rtc

from tests.agents.recovery import ATTEMPT, RECOVERED_FROM
from tests.conftest import livekit_api, observer, unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room

ENTRY = "tests.agents.recovery:reports"
REPLACEMENT_BUDGET = 2.0  # kill -> a new agent of the same name in the room (the issue's)
# No CPU pressure on a shared test machine: an agent reported FULL would lose the redispatch.
DAEMON = '[daemon]\nload_threshold = "off"\n'


def manifest(name: str, **fields: Any) -> str:
    fields.setdefault("idle_processes", 1)  # a warm process for the replacement
    return DAEMON + agent_table(name, ENTRY, **fields)


class Arrivals:
    """When each agent participant of ``name`` joined the observer's room (its monotonic
    time), and who is there now: the caller's view."""

    def __init__(self, room: rtc.Room, name: str) -> None:
        self.room = room
        self.name = name
        self.joined: dict[str, float] = {}
        room.on("participant_connected", self._seen)
        for p in room.remote_participants.values():
            self._seen(p)

    def _seen(self, p: rtc.RemoteParticipant) -> None:
        if p.attributes.get("lk.agent.name") == self.name:
            self.joined.setdefault(p.identity, time.monotonic())

    def present(self) -> dict[str, rtc.RemoteParticipant]:
        return {
            p.identity: p
            for p in self.room.remote_participants.values()
            if p.attributes.get("lk.agent.name") == self.name
        }

    async def one_besides(self, *known: str, timeout: float = 20.0) -> rtc.RemoteParticipant:
        def find() -> rtc.RemoteParticipant | None:
            return next((p for i, p in self.present().items() if i not in known), None)

        return await wait_for(find, timeout, interval=0.01, what=f"another agent {self.name}")


async def reported(p: rtc.RemoteParticipant, timeout: float = 10.0) -> dict[str, str]:
    """What the agent's context said (the attributes tests.agents.recovery sets)."""

    def said() -> dict[str, str] | None:
        if RECOVERED_FROM in p.attributes:
            return {
                "recovered_from": p.attributes[RECOVERED_FROM],
                "attempt": p.attributes[ATTEMPT],
            }
        return None

    return await wait_for(said, timeout, what=f"{p.identity}'s report")


async def warm(daemon: Any) -> None:
    """The agent has a warm process again (the first job took the one it had)."""

    async def ready() -> bool:
        return (await daemon.status())["agents"][0]["idle_processes"] >= 1

    await wait_for(ready, 30, what="a warm process")


async def ended(daemon: Any, job_id: str) -> dict[str, Any]:
    async def found() -> dict[str, Any] | None:
        job = await daemon.job(job_id)
        return job if job is not None and job["status"] in ("success", "failed") else None

    return await wait_for(found, 30, what=f"job {job_id} to end")


async def noted(daemon: Any, job_id: str) -> str:
    """What recovery decided about the job (its history's recovery column)."""

    async def found() -> str:
        job = await daemon.job(job_id)
        return (job or {}).get("recovery") or ""

    return await wait_for(found, 15, what=f"the recovery decision about {job_id}")


async def call_jobs(daemon: Any, room: str) -> list[dict[str, Any]]:
    return sorted((j for j in await daemon.jobs() if j["room"] == room), key=lambda j: j["attempt"])


async def dispatches(server: Any, room: str, agent: str) -> list[api.AgentDispatch]:
    """The room's dispatches of the agent (a room made by a join has an automatic one too)."""
    async with livekit_api(server) as lk:
        listed = await lk.agent_dispatch.list_dispatch(room_name=room)
    return [d for d in listed if d.agent_name == agent]


def json_lines(daemon: Any, logger: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("logger") == logger]


async def test_a_job_killed_mid_call_gets_its_agent_back_within_two_seconds(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("phone"), unique("call")
    daemon = await start_daemon(manifest(name, on_failure="redispatch"), "--log-format", "json")
    async with observer(livekit_server, room_name) as room:
        seen = Arrivals(room, name)
        await dispatch(livekit_server, room_name, name, metadata="stay")
        first = await seen.one_besides()
        assert await reported(first) == {"recovered_from": "-", "attempt": "0"}
        job = await job_in_room(daemon, room_name, "running")
        assert (job["attempt"], job["recovered_from"]) == (0, "")
        await warm(daemon)

        killed_at = time.monotonic()
        os.kill(job["pid"], signal.SIGKILL)
        second = await seen.one_besides(first.identity, timeout=10)
        took = seen.joined[second.identity] - killed_at
        print(f"kill -> replacement agent in the room: {took:.3f}s")
        assert took < REPLACEMENT_BUDGET, f"{took:.2f}s"

        # It knows: its context, and its participant attributes for any client.
        assert await reported(second) == {"recovered_from": job["id"], "attempt": "1"}
        assert second.attributes["lkrun.recovered_from"] == job["id"]
        assert second.attributes["lkrun.attempt"] == "1"
        # The dead job's participant (a ghost the server would keep some 15-20 s) is gone.
        await wait_for(
            lambda: first.identity not in seen.present(), 3, what="the ghost to be removed"
        )

    killed = await ended(daemon, job["id"])
    assert (killed["status"], killed["cause"]) == ("failed", "signal")
    assert "SIGKILL" in killed["error"]
    assert (await noted(daemon, job["id"])).startswith("redispatched as attempt 1 (dispatch AD_")
    new = next(j for j in await call_jobs(daemon, room_name) if j["id"] != job["id"])
    assert (new["recovered_from"], new["attempt"], new["agent"]) == (job["id"], 1, name)
    # `jobs ls --json` carries it; `jobs show` has the chain, from either end.
    listing = json.loads(daemon.cli("jobs", "ls", "--all", "--json").stdout)
    assert {j["id"]: j["recovered_from"] for j in listing} == {job["id"]: "", new["id"]: job["id"]}
    for either in (job["id"], new["id"]):
        shown = json.loads(daemon.cli("jobs", "show", either, "--json").stdout)
        assert [(s["id"], s["attempt"]) for s in shown["chain"]] == [(job["id"], 0), (new["id"], 1)]
    text = daemon.cli("jobs", "show", new["id"]).stdout
    assert f"1 (redispatch of {job['id']})" in text and "attempts at this call (2)" in text
    assert await daemon.metric("lkrun_recoveries_total", agent=name, cause="signal") == 1
    [line] = [e for e in json_lines(daemon, "lkrun.recovery") if e.get("job_id") == job["id"]]
    assert (line["decision"], line["room"], line["cause"]) == ("redispatch", room_name, "signal")


async def test_with_the_policy_off_nothing_comes_back(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("plain"), unique("call")
    daemon = await start_daemon(manifest(name))  # on_failure: "none", the default
    async with observer(livekit_server, room_name) as room:
        seen = Arrivals(room, name)
        await dispatch(livekit_server, room_name, name, metadata="stay")
        await seen.one_besides()
        job = await job_in_room(daemon, room_name, "running")
        os.kill(job["pid"], signal.SIGKILL)

        killed = await ended(daemon, job["id"])
        assert (killed["status"], killed["cause"]) == ("failed", "signal")
        assert "SIGKILL" in killed["error"]
        assert await noted(daemon, job["id"]) == 'not redispatched: on_failure is "none"'
    skipped = await daemon.metric("lkrun_recoveries_skipped_total", agent=name, reason="policy_off")
    assert skipped == 1
    assert await daemon.metric("lkrun_recoveries_total", agent=name) == 0
    assert [j["id"] for j in await call_jobs(daemon, room_name)] == [job["id"]]
    assert len(await dispatches(livekit_server, room_name, name)) == 1  # none of ours


@pytest.mark.parametrize(
    ("metadata", "fields", "cause"),
    [
        ("eat-first", {"memory_limit_mb": 150}, "memory_limit"),
        ("raise-first", {}, "raised"),
    ],
    ids=["memory_limit", "raised"],
)
@pytest.mark.parametrize("policy", ["redispatch", "none"])
async def test_a_memory_limit_kill_and_an_entrypoint_that_raises_follow_the_policy(
    start_daemon: Any,
    livekit_server: Any,
    metadata: str,
    fields: dict[str, Any],
    cause: str,
    policy: str,
) -> None:
    name, room_name = unique("fails"), unique("call")
    daemon = await start_daemon(manifest(name, on_failure=policy, **fields))
    async with observer(livekit_server, room_name) as room:
        seen = Arrivals(room, name)
        await dispatch(livekit_server, room_name, name, metadata=metadata)
        first = await seen.one_besides()
        job = await job_in_room(daemon, room_name)
        failed = await ended(daemon, job["id"])
        assert (failed["status"], failed["cause"]) == ("failed", cause)
        decision = await noted(daemon, job["id"])
        if policy == "none":
            assert decision == 'not redispatched: on_failure is "none"'
            assert [j["id"] for j in await call_jobs(daemon, room_name)] == [job["id"]]
            return
        assert decision.startswith("redispatched as attempt 1")
        second = await seen.one_besides(first.identity)
        assert await reported(second) == {"recovered_from": job["id"], "attempt": "1"}
    assert await daemon.metric("lkrun_recoveries_total", agent=name, cause=cause) == 1


async def test_a_livekit_agents_app_reads_it_in_its_jobs_attributes(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("lka"), unique("call")
    daemon = await start_daemon(
        DAEMON + agent_table(name, "tests.lka_apps.recovers:entrypoint", on_failure="redispatch")
    )
    async with observer(livekit_server, room_name) as room:
        seen = Arrivals(room, name)
        await dispatch(livekit_server, room_name, name)
        first = await seen.one_besides()
        job = await job_in_room(daemon, room_name)
        second = await seen.one_besides(first.identity)
        assert await reported(second) == {"recovered_from": job["id"], "attempt": "1"}
    failed = await ended(daemon, job["id"])
    assert (failed["status"], failed["cause"]) == ("failed", "raised")


async def test_max_redispatches_one_redispatches_a_crashing_job_once(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("crashy"), unique("call")
    daemon = await start_daemon(
        manifest(name, on_failure="redispatch", max_redispatches=1), "--log-format", "json"
    )
    async with observer(livekit_server, room_name):
        await dispatch(livekit_server, room_name, name, metadata="raise")

        async def both_failed() -> list[dict[str, Any]] | None:
            jobs = await call_jobs(daemon, room_name)
            return jobs if len(jobs) == 2 and {j["status"] for j in jobs} == {"failed"} else None

        first, second = await wait_for(both_failed, 30, what="the job and its redispatch to fail")
        assert (first["attempt"], second["attempt"]) == (0, 1)
        assert second["recovered_from"] == first["id"]
        assert (first["cause"], second["cause"]) == ("raised", "raised")
        assert (await noted(daemon, first["id"])).startswith("redispatched as attempt 1")
        assert await noted(daemon, second["id"]) == (
            "not redispatched: max_redispatches=1 reached (it was attempt 1)"
        )
    assert await daemon.metric("lkrun_recoveries_total", agent=name) == 1
    skipped = await daemon.metric(
        "lkrun_recoveries_skipped_total", agent=name, reason="max_redispatches"
    )
    assert skipped == 1
    [line] = [e for e in json_lines(daemon, "lkrun.recovery") if e.get("job_id") == second["id"]]
    assert line["level"] == "warning" and line["skip"] == "max_redispatches"
    assert (line["decision"], line["reason"]) == (
        "none",
        "max_redispatches=1 reached (it was attempt 1)",
    )
    assert len(await call_jobs(daemon, room_name)) == 2  # and nothing after


Ender = Callable[[Any, Any, str, dict[str, Any], rtc.Room], Awaitable[None]]


async def _kill(daemon: Any, server: Any, room_name: str, job: dict[str, Any], _: rtc.Room) -> None:
    assert daemon.cli("jobs", "kill", job["id"]).returncode == 0


async def _kill_force(
    daemon: Any, server: Any, room_name: str, job: dict[str, Any], _: rtc.Room
) -> None:
    assert daemon.cli("jobs", "kill", "--force", job["id"]).returncode == 0


async def _delete_dispatch(
    daemon: Any, server: Any, room_name: str, job: dict[str, Any], _: rtc.Room
) -> None:
    async with livekit_api(server) as lk:
        await lk.agent_dispatch.delete_dispatch(job["dispatch_id"], room_name)


async def _delete_room(
    daemon: Any, server: Any, room_name: str, job: dict[str, Any], _: rtc.Room
) -> None:
    async with livekit_api(server) as lk:
        await lk.room.delete_room(api.DeleteRoomRequest(room=room_name))


async def _bye(
    daemon: Any, server: Any, room_name: str, job: dict[str, Any], room: rtc.Room
) -> None:
    await room.local_participant.publish_data(b"bye", destination_identities=[job["identity"]])


@pytest.mark.parametrize(
    ("end", "cause"),
    [
        (_kill, "killed"),
        (_kill_force, "killed"),
        (_delete_dispatch, "terminated"),
        (_delete_room, None),  # LiveKit ends it: terminated, or the room's disconnect
        (_bye, "clean"),
    ],
    ids=["jobs-kill", "jobs-kill-force", "dispatch-deleted", "room-deleted", "clean-end"],
)
async def test_a_job_ended_on_purpose_is_never_redispatched(
    start_daemon: Any, livekit_server: Any, end: Ender, cause: str | None
) -> None:
    name, room_name = unique("purpose"), unique("call")
    daemon = await start_daemon(manifest(name, on_failure="redispatch"), "--log-format", "json")
    async with observer(livekit_server, room_name) as room:
        seen = Arrivals(room, name)
        await dispatch(livekit_server, room_name, name, metadata="stay")
        await reported(await seen.one_besides())
        job = await job_in_room(daemon, room_name, "running")
        await end(daemon, livekit_server, room_name, job, room)
        over = await ended(daemon, job["id"])
    if cause is not None:
        assert over["cause"] == cause, over
    else:
        assert over["cause"] in ("terminated", "room_gone", "clean"), over

    # The decision, logged once made (a redispatch's only once its dispatch is created):
    # not a failure, so nothing noted, counted or dispatched.
    def decision() -> dict[str, Any] | None:
        lines = [e for e in json_lines(daemon, "lkrun.recovery") if e.get("job_id") == job["id"]]
        return lines[0] if lines else None

    line = await wait_for(decision, 10, what=f"the recovery decision about {job['id']}")
    assert (line["decision"], line.get("skip", "")) == ("none", ""), line
    assert (await daemon.job(job["id"]))["recovery"] == ""
    assert await daemon.metric("lkrun_recoveries_total", agent=name) == 0
    assert await daemon.metric("lkrun_recoveries_skipped_total", agent=name) == 0
    assert [j["id"] for j in await call_jobs(daemon, room_name)] == [job["id"]]
    if end is _delete_room:  # a redispatch would have made the room anew
        async with livekit_api(livekit_server) as lk:
            assert not (await lk.room.list_rooms(api.ListRoomsRequest(names=[room_name]))).rooms
    else:  # the first one only (or none: deleted)
        left = 0 if end is _delete_dispatch else 1
        assert len(await dispatches(livekit_server, room_name, name)) == left


async def test_a_drained_job_is_never_redispatched(start_daemon: Any, livekit_server: Any) -> None:
    name, room_name = unique("drained"), unique("call")
    daemon = await start_daemon(
        '[daemon]\nload_threshold = "off"\ndrain_timeout = "1s"\n'
        + agent_table(name, ENTRY, on_failure="redispatch")
    )
    async with observer(livekit_server, room_name) as room:
        seen = Arrivals(room, name)
        await dispatch(livekit_server, room_name, name, metadata="stay")
        await reported(await seen.one_besides())
        job = await job_in_room(daemon, room_name, "running")
        daemon.signal(signal.SIGTERM)  # drain: 1 s, then the job is asked to stop
        assert await daemon.wait_exit(30) == 0
    [row] = [r for r in daemon.history() if r["room"] == room_name]
    assert (row["id"], row["cause"], row["recovery"]) == (job["id"], "drain", "")
    assert len(await dispatches(livekit_server, room_name, name)) == 1  # no redispatch


@pytest.mark.parametrize("whose", ["another-participant", "the-caller-before-a-rejoin"])
async def test_an_offer_for_another_participant_is_declined(
    start_daemon: Any, livekit_server: Any, whose: str
) -> None:
    """A redispatch of a participant job launches a job for each participant; only the one
    about the failed job's participant, in the session the recovery saw, is taken (the
    caller rejoined under the same identity has a new sid: the original dispatch serves
    them)."""
    name, room_name = unique("each"), unique("call")
    daemon = await start_daemon(manifest(name, job_type="participant"))
    async with observer(livekit_server, room_name) as room:
        caller = room.local_participant.identity
        if whose == "another-participant":
            about = {"lkrun.participant": "someone-else"}
        else:
            assert room.local_participant.sid.startswith("PA_")  # ours is another one
            about = {"lkrun.participant": caller, "lkrun.participant_sid": "PA_beforeRejoin"}
        async with livekit_api(livekit_server) as lk:
            await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(
                    agent_name=name,
                    room=room_name,
                    metadata="stay",
                    attributes={"lkrun.recovered_from": "AJ_gone", "lkrun.attempt": "1", **about},
                )
            )

        async def declined() -> bool:
            return await daemon.metric("lkrun_offer_declines_total", agent=name) >= 1

        await wait_for(declined, 15, what="the offer declined")
        assert (
            await daemon.metric("lkrun_offer_declines_total", agent=name, reason="participant") == 1
        )
        assert await call_jobs(daemon, room_name) == []
        assert caller != "someone-else"  # the offer was about the observer
