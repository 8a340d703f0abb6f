"""Where a job stands in its call's recovery chain (issue 19): the failed job it replaces
and its attempt number, read the same way by the daemon (lkrun.recovery, from the offer's
Job.attributes) and by the job (lkrun.context, from its start message or, from an older
daemon, the same attributes). Standard library only, like all of lkrun.shared."""

from __future__ import annotations

from typing import Any

# The dispatch attributes of a redispatch (livekit-server copies them into Job.attributes).
RECOVERED_FROM = "lkrun.recovered_from"  # the id of the failed job this one replaces
ATTEMPT = "lkrun.attempt"  # 1 for the first redispatch of a call, 2 for the next...


def lineage(recovered_from: Any, attempt: Any) -> tuple[str, int]:
    """(the job replaced, "" if none; the attempt, 0 for a call's first job). A redispatch's
    attempt is at least 1, and 1 when the value says nothing usable (someone else's
    dispatch with a bad value is a redispatch all the same)."""
    replaced = str(recovered_from or "")
    if not replaced:
        return "", 0
    try:
        number = int(attempt)
    except (TypeError, ValueError):
        return replaced, 1
    return replaced, max(number, 1)
