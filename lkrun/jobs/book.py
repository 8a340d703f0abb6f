"""The daemon's record of each job it accepted, and the book that keeps them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lkrun.jobs.fields import JobStatus, timings


@dataclass
class JobRecord:
    id: str
    agent: str
    room: str
    dispatch_id: str
    identity: str
    status: JobStatus = JobStatus.STARTING
    pid: int | None = None
    offered_at: float | None = None  # when LiveKit offered the job (AvailabilityRequest)
    accepted_at: float = field(default_factory=time.time)  # when it was assigned
    started_at: float | None = None  # entrypoint running
    ended_at: float | None = None
    error: str = ""
    exit_code: int | None = None
    stop_reason: str = ""
    # Why it ended, one lkrun.supervision.lifecycle.Cause value ("" while it runs): its
    # verdict's, with its status, error and stop_reason (lifecycle.conclude).
    cause: str = ""
    # Why it was asked to end, the first ask's Cause value ("" if it never was): a daemon
    # that dies while the job stops leaves it ``lost``, and restart recovery must not
    # redispatch a job that was being killed, drained or terminated on purpose.
    stop_cause: str = ""
    memory_mb: float = 0.0  # resident memory of the job's process tree, last sample
    peak_memory_mb: float = 0.0
    cpu_percent: float = 0.0  # of one core, last sample
    warm: bool = False  # ran in a prewarmed process
    worker_id: str = ""  # the LiveKit worker (registration) that took the job
    # What a redispatch of the job sends again (lkrun.recovery), from its assignment.
    agent_name: str = ""  # the name LiveKit dispatches to ("" for an automatic agent)
    job_type: str = "room"  # room | publisher | participant
    participant: str = ""  # the participant a publisher/participant job is about
    metadata: str = ""  # the dispatch's
    # The recovery chain: the failed job this one replaces ("" if none) and its attempt
    # (0: the call's first job, n: its n-th redispatch); for a job that failed, what lkrun
    # did about it ("redispatched as attempt 2 (dispatch AD_...)", or why not).
    recovered_from: str = ""
    attempt: int = 0
    recovery: str = ""
    # Its skip reason (lkrun.recovery.SKIP_REASONS) when it was not redispatched, "" if it
    # was or nothing was decided: `lkrun recover` retries the lost jobs whose recovery
    # failed (error) or was never decided.
    recovery_skip: str = ""
    # The agent's recovery policy when the job was accepted: what `lkrun recover` applies to
    # it if its daemon never comes back (the manifest may be elsewhere by then, or edited).
    on_failure: str = "none"
    max_redispatches: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data.update(timings(data))
        return data


class JobBook:
    """The jobs this daemon runs now; every change also goes to ``on_change`` (the history,
    which answers for ended jobs)."""

    def __init__(self, on_change: Callable[[JobRecord], None] | None = None) -> None:
        self._active: dict[str, JobRecord] = {}
        self.on_change = on_change

    def add(self, record: JobRecord) -> None:
        self._active[record.id] = record
        self.update(record)

    def update(self, record: JobRecord) -> None:
        """A record changed (status, pid...): persist it."""
        if self.on_change is not None:
            self.on_change(record)

    def finish(self, record: JobRecord) -> None:
        """The job ended: its record is final (its status, error and cause are its
        verdict's, set by the supervisor, the one place that decides them)."""
        record.ended_at = time.time()
        self._active.pop(record.id, None)
        self.update(record)

    def get(self, job_id: str) -> JobRecord | None:
        return self._active.get(job_id)

    def active(self, agent: str | None = None) -> list[JobRecord]:
        return [r for r in self._active.values() if agent is None or r.agent == agent]
