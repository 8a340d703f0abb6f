"""Restart recovery's logic (lkrun.lost_jobs): which lost jobs are redispatched, when, and
with which ghosts. A stand-in Recoverer records what it is asked; no server, no process."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from typing import Any

from lkrun.lost_jobs import lost_jobs, policy_decision, recorded_policy, recover_lost, summary
from lkrun.recovery import FailedJob, RecoveryDecision, RecoveryPolicy
from tests.conftest import wait_for

ON = RecoveryPolicy("redispatch", 2)
OFF = RecoveryPolicy("none", 2)


def row(job_id: str, agent: str = "echo", **fields: Any) -> dict[str, Any]:
    base = {
        "id": job_id,
        "agent": agent,
        "agent_name": agent,
        "room": f"room-{job_id}",
        "identity": f"{agent}-{job_id}",
        "status": "lost",
        "metadata": "m",
        "job_type": "room",
        "participant": "",
        "attempt": 0,
    }
    return {**base, **fields}


class StandIn:
    """What recover_lost asks of a Recoverer: decided() and recover()."""

    def __init__(self, log: list[str] | None = None) -> None:
        self.log = log if log is not None else []
        self.decided_: dict[str, RecoveryDecision] = {}
        self.recovered: dict[str, frozenset[str]] = {}

    def decided(self, failed: FailedJob, decision: RecoveryDecision) -> None:
        self.decided_[failed.job_id] = decision

    async def recover(
        self, failed: FailedJob, *, absent_agent: bool = False, ghosts: Collection[str] = ()
    ) -> RecoveryDecision:
        assert absent_agent  # a lost job's end was not seen: someone may have acted since
        self.log.append(f"recover {failed.job_id}")
        self.recovered[failed.job_id] = frozenset(ghosts)
        return RecoveryDecision(True, "redispatched as attempt 1 (dispatch AD_x)")


def test_lost_rows_are_failures_of_cause_lost_with_what_a_redispatch_needs() -> None:
    [failed] = lost_jobs([row("AJ_1", job_type="publisher", participant="alice", attempt=1)])
    assert (failed.cause, failed.attempt, failed.metadata) == ("lost", 1, "m")
    assert failed.dispatch_attributes() == {
        "lkrun.recovered_from": "AJ_1",
        "lkrun.attempt": "2",
        "lkrun.participant": "alice",
    }


def test_the_policy_decides_first() -> None:
    off, gone, spent, on = lost_jobs(
        [row("AJ_1"), row("AJ_2"), row("AJ_3", attempt=2), row("AJ_4")]
    )
    assert policy_decision(off, OFF).skip == "policy_off"
    unknown = policy_decision(gone, None)  # its agent is not in the manifest
    assert (unknown.redispatch, unknown.skip) == (False, "policy_off")
    assert policy_decision(spent, ON).skip == "max_redispatches"
    assert policy_decision(on, ON).redispatch


def test_a_job_stopped_on_purpose_when_its_daemon_died_is_never_redispatched() -> None:
    killed, drained, timed_out, memory = lost_jobs(
        [
            row("AJ_1", status="lost", stop_cause="killed"),
            row("AJ_2", status="lost", stop_cause="drain"),
            row("AJ_3", status="lost", stop_cause="job_timeout"),
            row("AJ_4", status="lost", stop_cause="memory_limit"),  # a failure all the same
        ]
    )
    for failed in (killed, drained, timed_out):
        decision = policy_decision(failed, ON)
        assert (decision.redispatch, decision.skip) == (False, "stopped")
        assert failed.stop_cause in decision.reason
    assert policy_decision(memory, ON).redispatch


async def test_recover_lost_leaves_stopped_jobs_alone_and_notes_why() -> None:
    recoverer = StandIn()
    jobs = lost_jobs([row("AJ_1", stop_cause="terminated"), row("AJ_2")])
    outcomes = await recover_lost(
        jobs,
        recoverer,  # type: ignore[arg-type]
        policy_for=lambda f: ON,
    )
    assert [(f.job_id, d.skip) for f, d in outcomes] == [("AJ_1", "stopped"), ("AJ_2", "")]
    assert recoverer.decided_["AJ_1"].skip == "stopped"  # logged, counted and noted
    assert list(recoverer.recovered) == ["AJ_2"]


def test_the_recorded_policy_is_the_row_s() -> None:
    assert recorded_policy(row("AJ_1", on_failure="redispatch", max_redispatches=3)) == (
        RecoveryPolicy("redispatch", 3)
    )
    assert recorded_policy(row("AJ_1")) == RecoveryPolicy("none", 0)  # an older row


async def test_each_agent_s_jobs_wait_for_it_and_the_others_ghosts_are_not_agents() -> None:
    events: list[str] = []
    gates = {"echo": asyncio.Event(), "greeter": asyncio.Event()}

    async def ready_for(agent: str) -> bool:
        events.append(f"waiting {agent}")
        await gates[agent].wait()
        events.append(f"ready {agent}")
        return True

    jobs = lost_jobs([row("AJ_1"), row("AJ_2"), row("AJ_3", agent="greeter"), row("AJ_4")])
    policies = {"AJ_4": OFF}
    recoverer = StandIn(events)
    task = asyncio.create_task(
        recover_lost(
            jobs,
            recoverer,  # type: ignore[arg-type]
            policy_for=lambda f: policies.get(f.job_id, ON),
            ready_for=ready_for,
        )
    )
    # At once, without waiting for any agent.
    await wait_for(lambda: "AJ_4" in recoverer.decided_, 5, 0.001, "AJ_4's decision")
    assert recoverer.decided_["AJ_4"].skip == "policy_off"
    await wait_for(lambda: len(events) == 2, 5, 0.001, "both agents waited for")
    assert sorted(events) == ["waiting echo", "waiting greeter"]  # nothing recovered yet
    gates["greeter"].set()
    await wait_for(lambda: "recover AJ_3" in events, 5, 0.001, "greeter's job recovered")
    assert "recover AJ_1" not in events  # echo is still not ready
    gates["echo"].set()
    outcomes = await task
    assert [(f.job_id, d.redispatch) for f, d in outcomes] == [
        ("AJ_1", True),
        ("AJ_2", True),
        ("AJ_3", True),
        ("AJ_4", False),
    ]
    assert events.count("waiting echo") == 1  # one wait per agent, not per job
    # Every other lost job's agent participant is a ghost; its own is the job's.
    assert recoverer.recovered["AJ_1"] == {"echo-AJ_2", "greeter-AJ_3", "echo-AJ_4"}
    assert summary(outcomes) == "4 lost job(s): 3 redispatched, 1 not (1 policy_off)"


async def test_an_agent_that_never_gets_ready_is_redispatched_anyway() -> None:
    """Another daemon may serve it; the room check still decides."""

    async def never(agent: str) -> bool:
        return False

    recoverer = StandIn()
    outcomes = await recover_lost(
        lost_jobs([row("AJ_1")]),
        recoverer,  # type: ignore[arg-type]
        policy_for=lambda f: ON,
        ready_for=never,
    )
    assert [d.redispatch for _, d in outcomes] == [True]
    assert list(recoverer.recovered) == ["AJ_1"]
