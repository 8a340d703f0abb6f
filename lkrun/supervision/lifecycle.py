"""A job's life as one state machine: the phases, the events, the only transitions allowed.

    offer taken ─▶ RESERVED ──assigned──▶ STARTING ──running──▶ RUNNING
                      │                      │                     │
                   released                stop                  stop
                      │                      ▼                     ▼
                      │                  STOPPING ◀────────────────┘
                      ▼                      │
                    ENDED ◀──exited──────────┴── (and from STARTING, RUNNING)

A stop asked for before the job's process exists is the STOPPING phase like any other:
whoever launches the process finds it there, and never sends the job its start.

How an ended job ended is decided here too, once: the process reports facts (what lkrun
asked of it, its exit code or signal, whether it got running, its own ``done`` report) and
``conclude`` turns them into the job's verdict: its status, its cause, its reason, its error.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import Enum
from typing import Any

from lkrun.jobs.fields import JobStatus
from lkrun.shared import jobpipe


class Phase(str, Enum):
    RESERVED = "reserved"  # we said yes to an offer; the assignment has not come yet
    STARTING = "starting"  # assigned; the job's process is being launched or loading
    RUNNING = "running"  # the entrypoint was called
    STOPPING = "stopping"  # a stop or kill was asked for; the process has not exited yet
    ENDED = "ended"  # released, or the process exited (how it ended is the outcome's)


class Event(str, Enum):
    ASSIGNED = "assigned"  # LiveKit assigned the job we reserved a slot for
    RELEASED = "released"  # no assignment will come: declined, expired, terminated early
    RUNNING = "running"  # the job process reported its entrypoint running
    STOP = "stop"  # a stop or kill: LiveKit, `lkrun jobs kill`, a timeout, a limit
    EXITED = "exited"  # the process exited, or could not be started at all


class IllegalTransition(RuntimeError):
    def __init__(self, phase: Phase, event: Event) -> None:
        super().__init__(f"a job that is {phase.value} cannot be {event.value}")
        self.phase = phase
        self.event = event


_NEXT: dict[tuple[Phase, Event], Phase] = {
    (Phase.RESERVED, Event.ASSIGNED): Phase.STARTING,
    (Phase.RESERVED, Event.RELEASED): Phase.ENDED,
    (Phase.RESERVED, Event.STOP): Phase.ENDED,  # terminated before it was assigned
    (Phase.STARTING, Event.RUNNING): Phase.RUNNING,
    (Phase.STARTING, Event.STOP): Phase.STOPPING,
    (Phase.STARTING, Event.EXITED): Phase.ENDED,
    (Phase.RUNNING, Event.STOP): Phase.STOPPING,
    (Phase.RUNNING, Event.EXITED): Phase.ENDED,
    # The entrypoint may report running after the stop was sent: the job did start.
    (Phase.STOPPING, Event.RUNNING): Phase.STOPPING,
    (Phase.STOPPING, Event.STOP): Phase.STOPPING,  # a second stop (or a kill after it)
    (Phase.STOPPING, Event.EXITED): Phase.ENDED,
}


def transition(phase: Phase, event: Event) -> Phase:
    """The phase after ``event``; IllegalTransition if it cannot happen in ``phase``."""
    try:
        return _NEXT[phase, event]
    except KeyError:
        raise IllegalTransition(phase, event) from None


def allowed(phase: Phase, event: Event) -> bool:
    return (phase, event) in _NEXT


# Its phase's status while a job lives (a reserved job has no record yet); an ended job's
# is its verdict's.
_LIVE_STATUS = {
    Phase.RESERVED: JobStatus.STARTING,
    Phase.STARTING: JobStatus.STARTING,
    Phase.RUNNING: JobStatus.RUNNING,
    Phase.STOPPING: JobStatus.STOPPING,
}


def status_of(phase: Phase, verdict: Verdict | None = None) -> JobStatus:
    """A job's status: its phase's while it lives, its verdict's once it has ended."""
    if phase is Phase.ENDED:
        if verdict is None:
            raise ValueError("an ended job's status is its verdict's")
        return verdict.status
    return _LIVE_STATUS[phase]


# -- how a job ended ---------------------------------------------------------------------------


class Cause(str, Enum):
    """Why a job ended: one value, kept in its history (``cause``). (A str Enum, as Phase
    is: enum.StrEnum is Python 3.11's, lkrun runs on 3.10.)"""

    CLEAN = "clean"  # the entrypoint returned, or the job shut itself down normally
    RAISED = "raised"  # the entrypoint raised, or the job reported an error
    EXIT = "exit"  # the process exited (with any code) without a proper done report
    SIGNAL = "signal"  # a signal lkrun did not send: segfault, the OOM killer, kill -9
    MEMORY_LIMIT = "memory_limit"  # lkrun killed it for memory_limit_mb
    JOB_TIMEOUT = "job_timeout"  # lkrun stopped it for job_timeout
    START_FAILED = "start_failed"  # it never got running: launch, import, protocol, timeouts
    KILLED = "killed"  # the operator asked: `lkrun jobs kill` (graceful or --force)
    DRAIN = "drain"  # the daemon's drain or shutdown ended it
    TERMINATED = "terminated"  # LiveKit terminated the job (dispatch deleted, room closed...)
    ROOM_GONE = "room_gone"  # its room was deleted before it joined (the join made a new one)
    ROOM_EMPTY = "room_empty"  # alone in its room for the agent's empty_timeout
    LOST = "lost"  # the daemon died while it ran (marked when the history is next opened)

    def __str__(self) -> str:
        return self.value


# lkrun's own judgement of the job, whatever the job says of itself.
_FAILS = frozenset({Cause.MEMORY_LIMIT, Cause.JOB_TIMEOUT, Cause.START_FAILED})

# The ``cause`` a job's done message may carry (docs/protocol.md): only those a job can know.
_DONE_CAUSES = {Cause.ROOM_EMPTY.value: Cause.ROOM_EMPTY}


@dataclass(frozen=True)
class Asked:
    """What lkrun asked of a job to end it, and why: a stop (the job's shutdown, then its
    process killed if it takes too long) or, with ``force``, a kill at once."""

    cause: Cause
    reason: str  # as the record's stop_reason shows it: "terminated by LiveKit", ...
    force: bool = False


@dataclass(frozen=True)
class Done:
    """The job's own report of its end: its ``done`` message."""

    ok: bool
    error: str = ""
    reason: str = ""  # why it stopped, as the job saw it
    cause: str = ""  # e.g. "room_empty"; any other value is ignored
    room_gone: jobpipe.RoomGone | None = None  # its room was deleted; the join made a new one

    @classmethod
    def parse(cls, msg: dict[str, Any]) -> Done:
        """From a done message as received: only a literal true is ok; texts are capped."""
        return cls(
            ok=msg.get("ok") is True,
            error=jobpipe.cap(str(msg.get("error") or "")),
            reason=jobpipe.cap(str(msg.get("reason") or "")),
            cause=str(msg.get("cause") or ""),
            room_gone=jobpipe.RoomGone.parse(msg.get("room_gone")),
        )

    @property
    def said(self) -> bool:
        """Whether it says how the job ended (ok, or an error): a bare ``ok: false`` does not."""
        return self.ok or bool(self.error)


@dataclass(frozen=True)
class Facts:
    """What is known of an ended job: no judgement, only what happened."""

    asked: tuple[Asked, ...] = ()  # in the order asked; lkrun's own kills included
    exit_code: int | None = None  # negative: killed by that signal; None: not known
    running: bool = False  # its entrypoint was called
    done: Done | None = None  # as the job reported it, if it did
    last_log_line: str = ""  # a hint for an exit without a report

    @property
    def signal(self) -> int | None:
        """The signal that ended the process, if one did."""
        return -self.exit_code if self.exit_code is not None and self.exit_code < 0 else None


@dataclass(frozen=True)
class Verdict:
    """How a job ended, as its record, LiveKit and the metrics tell it."""

    status: JobStatus  # SUCCESS or FAILED
    cause: Cause
    reason: str = ""  # the record's stop_reason
    error: str = ""  # "" for a success


def conclude(facts: Facts) -> Verdict:
    """The one place that decides how a job ended, from the facts alone.

    What lkrun asked comes first: the first ask is the cause (a job asked to stop that then
    crashes was still stopped on purpose), and the reason. Then, in order: a failure lkrun
    decided (a limit, a start it gave up on, the operator's --force) whatever the job says;
    its room gone; an end the job names itself (room_empty); the job's own report; a kill
    before it reported; a stop before it ever ran (a success: nothing ran); else how its
    process exited. (Asks made after the job's report are not among the facts: JobProcess
    leaves them out.)
    """
    asked, done = facts.asked, facts.done
    first = asked[0] if asked else None
    reason = first.reason if first else (done.reason if done else "")
    if failure := next((a for a in asked if _fails(a)), None):
        assert first is not None
        return Verdict(JobStatus.FAILED, first.cause, reason, failure.reason)
    if done is not None and done.room_gone is not None:
        return Verdict(JobStatus.FAILED, Cause.ROOM_GONE, reason, done.error or str(done.room_gone))
    if done is not None and done.ok and (own := _DONE_CAUSES.get(done.cause)):
        # It ended itself for a reason only it knows, before any stop reached it: leaving
        # an empty room, LiveKit then terminates the job on its way out.
        return Verdict(JobStatus.SUCCESS, own, done.reason)
    if done is not None and done.said:
        if first is not None:
            cause = first.cause
        elif done.ok:
            cause = Cause.CLEAN
        else:
            cause = Cause.RAISED if facts.running else Cause.START_FAILED
        status = JobStatus.SUCCESS if done.ok else JobStatus.FAILED
        return Verdict(status, cause, reason, "" if done.ok else done.error)
    if forced := next((a for a in asked if a.force), None):
        assert first is not None
        return Verdict(JobStatus.FAILED, first.cause, reason, forced.reason)
    if first is not None and not facts.running:  # asked to stop before its job began
        return Verdict(JobStatus.SUCCESS, first.cause, reason)
    if first is not None:
        cause = first.cause
    elif facts.signal is not None:
        cause = Cause.SIGNAL
    else:
        cause = Cause.EXIT if facts.running else Cause.START_FAILED
    return Verdict(JobStatus.FAILED, cause, reason, _exit_text(facts))


def _fails(asked: Asked) -> bool:
    return asked.cause in _FAILS or (asked.cause is Cause.KILLED and asked.force)


def _exit_text(facts: Facts) -> str:
    code = facts.exit_code
    if code is None:
        text = "job process ended without reporting a result (its fork server exited)"
    elif code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        text = f"job process killed by {name}"
    elif code == 0:
        text = "job process exited without reporting a result"
    else:
        text = f"job process exited with code {code}"
    if facts.last_log_line:
        text += f" (last log line: {facts.last_log_line[:200]})"
    return text
