"""Whether an agent takes a job LiveKit offers: plain values in, a decision out.

No clock, no process, no connection: the supervisor counts its jobs and measures the CPU,
this module only weighs them, so every rule is tested with plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from lkrun.decisions import Decline


class Rules(Protocol):
    """The manifest's part of the decision (an AgentSpec is one)."""

    @property
    def max_jobs(self) -> int: ...

    @property
    def rooms(self) -> tuple[str, ...]: ...

    def accepts_room(self, room: str) -> bool: ...


@dataclass(frozen=True)
class Situation:
    """What the agent is doing when an offer comes."""

    jobs: int  # reserved, starting, running and stopping jobs
    accepting: bool = True  # False while draining, or once the agent left the manifest
    cpu_overload: str = ""  # why the CPU counts as overloaded (see CpuPressure); "" if not
    starting: str = ""  # why a job would not start at the agent's normal speed yet; "" if it would


def not_accepting(room: str) -> Decline:
    return Decline("not_accepting", f"room {room!r}: not accepting jobs (draining or removed)")


def weigh_offer(room: str, rules: Rules, now: Situation) -> Decline | None:
    """Why the agent declines a job in ``room``, or None: it takes it (and reserves a slot)."""
    if not now.accepting:
        return not_accepting(room)
    if now.starting:
        return Decline("starting", f"room {room!r}: starting ({now.starting})")
    if not rules.accepts_room(room):
        return Decline("rooms", f"room {room!r} matches none of {list(rules.rooms)}")
    if now.jobs >= rules.max_jobs:
        return Decline("max_jobs", f"room {room!r}: at max_jobs={rules.max_jobs}")
    if now.cpu_overload:
        return Decline("cpu", f"room {room!r}: {now.cpu_overload}")
    return None


def weigh_unreserved_assignment(rules: Rules, now: Situation) -> str:
    """Why an assignment we hold no slot for is refused, or "" to take it.

    Such an assignment follows an offer whose slot expired, or one answered before a
    reconnect. Refusing at once (rather than leaving LiveKit waiting) when no slot is
    free; taking it otherwise, since the room is waiting for an agent.
    """
    if not now.accepting or now.jobs >= rules.max_jobs:
        return "assigned without a reserved slot, and the agent is full or draining"
    return ""
