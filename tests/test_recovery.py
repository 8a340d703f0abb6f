"""Recovery after a job fails (lkrun.recovery), without a LiveKit server: the policy's
decision table, what the room must hold, the manifest's fields and errors, the new job's
lineage, the Recoverer against a scripted RoomService, and the history's chain."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import textwrap
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from livekit import api
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun import recovery
from lkrun.agent_host import _job_attributes
from lkrun.api.metrics import RECOVERY_CAUSES, RECOVERY_SKIPS, Metrics
from lkrun.context import JobInfo
from lkrun.credentials import Credentials
from lkrun.jobs.book import JobRecord
from lkrun.jobs.store import JobStore
from lkrun.manifest import DaemonSettings, parse_manifest
from lkrun.recovery import (
    FailedJob,
    Recoverer,
    RecoveryDecision,
    RecoveryPolicy,
    decide,
    lineage,
    record_fields,
    room_decision,
    wrong_participant,
)
from lkrun.supervision.lifecycle import Cause
from tests.helpers import assert_manifest_error

AGENT = models.ParticipantInfo.Kind.AGENT
STANDARD = models.ParticipantInfo.Kind.STANDARD
SIP = models.ParticipantInfo.Kind.SIP

# Every way a job ends (lkrun.supervision.lifecycle.Cause), and whether a failure of that
# kind is worth a redispatch: the documented table (README, Recovery after a crash).
CAUSES = {
    "clean": False,
    "raised": True,
    "exit": True,
    "signal": True,
    "memory_limit": True,
    "job_timeout": False,
    "start_failed": True,
    "killed": False,
    "drain": False,
    "terminated": False,
    "room_gone": False,
    "room_empty": False,
    "lost": True,
}
ON = RecoveryPolicy("redispatch", 2)


def test_the_causes_worth_a_redispatch_are_the_documented_ones() -> None:
    assert {c for c, worth in CAUSES.items() if worth} == recovery.REDISPATCH_CAUSES
    # The metric's labels are the same fixed sets (lkrun.api.metrics cannot import them).
    assert RECOVERY_CAUSES == recovery.REDISPATCH_CAUSES
    assert set(recovery.SKIP_REASONS) == RECOVERY_SKIPS


def test_the_causes_are_the_lifecycles() -> None:
    assert {c.value for c in Cause} == set(CAUSES)


@pytest.mark.parametrize("cause", sorted(CAUSES))
@pytest.mark.parametrize(
    ("policy", "attempt", "verdict", "skip"),
    [
        (RecoveryPolicy(), 0, False, "policy_off"),  # the default: none
        (RecoveryPolicy("none", 5), 0, False, "policy_off"),
        (ON, 0, True, ""),
        (ON, 1, True, ""),
        (ON, 2, False, "max_redispatches"),  # the call had its two
        (ON, 7, False, "max_redispatches"),
        (RecoveryPolicy("redispatch", 1), 1, False, "max_redispatches"),
        (RecoveryPolicy("redispatch", 0), 0, False, "max_redispatches"),
    ],
)
def test_decision_table(
    cause: str, policy: RecoveryPolicy, attempt: int, verdict: bool, skip: str
) -> None:
    decision = decide(policy, cause, attempt)
    if not CAUSES[cause]:  # never, whatever the policy: and not counted as skipped
        assert decision == RecoveryDecision(False, decision.reason, "")
        assert cause in decision.reason
        return
    assert (decision.redispatch, decision.skip) == (verdict, skip)
    if verdict:
        assert decision.reason == f"{cause}: redispatched as attempt {attempt + 1} of 2"
    elif skip == "max_redispatches":
        said = f"max_redispatches={policy.max_redispatches} reached (it was attempt {attempt})"
        assert decision.reason == said
    else:
        assert decision.reason == f'on_failure is "{policy.on_failure}"'


def failed(**fields: Any) -> FailedJob:
    values: dict[str, Any] = {
        "job_id": "AJ_dead",
        "agent": "echo",
        "agent_name": "echo",
        "room": "call",
        "metadata": "m",
        "job_type": "room",
        "participant": "",
        "identity": "echo-AJ_dead",
        "cause": "signal",
        "attempt": 0,
    }
    values.update(fields)
    return FailedJob(**values)


def person(identity: str, kind: int = STANDARD, **attributes: str) -> models.ParticipantInfo:
    return models.ParticipantInfo(identity=identity, kind=kind, attributes=attributes)


def agent(identity: str, **attributes: str) -> models.ParticipantInfo:
    return person(identity, AGENT, **attributes)


GHOST = agent("echo-AJ_dead", **{"lk.agent.name": "echo"})


@pytest.mark.parametrize(
    ("job", "people", "absent_agent", "skip"),
    [
        (failed(), [GHOST, person("alice")], False, ""),
        (failed(), [GHOST, person("+15551234", SIP)], False, ""),  # a phone caller counts
        (failed(), [GHOST], False, "no_caller"),  # the ghost is no caller
        (failed(), [], False, "no_caller"),
        (failed(), [GHOST, agent("other-agent")], False, "no_caller"),
        # A participant job's call is its participant's.
        (failed(job_type="participant", participant="bob"), [person("bob")], False, ""),
        (
            failed(job_type="publisher", participant="bob"),
            [GHOST, person("alice")],
            False,
            "participant_left",
        ),
        # Live (not absent_agent): another agent of the name does not stop the redispatch.
        (failed(), [person("alice"), agent("echo-2", **{"lk.agent.name": "echo"})], False, ""),
        # After a restart: it does; the ghost and other dead jobs' ghosts never count.
        (
            failed(),
            [person("alice"), agent("echo-2", **{"lk.agent.name": "echo"})],
            True,
            "agent_present",
        ),
        (failed(), [person("alice"), GHOST], True, ""),
        (
            failed(),
            [person("alice"), agent("echo-AJ_other", **{"lk.agent.name": "echo"})],
            True,
            "",
        ),  # ghosts=("echo-AJ_other",) below
        (failed(), [person("alice"), agent("x", **{"lkrun.recovered_from": "AJ_dead"})], True, ""),
        (failed(), [person("alice"), agent("x", **{"lk.agent.name": "other"})], True, ""),
        # A publisher job: only an agent serving that participant is its replacement.
        (
            failed(job_type="publisher", participant="bob"),
            [person("bob"), agent("e", **{"lk.agent.name": "echo", "lkrun.participant": "al"})],
            True,
            "",
        ),
        (
            failed(job_type="publisher", participant="bob"),
            [person("bob"), agent("e", **{"lk.agent.name": "echo", "lkrun.participant": "bob"})],
            True,
            "agent_present",
        ),
    ],
)
def test_what_the_room_must_hold(
    job: FailedJob, people: list[models.ParticipantInfo], absent_agent: bool, skip: str
) -> None:
    ghosts = ("echo-AJ_other",)
    decision = room_decision(job, people, absent_agent=absent_agent, ghosts=ghosts)
    if any(p.attributes.get("lkrun.recovered_from") == "AJ_dead" for p in people):
        skip = "agent_present"  # it was recovered already
    assert (decision.redispatch, decision.skip) == (not skip, skip), decision.reason


def test_lineage_and_the_participant_check() -> None:
    assert lineage({}) == ("", 0)
    assert lineage({"lkrun.attempt": "3"}) == ("", 0)  # no job replaced: a first job
    assert lineage({"lkrun.recovered_from": "AJ_1", "lkrun.attempt": "2"}) == ("AJ_1", 2)
    assert lineage({"lkrun.recovered_from": "AJ_1", "lkrun.attempt": "x"}) == ("AJ_1", 1)
    assert lineage({"lkrun.recovered_from": "AJ_1"}) == ("AJ_1", 1)

    bob = models.ParticipantInfo(identity="bob", sid="PA_bob1")
    assert wrong_participant({}, bob) == ""
    assert wrong_participant({"lkrun.participant": "bob"}, bob) == ""
    al = models.ParticipantInfo(identity="al", sid="PA_al")
    said = wrong_participant({"lkrun.participant": "bob", "lkrun.recovered_from": "AJ_1"}, al)
    assert said == "a redispatch of job AJ_1 for participant 'bob', not 'al'"
    # The session the recovery was for, and no other: bob rejoined is the original
    # dispatch's to serve (it launches a job for him too).
    for_bob1 = {
        "lkrun.participant": "bob",
        "lkrun.participant_sid": "PA_bob1",
        "lkrun.recovered_from": "AJ_1",
    }
    assert wrong_participant(for_bob1, bob) == ""
    rejoined = models.ParticipantInfo(identity="bob", sid="PA_bob2")
    said = wrong_participant(for_bob1, rejoined)
    assert (
        said
        == "a redispatch of job AJ_1 for participant 'bob' as PA_bob1, not as PA_bob2 (rejoined)"
    )


def test_the_new_job_knows_where_it_stands() -> None:
    job = proto.Job(
        id="AJ_new",
        agent_name="echo",
        type=proto.JT_PUBLISHER,
        metadata="meta",
        participant=models.ParticipantInfo(identity="bob"),
        attributes={"lkrun.recovered_from": "AJ_dead", "lkrun.attempt": "1"},
    )
    assert record_fields(job) == {
        "agent_name": "echo",
        "job_type": "publisher",
        "participant": "bob",
        "metadata": "meta",
        "recovered_from": "AJ_dead",
        "attempt": 1,
    }
    # Its agent participant says so too, for clients.
    assert _job_attributes(job) == {
        "lkrun.participant": "bob",
        "lkrun.recovered_from": "AJ_dead",
        "lkrun.attempt": "1",
    }
    assert _job_attributes(proto.Job(id="AJ_first")) == {}


def test_the_lkrun_context_from_the_start_message() -> None:
    job = {"id": "AJ_new", "attributes": {"lkrun.recovered_from": "AJ_a", "lkrun.attempt": "2"}}
    # The start message's fields win; without them (an older daemon), the job's attributes.
    info = JobInfo.from_dict(job, {"recovered_from": "AJ_b", "attempt": 3})
    assert (info.recovered_from, info.attempt) == ("AJ_b", 3)
    info = JobInfo.from_dict(job, {})
    assert (info.recovered_from, info.attempt) == ("AJ_a", 2)
    assert info.attributes == {"lkrun.recovered_from": "AJ_a", "lkrun.attempt": "2"}
    first = JobInfo.from_dict({"id": "AJ_1"}, {"recovered_from": "", "attempt": 0})
    assert (first.recovered_from, first.attempt, first.attributes) == ("", 0, {})


def test_a_failed_job_from_a_record_or_a_history_row() -> None:
    record = JobRecord(
        id="AJ_1",
        agent="echo",
        room="call",
        dispatch_id="AD_1",
        identity="echo-AJ_1",
        agent_name="echo",
        job_type="participant",
        participant="bob",
        metadata="{}",
        attempt=1,
        recovered_from="AJ_0",
    )
    want = failed(
        job_id="AJ_1",
        metadata="{}",
        job_type="participant",
        participant="bob",
        identity="echo-AJ_1",
        cause="raised",
        attempt=1,
    )
    assert FailedJob.from_record(record, "raised") == want
    assert FailedJob.from_record({**record.to_dict(), "cause": "raised"}) == want
    assert want.dispatch_attributes() == {
        "lkrun.recovered_from": "AJ_1",
        "lkrun.attempt": "2",
        "lkrun.participant": "bob",
    }
    assert failed().dispatch_attributes() == {
        "lkrun.recovered_from": "AJ_dead",
        "lkrun.attempt": "1",
    }


# -- the manifest ---------------------------------------------------------------------------


def parse(text: str) -> Any:
    return parse_manifest(textwrap.dedent(text), "agents.toml")


def test_the_policy_defaults_to_none_and_daemon_defaults_apply_to_unset_agents() -> None:
    manifest = parse(
        """
        [agents.a]
        entrypoint = "pkg.mod:main"
        """
    )
    assert RecoveryPolicy.of(manifest.agents["a"]) == RecoveryPolicy("none", 2)
    assert (DaemonSettings().on_failure, DaemonSettings().max_redispatches) == ("none", 2)
    manifest = parse(
        """
        [daemon]
        on_failure = "redispatch"
        max_redispatches = 3
        [agents.a]
        entrypoint = "pkg.mod:main"
        [agents.b]
        entrypoint = "pkg.mod:main"
        on_failure = "none"
        [agents.c]
        entrypoint = "pkg.mod:main"
        max_redispatches = 1
        """
    )
    policies = {name: RecoveryPolicy.of(spec) for name, spec in manifest.agents.items()}
    assert policies == {
        "a": RecoveryPolicy("redispatch", 3),
        "b": RecoveryPolicy("none", 3),
        "c": RecoveryPolicy("redispatch", 1),
    }


@pytest.mark.parametrize(
    ("text", "agent", "field", "message"),
    [
        (
            '[agents.a]\nentrypoint = "p.m:f"\non_failure = "restart"\n',
            "a",
            "on_failure",
            "must be one of 'none', 'redispatch', got 'restart'",
        ),
        (
            '[agents.a]\nentrypoint = "p.m:f"\non_failure = true\n',
            "a",
            "on_failure",
            "must be one of 'none', 'redispatch', got true",
        ),
        (
            '[agents.a]\nentrypoint = "p.m:f"\nmax_redispatches = -1\n',
            "a",
            "max_redispatches",
            "must be an integer >= 0, got -1",
        ),
        (
            '[agents.a]\nentrypoint = "p.m:f"\nmax_redispatches = "2"\n',
            "a",
            "max_redispatches",
            "must be an integer >= 0, got '2'",
        ),
        (
            '[daemon]\non_failure = "Redispatch"\n[agents.a]\nentrypoint = "p.m:f"\n',
            None,
            "daemon.on_failure",
            "must be one of 'none', 'redispatch', got 'Redispatch'",
        ),
        (
            '[daemon]\nmax_redispatches = 1.5\n[agents.a]\nentrypoint = "p.m:f"\n',
            None,
            "daemon.max_redispatches",
            "must be an integer >= 0, got 1.5",
        ),
    ],
)
def test_bad_policy_values_are_one_line_naming_file_agent_and_field(
    text: str, agent: str | None, field: str, message: str
) -> None:
    assert_manifest_error(text, agent, field, message)


# -- the Recoverer, against a scripted RoomService -------------------------------------------


@dataclass
class FakeLiveKit:
    """RoomService and AgentDispatchService as the Recoverer calls them (fault injection)."""

    participants: list[models.ParticipantInfo] = field(default_factory=list)
    room_missing: bool = False
    down: bool = False
    broken: bool = False  # a fault of no foreseen kind
    remove_delay: float = 0.0  # a RemoveParticipant that takes this long
    removed: list[str] = field(default_factory=list)
    dispatched: list[api.CreateAgentDispatchRequest] = field(default_factory=list)

    @property
    def room(self) -> FakeLiveKit:
        return self

    @property
    def agent_dispatch(self) -> FakeLiveKit:
        return self

    async def list_participants(
        self, request: api.ListParticipantsRequest
    ) -> api.ListParticipantsResponse:
        if self.down:
            raise api.TwirpError(api.TwirpErrorCode.UNAVAILABLE, "down", status=503)
        if self.broken:
            raise ValueError("unexpected answer")
        if self.room_missing:
            raise api.TwirpError(api.TwirpErrorCode.NOT_FOUND, "room not found", status=404)
        return api.ListParticipantsResponse(participants=self.participants)

    async def remove_participant(self, request: api.RoomParticipantIdentity) -> Any:
        self.removed.append(request.identity)
        await asyncio.sleep(self.remove_delay)
        if request.identity == "gone-meanwhile":
            raise api.TwirpError(api.TwirpErrorCode.NOT_FOUND, "participant not found", status=404)
        if request.identity == "protected":
            raise api.TwirpError(api.TwirpErrorCode.PERMISSION_DENIED, "no", status=403)
        return api.RemoveParticipantResponse()

    async def create_dispatch(self, request: api.CreateAgentDispatchRequest) -> Any:
        self.dispatched.append(request)
        return api.AgentDispatch(id=f"AD_{len(self.dispatched)}", room=request.room)


@dataclass
class Rig:
    livekit: FakeLiveKit
    recoverer: Recoverer
    metrics: Metrics
    notes: list[tuple[str, str, str]]  # job id, recovery, recovery_skip

    def counted(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


@pytest.fixture
def rig() -> Iterator[Rig]:
    livekit = FakeLiveKit()
    metrics = Metrics()
    notes: list[tuple[str, str, str]] = []
    recoverer = Recoverer(
        Credentials("ws://127.0.0.1:1", "key", "secret"),
        metrics=metrics,
        note=lambda job_id, cols: notes.append((job_id, cols["recovery"], cols["recovery_skip"])),
    )

    @asynccontextmanager
    async def fake_api() -> Any:
        yield livekit

    recoverer._api = fake_api  # type: ignore[method-assign]
    yield Rig(livekit, recoverer, metrics, notes)


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lkrun.recovery"]


async def test_a_crash_with_a_caller_is_redispatched_and_its_ghost_removed(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "lkrun.recovery")
    rig.livekit.participants = [GHOST, models.ParticipantInfo(identity="alice", sid="PA_al")]
    job = failed(job_type="participant", participant="alice", attempt=1)
    decision = rig.recoverer.job_ended(job, ON)
    assert decision.redispatch  # decided at once; the action runs in the background
    assert rig.livekit.dispatched == []
    await rig.recoverer.close()

    [request] = rig.livekit.dispatched
    assert (request.agent_name, request.room, request.metadata) == ("echo", "call", "m")
    assert dict(request.attributes) == {
        "lkrun.recovered_from": "AJ_dead",
        "lkrun.attempt": "2",
        "lkrun.participant": "alice",
        "lkrun.participant_sid": "PA_al",  # her session now: not her next one
    }
    assert rig.livekit.removed == ["echo-AJ_dead"]
    assert rig.notes == [("AJ_dead", "redispatched as attempt 2 (dispatch AD_1)", "")]
    assert rig.counted("lkrun_recoveries_total", agent="echo", cause="signal") == 1
    [line] = lines(caplog)
    assert line.job_id == "AJ_dead" and line.agent == "echo"  # type: ignore[attr-defined]
    assert line.fields == {  # type: ignore[attr-defined]
        "room": "call",
        "cause": "signal",
        "attempt": 1,
        "decision": "redispatch",
        "reason": "redispatched as attempt 2 (dispatch AD_1)",
    }


async def test_ghosts_gone_meanwhile_or_not_listed_are_no_error(rig: Rig) -> None:
    rig.livekit.participants = [person("alice"), agent("gone-meanwhile")]
    job = failed(identity="gone-meanwhile")
    assert (await rig.recoverer.recover(job, ghosts=["not-listed"])).redispatch
    await rig.recoverer.close()  # the removals run on their own
    assert rig.livekit.removed == ["gone-meanwhile"]  # the unlisted one is not asked for
    assert len(rig.livekit.dispatched) == 1


async def test_a_ghost_livekit_will_not_remove_does_not_undo_the_redispatch(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.livekit.participants = [person("alice"), agent("protected")]
    decision = await rig.recoverer.recover(failed(identity="protected"))
    assert decision.redispatch and len(rig.livekit.dispatched) == 1
    await rig.recoverer.close()
    [left] = [r.fields for r in lines(caplog) if "ghosts" in getattr(r, "fields", {})]  # type: ignore[attr-defined]
    assert (left["ghosts"], left["error"]) == (
        ["protected"],
        "LiveKit refused: no (permission_denied)",
    )


async def test_an_unforeseen_fault_is_a_recorded_error_not_a_silent_end(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.livekit.broken = True
    decision = rig.recoverer.job_ended(failed(), ON)
    assert decision.redispatch
    await rig.recoverer.close()
    assert rig.notes == [
        ("AJ_dead", "not redispatched: recovery failed: ValueError: unexpected answer", "error")
    ]
    assert rig.counted("lkrun_recoveries_skipped_total", agent="echo", reason="error") == 1
    [fault] = [r for r in lines(caplog) if r.levelno == logging.ERROR]
    assert fault.exc_info is not None and fault.job_id == "AJ_dead"  # type: ignore[attr-defined]


async def test_a_slow_removal_does_not_undo_a_dispatch_made(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.recoverer.timeout = 0.2
    rig.livekit.remove_delay = 5.0  # far beyond the timeout
    rig.livekit.participants = [person("alice"), GHOST]
    decision = await rig.recoverer.recover(failed())
    assert (decision.redispatch, decision.skip) == (True, "")
    assert len(rig.livekit.dispatched) == 1
    assert rig.notes == [("AJ_dead", "redispatched as attempt 1 (dispatch AD_1)", "")]
    await rig.recoverer.close(grace=1.0)  # the removal ends on its own time limit
    assert rig.livekit.removed == ["echo-AJ_dead"]
    [left] = [r for r in lines(caplog) if "ghosts" in getattr(r, "fields", {})]  # type: ignore[attr-defined]
    assert left.levelno == logging.WARNING and left.job_id == "AJ_dead"  # type: ignore[attr-defined]
    assert left.fields["ghosts"] == ["echo-AJ_dead"]  # type: ignore[attr-defined]
    assert left.fields["error"] == "LiveKit did not answer within 0.2s"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("setup", "skip", "text"),
    [
        ({"participants": [GHOST]}, "no_caller", "nobody but agents is in the room"),
        ({"room_missing": True}, "room_gone", "the room no longer exists"),
        ({"down": True}, "error", "LiveKit refused: down (unavailable)"),
    ],
)
async def test_a_room_without_its_call_is_left_alone(
    rig: Rig, caplog: pytest.LogCaptureFixture, setup: dict[str, Any], skip: str, text: str
) -> None:
    for key, value in setup.items():
        setattr(rig.livekit, key, value)
    decision = await rig.recoverer.recover(failed())
    assert (decision.redispatch, decision.skip) == (False, skip)
    assert decision.reason.startswith(text)
    assert rig.livekit.dispatched == [] and rig.livekit.removed == []
    [(job_id, note, noted_skip)] = rig.notes
    assert job_id == "AJ_dead" and note.startswith(f"not redispatched: {text}")
    assert noted_skip == skip  # what `lkrun recover` retries by
    assert rig.counted("lkrun_recoveries_skipped_total", agent="echo", reason=skip) == 1
    [line] = lines(caplog)
    assert line.levelno == logging.WARNING
    assert line.fields["skip"] == skip and line.fields["decision"] == "none"  # type: ignore[attr-defined]


async def test_what_the_policy_refuses_touches_no_room(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "lkrun.recovery")
    rig.livekit.participants = [person("alice")]
    assert not rig.recoverer.job_ended(failed(), RecoveryPolicy()).redispatch
    assert not rig.recoverer.job_ended(
        failed(attempt=1), RecoveryPolicy("redispatch", 1)
    ).redispatch
    assert not rig.recoverer.job_ended(failed(cause="killed"), ON).redispatch
    await rig.recoverer.close()
    assert rig.livekit.dispatched == []
    assert rig.notes == [
        ("AJ_dead", 'not redispatched: on_failure is "none"', "policy_off"),
        (
            "AJ_dead",
            "not redispatched: max_redispatches=1 reached (it was attempt 1)",
            "max_redispatches",
        ),
    ]  # a kill is not a failure: nothing noted
    assert rig.counted("lkrun_recoveries_skipped_total", agent="echo", reason="policy_off") == 1
    skipped = rig.counted("lkrun_recoveries_skipped_total", agent="echo", reason="max_redispatches")
    assert skipped == 1
    levels = [(r.levelno, r.fields.get("skip", "")) for r in lines(caplog)]  # type: ignore[attr-defined]
    assert levels == [
        (logging.INFO, "policy_off"),
        (logging.WARNING, "max_redispatches"),
        (logging.DEBUG, ""),
    ]


# -- the history ----------------------------------------------------------------------------


OLD_SCHEMA = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL, agent TEXT, room TEXT, dispatch_id TEXT, identity TEXT,
    status TEXT NOT NULL DEFAULT 'starting', pid INTEGER, offered_at REAL, accepted_at REAL,
    started_at REAL, ended_at REAL, error TEXT, exit_code INTEGER, stop_reason TEXT,
    memory_mb REAL, peak_memory_mb REAL, cpu_percent REAL, warm INTEGER NOT NULL DEFAULT 0,
    daemon_pid INTEGER, worker_id TEXT
);
"""


def test_an_older_history_opens_with_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    conn.execute(
        "INSERT INTO jobs (id, agent, room, status, accepted_at) VALUES ('AJ_old', 'a', 'r',"
        " 'success', 1.0)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    store = JobStore(path)
    store.open()
    try:
        old = store.get("AJ_old")
        assert old is not None
        assert (old["recovered_from"], old["attempt"], old["recovery"]) == ("", 0, "")
        assert (old["job_type"], old["participant"], old["metadata"]) == ("room", "", "")
        assert old["cause"] == ""  # ended before causes were kept
        store.upsert({"id": "AJ_new", "recovered_from": "AJ_old", "attempt": 1})
        assert store.flush()
        assert [j["id"] for j in store.chain("AJ_new")] == ["AJ_old", "AJ_new"]
    finally:
        store.close()


def test_the_chain_goes_both_ways(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    store.open()
    try:
        rows = [
            ("AJ_a", "", 0, 1.0),
            ("AJ_b", "AJ_a", 1, 2.0),
            ("AJ_c", "AJ_b", 2, 3.0),
            ("AJ_x", "", 0, 1.5),  # another call
        ]
        for job_id, parent, attempt, at in rows:
            store.upsert(
                {"id": job_id, "recovered_from": parent, "attempt": attempt, "accepted_at": at}
            )
        assert store.flush()
        for middle in ("AJ_a", "AJ_b", "AJ_c"):
            assert [j["id"] for j in store.chain(middle)] == ["AJ_a", "AJ_b", "AJ_c"]
        assert [j["id"] for j in store.chain("AJ_x")] == ["AJ_x"]
        assert store.chain("AJ_none") == []
    finally:
        store.close()
