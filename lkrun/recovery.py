"""Recovery after a job fails (issue 19): the call gets its agent back, or is left alone.

LiveKit does not reassign a job whose worker's process died, so the caller would be left
talking to silence. Three parts:

- the policy: the manifest's ``on_failure`` ("none" or "redispatch") and
  ``max_redispatches``, per agent with a ``[daemon]`` default (RecoveryPolicy);
- the decision, pure: the policy, why the job ended (its cause) and its attempt number in,
  redispatch or why not out (decide; room_decision for what LiveKit says of the room);
- the action (Recoverer): look at the room through LiveKit's RoomService, remove the dead
  job's agent participant (after a SIGKILL it stays some 15-20 s, a ghost), and create a new
  dispatch of the same agent to the same room with the same metadata. The dispatch's
  attributes say which job it replaces and the attempt; livekit-server copies them into the
  offer's Job.attributes, so whichever daemon takes it knows (lineage, wrong_participant).

Every decision is logged with its reason, as fields in JSON (job_id, agent, room, cause,
decision). The action runs in a task the Recoverer owns; nothing here blocks a supervisor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from livekit import api
from livekit.protocol import agent as agent_proto
from livekit.protocol import models

from lkrun.api.metrics import Metrics
from lkrun.credentials import Credentials
from lkrun.dispatch import AGENT_NAME_ATTRIBUTE
from lkrun.jobs.book import JobRecord
from lkrun.rooms import API_ERRORS, API_TIMEOUT, livekit_api, not_found
from lkrun.shared.lineage import ATTEMPT, RECOVERED_FROM
from lkrun.shared.lineage import lineage as shared_lineage
from lkrun.shared.participant_kinds import AGENT, is_dependent
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe
from lkrun.supervision.lifecycle import Cause

log = logging.getLogger("lkrun.recovery")

NONE = "none"
REDISPATCH = "redispatch"
ON_FAILURE = (NONE, REDISPATCH)
DEFAULT_MAX_REDISPATCHES = 2

# The causes worth a redispatch: the job died under the call without anyone asking. A crash
# (signal: segfault, OOM killer, kill -9), lkrun's memory_limit kill, an entrypoint that
# raised, a process that exited without its result, a job that never got running, a job
# whose daemon died. Never: a clean end, an operator's kill, a drain, LiveKit's
# termination, a room gone or left empty, and job_timeout (the operator's limit on the
# call: a redispatch would extend it). Their values, as the history keeps them.
REDISPATCH_CAUSES = frozenset(
    cause.value
    for cause in (
        Cause.SIGNAL,
        Cause.MEMORY_LIMIT,
        Cause.RAISED,
        Cause.EXIT,
        Cause.START_FAILED,
        Cause.LOST,
    )
)

# The dispatch attributes of a redispatch (livekit-server copies them into Job.attributes);
# the replacement's agent participant carries the first two as well.
PARTICIPANT = "lkrun.participant"  # publisher/participant jobs: the participant it is about
# ... and that participant's sid as the recovery found it in the room. The dispatch stays in
# the room, and livekit-server launches a job of it for whoever joins or publishes: the
# caller leaving and coming back under the same identity would get the original dispatch's
# job and this one's. Only the participant session the recovery was for is served.
PARTICIPANT_SID = "lkrun.participant_sid"

# Why a failure was not redispatched, as the skipped metric's label: a fixed set.
SKIP_REASONS = (
    "policy_off",  # on_failure = "none"
    "max_redispatches",  # the call had its redispatches
    "no_caller",  # nobody but agents in the room
    "participant_left",  # a publisher/participant job's participant is gone
    "room_gone",  # the room no longer exists
    "agent_present",  # an agent of the same name is already there (restart recovery)
    "stopped",  # lost while it was being stopped on purpose (kill, drain, termination...)
    "error",  # LiveKit refused or could not be reached
)


@dataclass(frozen=True)
class RecoveryPolicy:
    """What to do when one of an agent's jobs fails (its manifest settings)."""

    on_failure: str = NONE
    max_redispatches: int = DEFAULT_MAX_REDISPATCHES  # per call: attempts after the first

    @classmethod
    def of(cls, spec: _PolicySource) -> RecoveryPolicy:
        """An agent's policy (an AgentSpec, its [daemon] defaults already applied)."""
        return cls(spec.on_failure, spec.max_redispatches)


class _PolicySource(Protocol):
    @property
    def on_failure(self) -> str: ...

    @property
    def max_redispatches(self) -> int: ...


@dataclass(frozen=True)
class RecoveryDecision:
    """Redispatch or not, and why (a sentence for the log and the job's history)."""

    redispatch: bool
    reason: str
    skip: str = ""  # one of SKIP_REASONS when a failure is not redispatched; "" otherwise


def decide(policy: RecoveryPolicy, cause: str, attempt: int) -> RecoveryDecision:
    """Whether a job that ended with ``cause`` as attempt ``attempt`` (0: the call's first
    job) is worth a redispatch under ``policy``. What the room holds is room_decision's."""
    if cause not in REDISPATCH_CAUSES:
        said = f"its end ({cause or 'unknown'}) is not a failure to recover"
        return RecoveryDecision(False, said)
    if policy.on_failure != REDISPATCH:
        return RecoveryDecision(False, f'on_failure is "{policy.on_failure}"', "policy_off")
    if attempt >= policy.max_redispatches:
        said = f"max_redispatches={policy.max_redispatches} reached (it was attempt {attempt})"
        return RecoveryDecision(False, said, "max_redispatches")
    return RecoveryDecision(
        True, f"{cause}: redispatched as attempt {attempt + 1} of {policy.max_redispatches}"
    )


@dataclass(frozen=True)
class FailedJob:
    """What a redispatch needs of a job that ended: from its record (live or history)."""

    job_id: str
    agent: str  # the manifest's name, for logs and metrics
    agent_name: str  # the name LiveKit dispatches to ("" for an automatic agent)
    room: str
    metadata: str  # the dispatch's metadata, sent again
    job_type: str  # room | publisher | participant
    participant: str  # the participant a publisher/participant job is about
    identity: str  # its own agent participant: a ghost in the room after a kill
    cause: str  # a lkrun.supervision.lifecycle.Cause value
    attempt: int = 0  # 0: the call's first job
    stop_cause: str = ""  # why it was asked to end, if it was (a lost job: it was stopping)

    @classmethod
    def from_record(cls, record: JobRecord | Mapping[str, Any], cause: str = "") -> FailedJob:
        """From a JobRecord or a history row; ``cause`` overrides the record's."""
        row = record.to_dict() if isinstance(record, JobRecord) else record
        return cls(
            job_id=str(row["id"]),
            agent=str(row.get("agent") or ""),
            agent_name=str(row.get("agent_name") or ""),
            room=str(row.get("room") or ""),
            metadata=str(row.get("metadata") or ""),
            job_type=str(row.get("job_type") or "room"),
            participant=str(row.get("participant") or ""),
            identity=str(row.get("identity") or ""),
            cause=str(cause or row.get("cause") or ""),
            attempt=int(row.get("attempt") or 0),
            stop_cause=str(row.get("stop_cause") or ""),
        )

    @property
    def about_participant(self) -> bool:
        """A publisher/participant job: its call is that participant's."""
        return self.job_type in ("publisher", "participant") and bool(self.participant)

    def dispatch_attributes(self, participant_sid: str = "") -> dict[str, str]:
        """The redispatch's attributes; ``participant_sid``: the sid of the participant a
        publisher/participant job is about, as the room lists it now."""
        attributes = {RECOVERED_FROM: self.job_id, ATTEMPT: str(self.attempt + 1)}
        if self.about_participant:
            attributes[PARTICIPANT] = self.participant
            if participant_sid:
                attributes[PARTICIPANT_SID] = participant_sid
        return attributes

    def fields(self) -> dict[str, Any]:
        """The JSON log line's fields (agent and job_id travel as the record's own)."""
        return {"room": self.room, "cause": self.cause, "attempt": self.attempt}


def room_decision(
    failed: FailedJob,
    participants: Sequence[models.ParticipantInfo],
    *,
    absent_agent: bool = False,
    ghosts: Collection[str] = (),
) -> RecoveryDecision:
    """Whether the room, as LiveKit lists its participants, still holds the call.

    A caller (a participant LiveKit does not count as dependent, is_dependent: a client, a
    SIP caller; not an agent nor an egress) must be there; for a
    publisher/participant job, that very participant. The failed job's own participant, and
    those named in ``ghosts`` (other dead jobs' agent participants), are never counted. With
    ``absent_agent`` (recovery after a restart, when the job's end was not seen as it
    happened), an agent that already replaces this job, or another agent of the same name
    (for a publisher/participant job: serving the same participant, attribute
    lkrun.participant), means the call has its agent: nothing is done.
    """
    callers = [p.identity for p in participants if not is_dependent(p.kind)]
    if failed.about_participant and failed.participant not in callers:
        said = f"participant {failed.participant!r} is no longer in the room"
        return RecoveryDecision(False, said, "participant_left")
    if not callers:
        return RecoveryDecision(False, "nobody but agents is in the room", "no_caller")
    if absent_agent:
        dead = {failed.identity, *ghosts}
        for p in participants:
            if p.kind == AGENT and p.identity not in dead and _serves(p.attributes, failed):
                said = f"agent {p.identity!r} of the same name is in the room"
                return RecoveryDecision(False, said, "agent_present")
    return RecoveryDecision(True, f"{len(callers)} participant(s) other than agents are in it")


def _serves(attributes: Mapping[str, str], failed: FailedJob) -> bool:
    """Whether an agent participant with these attributes does the failed job's work."""
    if attributes.get(RECOVERED_FROM) == failed.job_id:
        return True
    if not failed.agent_name or attributes.get(AGENT_NAME_ATTRIBUTE) != failed.agent_name:
        return False
    return not failed.about_participant or attributes.get(PARTICIPANT) == failed.participant


def lineage(attributes: Mapping[str, str]) -> tuple[str, int]:
    """The failed job an offered job replaces ("" if none) and its attempt number (0 for a
    call's first job), from the offer's Job.attributes (lkrun.shared.lineage)."""
    return shared_lineage(attributes.get(RECOVERED_FROM), attributes.get(ATTEMPT))


def record_fields(job: agent_proto.Job) -> dict[str, Any]:
    """The JobRecord fields an assigned job's record takes from LiveKit's Job: what a
    redispatch sends again, and where the job stands in its call's chain."""
    recovered_from, attempt = lineage(job.attributes)
    return {
        "agent_name": job.agent_name,
        "job_type": agent_proto.JobType.Name(job.type).removeprefix("JT_").lower(),
        "participant": job.participant.identity,
        "metadata": job.metadata,
        "recovered_from": recovered_from,
        "attempt": attempt,
    }


def wrong_participant(attributes: Mapping[str, str], participant: models.ParticipantInfo) -> str:
    """Why an offered job must be declined, "" if not: a redispatch of a publisher or
    participant job launches a job for every such participant of the room, and only the
    one about the failed job's participant is a recovery (the others have their jobs). It
    launches one again when that participant leaves and rejoins under the same identity (a
    new sid): the original dispatch launches one for the rejoined participant too, so only
    the session the recovery was for (PARTICIPANT_SID) is taken."""
    wanted = attributes.get(PARTICIPANT, "")
    if not wanted:
        return ""
    of = f"a redispatch of job {attributes.get(RECOVERED_FROM, '?')} for participant {wanted!r}"
    if wanted != participant.identity:
        return f"{of}, not {participant.identity!r}"
    wanted_sid = attributes.get(PARTICIPANT_SID, "")
    if wanted_sid and wanted_sid != participant.sid:
        return f"{of} as {wanted_sid}, not as {participant.sid or '?'} (rejoined)"
    return ""


def _fault(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, api.TwirpError):
        return f"LiveKit refused: {exc.message} ({exc.code})"
    if isinstance(exc, asyncio.TimeoutError):
        return f"LiveKit did not answer within {timeout:g}s"
    return f"cannot reach LiveKit: {describe(exc)}"


def _ghost_left(
    failed: FailedJob,
    identities: Sequence[str],
    said: str,
    exc_info: BaseException | None = None,
) -> None:
    """Log dead jobs' agent participants left in the failed job's room (fields ``ghosts``,
    ``error``): LiveKit drops them when their connections time out."""
    fields = {**failed.fields(), "ghosts": list(identities), "error": said}
    extra = {"agent": failed.agent, "job_id": failed.job_id, "fields": fields}
    who = ", ".join(map(repr, identities))
    log.warning(
        "could not remove %s from room %r: %s",
        who,
        failed.room,
        said,
        extra=extra,
        exc_info=exc_info,
    )


# Told what was decided for a job: (job id, its history's recovery columns: ``recovery``, the
# text, and ``recovery_skip``, the skip reason or "" when it was redispatched).
Note = Callable[[str, dict[str, str]], None]


class Recoverer:
    """Decides on each failed job and redispatches it in a task of its own; ``close`` cancels
    and awaits what is under way. One per daemon (its agents share the credentials)."""

    def __init__(
        self,
        credentials: Credentials,
        *,
        metrics: Metrics | None = None,
        note: Note | None = None,
        timeout: float = API_TIMEOUT,
    ) -> None:
        self.credentials = credentials
        self.metrics = metrics
        self.note = note
        self.timeout = timeout
        self._tasks = BackgroundTasks(on_error=self._failed)

    def job_ended(self, failed: FailedJob, policy: RecoveryPolicy) -> RecoveryDecision:
        """The supervisor's hook: decide at once; on yes, redispatch in the background."""
        decision = decide(policy, failed.cause, failed.attempt)
        if not decision.redispatch:
            self.decided(failed, decision)
            return decision
        self._tasks.spawn(self.recover(failed), name=f"recover job {failed.job_id}")
        return decision

    async def recover(
        self, failed: FailedJob, *, absent_agent: bool = False, ghosts: Collection[str] = ()
    ) -> RecoveryDecision:
        """Look at the room and, if the call is still there (room_decision, which the
        arguments are for), remove the failed job's agent participant and those in
        ``ghosts``, and redispatch; what was done (or why not), logged and noted. Never
        raises for LiveKit's faults. The listing and the dispatch are bounded by
        ``timeout`` together; the removals run beside them in a task of their own (bounded
        by ``timeout`` too), so a slow removal never undoes a dispatch made. The policy is
        the caller's business (decide)."""
        try:
            redispatch = self._redispatch(failed, absent_agent, set(ghosts))
            decision = await asyncio.wait_for(redispatch, self.timeout)
        except API_ERRORS as exc:
            decision = RecoveryDecision(False, _fault(exc, self.timeout), "error")
        except Exception as exc:  # a bug, or a client fault of a kind not foreseen
            extra = {"agent": failed.agent, "job_id": failed.job_id, "fields": failed.fields()}
            log.exception("recovering job %s failed", failed.job_id, extra=extra)
            decision = RecoveryDecision(False, f"recovery failed: {describe(exc)}", "error")
        self.decided(failed, decision)
        return decision

    async def _redispatch(
        self, failed: FailedJob, absent_agent: bool, ghosts: set[str]
    ) -> RecoveryDecision:
        async with self._api() as lkapi:
            return await self._in_room(lkapi, failed, absent_agent, ghosts)

    async def _in_room(
        self, lkapi: api.LiveKitAPI, failed: FailedJob, absent_agent: bool, ghosts: set[str]
    ) -> RecoveryDecision:
        try:
            request = api.ListParticipantsRequest(room=failed.room)
            listed = await lkapi.room.list_participants(request)
        except api.TwirpError as exc:
            if not_found(exc):
                return RecoveryDecision(False, "the room no longer exists", "room_gone")
            raise
        people = listed.participants
        verdict = room_decision(failed, people, absent_agent=absent_agent, ghosts=ghosts)
        if not verdict.redispatch:
            return verdict
        sid = next((p.sid for p in people if p.identity == failed.participant), "")
        request = api.CreateAgentDispatchRequest(
            agent_name=failed.agent_name,
            room=failed.room,
            metadata=failed.metadata,
            attributes=failed.dispatch_attributes(sid if failed.about_participant else ""),
        )
        # All at once: the caller waits for the new agent, and the ghosts are only in the way.
        # The removals are a task of their own, with a client of their own: they may go on
        # after the dispatch is made (or failed), and what they meet is logged, no more.
        listed_ids = {p.identity for p in people}
        if dead := sorted(i for i in {failed.identity, *ghosts} if i and i in listed_ids):
            self._tasks.spawn(
                self._remove_ghosts(failed, dead), name=f"remove ghosts of job {failed.job_id}"
            )
        created = await lkapi.agent_dispatch.create_dispatch(request)
        return RecoveryDecision(
            True, f"redispatched as attempt {failed.attempt + 1} (dispatch {created.id})"
        )

    async def _remove_ghosts(self, failed: FailedJob, identities: Sequence[str]) -> None:
        """Remove dead jobs' agent participants from the failed job's room, within
        ``timeout``; a removal that fails or does not end in time is logged."""

        async def remove_all() -> None:
            async with self._api() as lkapi:
                await asyncio.gather(*(self._remove_ghost(lkapi, failed, i) for i in identities))

        try:
            await asyncio.wait_for(remove_all(), self.timeout)
        except API_ERRORS as exc:  # the client itself, or the time limit
            _ghost_left(failed, identities, _fault(exc, self.timeout))
        except Exception as exc:  # not foreseen: logged with its traceback, no more
            _ghost_left(failed, identities, describe(exc), exc_info=exc)

    async def _remove_ghost(self, lkapi: api.LiveKitAPI, failed: FailedJob, identity: str) -> None:
        """A dead job's agent participant: a killed process never left, and the server keeps
        it until its connection times out. Only in the way: a failure is logged, no more."""
        request = api.RoomParticipantIdentity(room=failed.room, identity=identity)
        try:
            await lkapi.room.remove_participant(request)
            return
        except api.TwirpError as exc:
            if not_found(exc):  # gone meanwhile: as good
                return
            said = _fault(exc, self.timeout)
        except (aiohttp.ClientError, OSError) as exc:
            said = _fault(exc, self.timeout)
        _ghost_left(failed, [identity], said)

    def decided(self, failed: FailedJob, decision: RecoveryDecision) -> None:
        """Log, count and note a decision about a failed job (also one made elsewhere: restart
        recovery decides the policy before it waits for the agent's registration)."""
        fields = {
            **failed.fields(),
            "decision": "redispatch" if decision.redispatch else "none",
            "reason": decision.reason,
        }
        if decision.skip:
            fields["skip"] = decision.skip
        extra = {"agent": failed.agent, "job_id": failed.job_id, "fields": fields}
        if decision.redispatch:
            log.warning(
                "job %s in room %r failed (%s): %s",
                failed.job_id,
                failed.room,
                failed.cause,
                decision.reason,
                extra=extra,
            )
            text = decision.reason
        elif decision.skip:
            # A failure left as it is: the caller is alone unless someone acts.
            level = logging.INFO if decision.skip == "policy_off" else logging.WARNING
            log.log(
                level,
                "job %s in room %r failed (%s) and is not redispatched: %s",
                failed.job_id,
                failed.room,
                failed.cause,
                decision.reason,
                extra=extra,
            )
            text = f"not redispatched: {decision.reason}"
        else:
            log.debug("job %s: no recovery: %s", failed.job_id, decision.reason, extra=extra)
            return
        if self.metrics is not None:
            if decision.redispatch:
                self.metrics.recovered(failed.agent, failed.cause)
            else:
                self.metrics.recovery_skipped(failed.agent, decision.skip)
        if self.note is not None:
            self.note(failed.job_id, {"recovery": text, "recovery_skip": decision.skip})

    def _failed(self, task: asyncio.Future[Any], exc: BaseException) -> None:
        name = task.get_name() if isinstance(task, asyncio.Task) else "a recovery"
        log.error("%s failed", name, exc_info=exc)

    def _api(self) -> api.LiveKitAPI:
        return livekit_api(self.credentials)

    async def close(self, grace: float | None = None) -> None:
        """Let the redispatches under way finish (each is bounded by ``timeout``), then
        cancel what is left and wait for it."""
        await self._tasks.close(self.timeout if grace is None else grace)
