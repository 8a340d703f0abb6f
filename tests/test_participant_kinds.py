"""lkrun.shared.participant_kinds: the kinds livekit-server counts as dependent, with the
numbers both SDKs give them, and every place that asks whether a room holds a call."""

from __future__ import annotations

from typing import Any

import pytest
from livekit import rtc
from livekit.protocol import models

from lkrun import recovery, rooms
from lkrun.context import is_company
from lkrun.recovery import FailedJob, room_decision
from lkrun.shared import participant_kinds
from lkrun.shared.jobpipe import RoomGone
from lkrun.shared.participant_kinds import is_dependent

Kind = models.ParticipantInfo.Kind


def test_the_numbers_are_both_sdks() -> None:
    assert participant_kinds.AGENT == Kind.AGENT == rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
    assert participant_kinds.EGRESS == Kind.EGRESS == rtc.ParticipantKind.PARTICIPANT_KIND_EGRESS
    assert recovery.AGENT is participant_kinds.AGENT  # one definition


@pytest.mark.parametrize(
    ("kind", "dependent"),
    [
        (Kind.STANDARD, False),
        (Kind.INGRESS, False),
        (Kind.SIP, False),
        (Kind.AGENT, True),
        (Kind.EGRESS, True),
    ],
)
def test_agents_and_egress_are_no_callers(kind: int, dependent: bool) -> None:
    assert is_dependent(kind) is dependent
    person = models.ParticipantInfo(identity="x", kind=kind)
    failed = FailedJob("AJ_1", "echo", "echo", "call", "", "room", "", "echo-AJ_1", "signal")
    # Recovery: a caller must be there.
    assert room_decision(failed, [person]).redispatch is not dependent
    # The janitor: a room made anew is kept while a non-dependent participant is in it.
    gone = RoomGone(room="call", assigned_sid="RM_a", joined_sid="RM_b")
    kept = rooms.keep_reason(gone, models.Room(name="call", sid="RM_b"), [person])
    assert (kept == "") is dependent
    # empty_timeout: the job's company.
    remote: Any = type("Remote", (), {"kind": kind})()
    assert is_company(remote) is not dependent
