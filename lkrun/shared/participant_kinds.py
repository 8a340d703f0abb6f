"""Which participants keep a call going: livekit-server's "dependent" participants.

livekit-server counts AGENT and EGRESS participants as dependent: they are there because
of someone else (a room with only dependent participants left is closed after its
departure timeout, as if empty). lkrun follows it wherever it asks whether a room still
holds a call: restart and crash recovery (a caller must be there, lkrun.recovery), a job's
``empty_timeout`` (lkrun.context.is_company) and the janitor's check that a room made anew
holds nobody (lkrun.rooms). A recording (room composite egress) keeps no one company.

The values are ParticipantInfo.Kind's, the same numbers in livekit.protocol's
``models.ParticipantInfo.Kind`` (the daemon's) and livekit.rtc's ``ParticipantKind`` (the
job's); tests/test_participant_kinds.py checks both. Standard library only, like all of
lkrun.shared: both sides import it.
"""

from __future__ import annotations

EGRESS = 2  # ParticipantInfo.Kind.EGRESS, rtc.ParticipantKind.PARTICIPANT_KIND_EGRESS
AGENT = 4  # ParticipantInfo.Kind.AGENT, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
DEPENDENT = frozenset({AGENT, EGRESS})


def is_dependent(kind: int) -> bool:
    """Whether a participant of this kind is only there for others (an agent, an egress):
    it is no caller, and keeps no job company."""
    return kind in DEPENDENT
