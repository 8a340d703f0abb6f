"""lkrun.shared.lineage: one reading of a job's place in its call's recovery chain, for the
daemon (recovery.lineage, from an offer's attributes) and the job (context.JobInfo, from
its start message or an older daemon's attributes)."""

from __future__ import annotations

from typing import Any

import pytest

from lkrun.context import JobInfo
from lkrun.recovery import lineage as from_attributes
from lkrun.shared.lineage import lineage


@pytest.mark.parametrize(
    ("recovered_from", "attempt", "expected"),
    [
        ("", "3", ("", 0)),  # no job replaced: a first job, whatever the attempt says
        (None, None, ("", 0)),
        ("AJ_1", "2", ("AJ_1", 2)),
        ("AJ_1", 2, ("AJ_1", 2)),  # the start message's number
        ("AJ_1", "x", ("AJ_1", 1)),  # a bad value: a redispatch all the same
        ("AJ_1", None, ("AJ_1", 1)),
        ("AJ_1", 0, ("AJ_1", 1)),
        ("AJ_1", "-4", ("AJ_1", 1)),
    ],
)
def test_one_reading_on_both_sides(recovered_from: Any, attempt: Any, expected: Any) -> None:
    assert lineage(recovered_from, attempt) == expected
    attributes: dict[str, str] = {}
    if recovered_from is not None:
        attributes["lkrun.recovered_from"] = str(recovered_from)
    if attempt is not None:
        attributes["lkrun.attempt"] = str(attempt)
    assert from_attributes(attributes) == expected
    # The job, from an older daemon's start (no fields: the attributes tell) ...
    info = JobInfo.from_dict({"id": "AJ_2", "attributes": attributes})
    assert (info.recovered_from, info.attempt) == expected
    # ... and from the start message's own fields.
    start = {"recovered_from": recovered_from or "", "attempt": attempt}
    info = JobInfo.from_dict({"id": "AJ_2"}, start)
    assert (info.recovered_from, info.attempt) == expected
