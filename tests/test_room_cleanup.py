"""The daemon deletes the room a job's join made anew, and only that (issue 17, item 16).

The rule (lkrun.rooms.keep_reason), the report on the pipe (jobpipe.RoomGone on the done
message), the supervisor asking for the deletion with what LiveKit assigned, and the
janitor's calls against a fake room service: no server, no process.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from livekit import api
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.credentials import Credentials
from lkrun.jobs.fields import JobStatus
from lkrun.rooms import RoomJanitor, keep_reason
from lkrun.shared import jobpipe
from lkrun.shared.jobpipe import RoomGone
from lkrun.supervision.job_process import JobProcess
from lkrun.supervision.lifecycle import Cause, Done, conclude
from tests.test_supervisor import make_world, settle

GONE = RoomGone(room="talk", assigned_sid="RM_assigned", joined_sid="RM_joined")
Kind = models.ParticipantInfo.Kind


def person(identity: str, kind: int = Kind.STANDARD) -> models.ParticipantInfo:
    return models.ParticipantInfo(identity=identity, kind=kind)  # type: ignore[arg-type]


def room(sid: str) -> models.Room:
    return models.Room(name=GONE.room, sid=sid)


AGENT = person("agent-AJ_1", Kind.AGENT)


# -- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sid, present",
    [
        ("RM_joined", []),
        ("RM_joined", [AGENT]),
        ("RM_joined", [AGENT, person("other-agent", Kind.AGENT)]),
        # An egress (a recording the room's creation started) is there for others only.
        ("RM_joined", [AGENT, person("recorder", Kind.EGRESS)]),
    ],
    ids=["empty", "our agent", "agents only", "agent and egress"],
)
def test_the_room_the_join_made_with_only_agents_in_it_may_be_deleted(
    sid: str, present: list[models.ParticipantInfo]
) -> None:
    assert keep_reason(GONE, room(sid), present) == ""


@pytest.mark.parametrize(
    "kind", [Kind.STANDARD, Kind.SIP, Kind.INGRESS], ids=lambda k: Kind.Name(k)
)
def test_a_room_with_anyone_but_agents_and_egress_in_it_is_never_deleted(kind: int) -> None:
    assert keep_reason(GONE, room("RM_joined"), [AGENT, person("alice", kind)])


def test_the_assigned_room_is_never_deleted() -> None:
    assert keep_reason(GONE, room("RM_assigned"), [])
    assert keep_reason(GONE, room("RM_assigned"), [AGENT])


def test_a_room_made_again_by_someone_else_is_not_deleted() -> None:
    assert keep_reason(GONE, room("RM_third"), [])


def test_a_room_that_is_gone_is_left_alone() -> None:
    assert keep_reason(GONE, None, [])


# -- the report on the pipe ------------------------------------------------------------------


def test_room_gone_travels_on_the_done_message_as_data() -> None:
    line = jobpipe.encode(jobpipe.DONE, ok=False, error=str(GONE), room_gone=GONE.fields())
    assert RoomGone.parse(jobpipe.decode(line)["room_gone"]) == GONE
    assert str(GONE) == (
        "room 'talk' was deleted before the agent joined "
        "(assigned sid RM_assigned, joined RM_joined)"
    )


@pytest.mark.parametrize(
    "value",
    [None, "RM_joined", [], {"room": "talk", "assigned_sid": "RM_a"}, {**GONE.fields(), "room": 3}],
)
def test_a_malformed_room_gone_is_no_room_gone(value: Any) -> None:
    assert RoomGone.parse(value) is None


async def test_the_job_process_outcome_carries_room_gone() -> None:
    proc = JobProcess(launcher=None, log=logging.LoggerAdapter(logging.getLogger("t")))  # type: ignore[arg-type]
    proc._on_message({"type": jobpipe.READY})
    proc.start_sent = True  # as start() leaves it: a running before the start is refused
    proc._on_message({"type": jobpipe.RUNNING})
    proc._on_message({"type": jobpipe.DONE, "ok": False, "error": str(GONE), **_gone()})
    facts = proc._facts(1)
    assert facts.done is not None and facts.done.room_gone == GONE
    verdict = conclude(facts)
    assert (verdict.status, verdict.cause) == (JobStatus.FAILED, Cause.ROOM_GONE)
    assert verdict.error == str(GONE)


def _gone() -> dict[str, Any]:
    return {"room_gone": GONE.fields()}


# -- the supervisor asks for the deletion ----------------------------------------------------


@dataclass
class FakeCleaner:
    asked: list[tuple[RoomGone, str, str]] = field(default_factory=list)

    async def remove_recreated(self, gone: RoomGone, *, agent: str, job_id: str) -> bool:
        self.asked.append((gone, agent, job_id))
        return True


def _assign(w: Any, job_id: str, sid: str) -> Any:
    assert w.sup.offer(job_id, "talk") is None
    job = proto.Job(id=job_id, room=models.Room(name="talk", sid=sid), type=proto.JT_ROOM)
    w.sup.assign(proto.JobAssignment(job=job, token="tok"))
    proc = w.procs.made[-1]
    return proc


async def test_a_job_that_ends_with_its_room_gone_has_the_new_room_deleted() -> None:
    w = make_world()
    w.sup.rooms = cleaner = FakeCleaner()
    proc = _assign(w, "J1", "RM_assigned")
    proc.ready()
    await settle()
    proc.running()
    # What the job says about the room and its assigned sid is not what counts: the daemon's.
    said = RoomGone(room="elsewhere", assigned_sid="RM_other", joined_sid="RM_joined")
    proc.exit(Done(ok=False, error=str(said), room_gone=said), exit_code=1)
    await w.sup.wait_tasks()
    assert cleaner.asked == [(GONE, "a", "J1")]


async def test_no_deletion_without_room_gone_or_without_an_assigned_sid() -> None:
    w = make_world()
    w.sup.rooms = cleaner = FakeCleaner()
    plain = _assign(w, "J1", "RM_assigned")
    no_sid = _assign(w, "J2", "")
    for proc in (plain, no_sid):
        proc.ready()
    await settle()
    plain.exit(Done(ok=False, error="boom"), exit_code=1)
    no_sid.exit(Done(ok=False, error=str(GONE), room_gone=GONE), exit_code=1)
    await settle()
    await w.sup.wait_tasks()
    assert cleaner.asked == []


# -- the janitor's calls ---------------------------------------------------------------------


@dataclass
class FakeRoomService:
    rooms: list[models.Room]
    participants: list[models.ParticipantInfo]
    deleted: list[str] = field(default_factory=list)
    fails: bool = False

    async def list_rooms(self, request: api.ListRoomsRequest) -> api.ListRoomsResponse:
        if self.fails:
            raise api.TwirpError(api.TwirpErrorCode.UNAVAILABLE, "down", status=503)
        found = [r for r in self.rooms if r.name in request.names]
        return api.ListRoomsResponse(rooms=found)

    async def list_participants(
        self, request: api.ListParticipantsRequest
    ) -> api.ListParticipantsResponse:
        return api.ListParticipantsResponse(participants=self.participants)

    async def delete_room(self, request: api.DeleteRoomRequest) -> api.DeleteRoomResponse:
        self.deleted.append(request.room)
        return api.DeleteRoomResponse()


def janitor(service: FakeRoomService) -> RoomJanitor:
    keeper = RoomJanitor(Credentials("ws://localhost:1", "key", "secret"))

    @asynccontextmanager
    async def fake_api() -> Any:
        yield type("FakeAPI", (), {"room": service})()

    keeper._api = fake_api  # type: ignore[method-assign]
    return keeper


async def test_the_janitor_deletes_only_what_the_rule_allows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "lkrun.rooms")
    ours = FakeRoomService([room("RM_joined")], [AGENT])
    assert await janitor(ours).remove_recreated(GONE, agent="a", job_id="J1")
    assert ours.deleted == ["talk"]
    [line] = [r for r in caplog.records if r.name == "lkrun.rooms"]
    assert line.job_id == "J1"  # type: ignore[attr-defined]
    assert line.fields == {**GONE.fields(), "deleted": True}  # type: ignore[attr-defined]

    caplog.clear()
    someone = FakeRoomService([room("RM_joined")], [AGENT, person("alice")])
    assert not await janitor(someone).remove_recreated(GONE, agent="a", job_id="J1")
    assert someone.deleted == []
    [line] = [r for r in caplog.records if r.name == "lkrun.rooms"]
    assert line.fields["deleted"] is False and "alice" in line.fields["kept"]  # type: ignore[attr-defined]

    for state in ([room("RM_assigned")], []):
        service = FakeRoomService(state, [])
        assert not await janitor(service).remove_recreated(GONE, agent="a", job_id="J1")
        assert service.deleted == []


async def test_the_janitor_says_when_livekit_fails_and_raises_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = FakeRoomService([room("RM_joined")], [], fails=True)
    assert not await janitor(down).remove_recreated(GONE, agent="a", job_id="J1")
    [line] = [r for r in caplog.records if r.name == "lkrun.rooms"]
    assert line.levelno == logging.WARNING and line.fields["deleted"] is False  # type: ignore[attr-defined]
    assert down.deleted == []
