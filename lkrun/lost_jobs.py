"""The jobs a dead daemon left behind: their calls get their agents back (issue 19, item 2).

A daemon that dies (SIGKILL, OOM killer, a host reboot) takes its job processes with it;
LiveKit does not reassign their jobs, and the callers are left with a ghost agent that
says nothing. The job history knows those jobs: the next daemon on the same state
directory marks them ``lost`` when it opens it (JobStore.lost), and so does ``lkrun
recover --state-dir`` for a daemon that never comes back. For each, this module applies
the recovery policy (lkrun.recovery, cause LOST) and, where it says redispatch, hands the
job to the Recoverer with ``absent_agent``: the job ended unseen, so an agent of the same
name already in the room (someone redispatched it, another daemon took over) means the
call has its agent. The other lost jobs' agent participants are ghosts too: never counted
as present, and removed.

A restarted daemon redispatches an agent's lost jobs only once that agent can take a job
(registered with LiveKit, warm processes ready: AgentHost.wait_ready): livekit-server drops
a dispatch that finds no available worker, and the restarted daemon is usually the only
one, or the nearest, with that agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from lkrun.recovery import (
    REDISPATCH_CAUSES,
    FailedJob,
    Recoverer,
    RecoveryDecision,
    RecoveryPolicy,
    decide,
)
from lkrun.supervision.lifecycle import Cause

log = logging.getLogger("lkrun.recovery")

LOST = Cause.LOST.value  # the daemon died while the job ran
# How long a restarted daemon waits for an agent to be able to take a job before it
# redispatches that agent's lost jobs anyway (another daemon may serve the agent).
READY_TIMEOUT = 120.0

# The policy for a lost job; None: nobody knows it (its agent is not in the manifest).
PolicyFor = Callable[[FailedJob], RecoveryPolicy | None]
# Completes when an agent can take a job; True if it can, False if it gave up waiting.
ReadyFor = Callable[[str], Awaitable[bool]]
Outcome = tuple[FailedJob, RecoveryDecision]


def lost_jobs(rows: Iterable[Mapping[str, Any]]) -> list[FailedJob]:
    """The history rows of jobs marked lost, as failed jobs of cause LOST."""
    return [FailedJob.from_record(row, cause=LOST) for row in rows]


def recorded_policy(row: Mapping[str, Any]) -> RecoveryPolicy:
    """The policy a job's record kept from when its agent accepted it."""
    return RecoveryPolicy(
        str(row.get("on_failure") or "none"), int(row.get("max_redispatches") or 0)
    )


def policy_decision(failed: FailedJob, policy: RecoveryPolicy | None) -> RecoveryDecision:
    """decide() for a lost job; with no policy known, no. A job its daemon was stopping on
    purpose when it died (an operator's kill, LiveKit's termination, job_timeout, a drain's
    stop) is never redispatched, whatever the policy: it would have ended anyway. One
    stopped for a failure worth a redispatch (memory_limit) is a lost job like any."""
    if failed.stop_cause and failed.stop_cause not in REDISPATCH_CAUSES:
        said = f"it was being stopped ({failed.stop_cause}) when its daemon died"
        return RecoveryDecision(False, said, "stopped")
    if policy is None:
        said = f"agent {failed.agent!r} is not in the manifest: no recovery policy"
        return RecoveryDecision(False, said, "policy_off")
    return decide(policy, failed.cause, failed.attempt)


async def recover_lost(
    jobs: Sequence[FailedJob],
    recoverer: Recoverer,
    *,
    policy_for: PolicyFor,
    ready_for: ReadyFor | None = None,
) -> list[Outcome]:
    """Apply the policy to each lost job and redispatch those it says to, all at once, each
    agent's once ``ready_for`` that agent says it can take them. Every decision is logged,
    counted and noted by the Recoverer; the outcomes come back in ``jobs``' order."""
    ghosts = {f.identity for f in jobs if f.identity}
    decisions = {f.job_id: policy_decision(f, policy_for(f)) for f in jobs}
    by_agent: dict[str, list[FailedJob]] = defaultdict(list)
    for failed in jobs:
        if decisions[failed.job_id].redispatch:
            by_agent[failed.agent].append(failed)
        else:
            recoverer.decided(failed, decisions[failed.job_id])

    async def agent_jobs(agent: str, failed: list[FailedJob]) -> None:
        if ready_for is not None and not await ready_for(agent):
            log.warning(
                "agent %s cannot take jobs yet: redispatching its %d lost job(s) anyway "
                "(another daemon may serve it)",
                agent,
                len(failed),
                extra={"agent": agent},
            )
        outcomes = await asyncio.gather(
            *(recoverer.recover(f, absent_agent=True, ghosts=ghosts - {f.identity}) for f in failed)
        )
        decisions.update((f.job_id, d) for f, d in zip(failed, outcomes, strict=True))

    await asyncio.gather(*(agent_jobs(agent, failed) for agent, failed in by_agent.items()))
    return [(f, decisions[f.job_id]) for f in jobs]


def summary(outcomes: Sequence[Outcome]) -> str:
    """'3 lost job(s): 2 redispatched, 1 not (no_caller)'."""
    done = sum(1 for _, d in outcomes if d.redispatch)
    skipped = Counter(d.skip or "not a failure" for _, d in outcomes if not d.redispatch)
    text = f"{len(outcomes)} lost job(s): {done} redispatched"
    if skipped:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
        text += f", {sum(skipped.values())} not ({why})"
    return text
