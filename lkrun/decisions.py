"""An agent's answer to a job offer: yes (how its participant joins) or no (and why).

Plain values, shared by who decides (lkrun.agent_host, lkrun.supervision) and who sends
the answer (lkrun.registration), so neither imports the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Acceptance:
    identity: str
    name: str = ""
    metadata: str = ""
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Decline:
    reason: str  # a short code for metrics: rooms, max_jobs, cpu, not_accepting, error...
    text: str = ""
    terminate: bool = False  # end the job: LiveKit offers it to no other worker


Decision = Acceptance | Decline
