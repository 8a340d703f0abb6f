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
"""

from __future__ import annotations

from enum import Enum


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
