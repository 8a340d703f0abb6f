"""What every view of a job shares: its statuses, and the fields derived from its times.

The daemon's live records (book), the job history (store, history), the control API and
the CLI all take them from here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from enum import Enum
from typing import Any


class JobStatus(str, Enum):
    STARTING = "starting"  # assigned; subprocess starting
    RUNNING = "running"  # entrypoint called
    STOPPING = "stopping"  # shutdown requested
    SUCCESS = "success"
    FAILED = "failed"
    LOST = "lost"  # still active when its daemon died: set by the job history on reopen

    @property
    def ended(self) -> bool:
        return self in (JobStatus.SUCCESS, JobStatus.FAILED, JobStatus.LOST)


STATUSES = tuple(s.value for s in JobStatus)
ACTIVE_STATUSES = tuple(s.value for s in JobStatus if not s.ended)
ENDED_STATUSES = tuple(s.value for s in JobStatus if s.ended)


def timings(job: Mapping[str, Any], now: float | None = None) -> dict[str, Any]:
    """``age`` (seconds since accepted, until it ended or ``now``) and ``offer_to_start_ms``
    (LiveKit's offer to the entrypoint running), from a job's times; missing times count
    as not yet."""
    ended = job.get("ended_at")
    end = ended if ended is not None else (time.time() if now is None else now)
    accepted = job.get("accepted_at")
    offered, started = job.get("offered_at"), job.get("started_at")
    return {
        "age": round(end - accepted, 3) if accepted is not None else 0.0,
        "offer_to_start_ms": (
            round((started - offered) * 1000, 2)
            if started is not None and offered is not None
            else None
        ),
    }
