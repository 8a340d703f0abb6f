"""One agent's jobs from reservation to end: the only owner of a job's phase.

Everything it acts on is passed in (where processes come from, where statuses go, the job
book, the clock), so its logic runs in unit tests against scripted fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from livekit.protocol import agent as proto

from lkrun.api.metrics import Metrics
from lkrun.decisions import Acceptance, Decline
from lkrun.jobs.book import JobBook, JobRecord, JobStatus
from lkrun.jobs.logfiles import JobLogs
from lkrun.logs import job_logger
from lkrun.manifest import format_duration
from lkrun.recovery import record_fields
from lkrun.shared.jobpipe import RoomGone
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe
from lkrun.supervision.job_process import LaunchError
from lkrun.supervision.lifecycle import (
    Asked,
    Cause,
    Event,
    Facts,
    Phase,
    Verdict,
    conclude,
    status_of,
    transition,
)
from lkrun.supervision.offers import Rules, Situation, weigh_offer, weigh_unreserved_assignment
from lkrun.supervision.start import StartRules, start_message

job_log = logging.getLogger("lkrun.job")

# The server waits 10 s for our answer to be followed by an assignment; after that
# a reserved slot is released.
ASSIGNMENT_WAIT = 15.0


class ProcessHandle(Protocol):
    """A job process as the supervisor drives it (lkrun.job_process.JobProcess is one)."""

    pid: int | None
    running_at: float | None

    @property
    def exited(self) -> bool: ...

    @property
    def being_killed(self) -> bool: ...

    def bind(
        self,
        log: logging.LoggerAdapter[Any],
        on_running: Callable[[], None] | None,
        sink: Callable[[str], None] | None = None,
    ) -> None: ...

    async def spawn(self) -> None: ...
    async def wait_ready(self, timeout: float) -> bool: ...
    def start(self, *, running_timeout: float = 0.0, **payload: Any) -> None: ...
    def drain(self) -> None: ...
    async def wait(self) -> Facts: ...
    def ask(self, asked: Asked, timeout: float) -> Coroutine[Any, Any, None]: ...
    async def stop(self, reason: str, timeout: float, *, cause: Cause) -> None: ...
    async def kill(self, why: str, *, cause: Cause) -> None: ...


class ProcessSource(Protocol):
    """Where job processes come from: the warm pool, else a cold one not yet spawned."""

    def claim(self) -> tuple[ProcessHandle, bool]: ...  # the process, and whether it is warm

    def replenish(self) -> None: ...  # a job took its process: make another, in a while


class StatusReporter(Protocol):
    """Where LiveKit hears of jobs (lkrun.registration.Registration is one)."""

    def update_job(
        self, job_id: str, status: proto.JobStatus.ValueType, error: str = ""
    ) -> None: ...

    def load_changed(self) -> None: ...


class RoomCleaner(Protocol):
    """Deletes a room a job's join made anew (lkrun.rooms.RoomJanitor is one)."""

    async def remove_recreated(self, gone: RoomGone, *, agent: str, job_id: str) -> bool: ...


class SupervisedRules(Rules, StartRules, Protocol):
    """The manifest's part of supervision (an AgentSpec is one)."""

    @property
    def prewarm_timeout(self) -> float: ...

    @property
    def shutdown_timeout(self) -> float: ...  # 0: the daemon's

    @property
    def job_timeout(self) -> float: ...

    @property
    def on_failure(self) -> str: ...

    @property
    def max_redispatches(self) -> int: ...


class DaemonSettings(Protocol):
    """The daemon-wide part of supervision (lkrun.agent_host.HostSettings is one)."""

    shutdown_timeout: float  # set to 0 when the daemon is told to stop at once


def effective_shutdown_timeout(agent: float, daemon: float) -> float:
    """A job's time between its shutdown request and the kill: its agent's own, else the
    daemon's; none once the daemon's is 0 (the third stop signal wins over the agent's)."""
    return 0.0 if daemon == 0 else (agent or daemon)


@dataclass
class Job:
    """One job in the supervisor's hands, whatever its phase."""

    id: str
    offered_at: float | None  # wall clock, for the record; None: assigned without an offer
    reserved_at: float = 0.0  # monotonic clock: when its reservation expires
    phase: Phase = Phase.RESERVED
    acceptance: Acceptance | None = None  # what we answered the offer with
    # The registration connection the answer went out on: the server forgets the offer,
    # answered or not, when that connection ends (see lost).
    connection: int | None = None
    record: JobRecord | None = None  # from the assignment on
    room_sid: str = ""  # the assigned room's, from the assignment on
    process: ProcessHandle | None = None
    spawned: bool = False  # the process exists: stops and kills go to it directly
    # What was asked of it to end it, in order. Each goes to its process, which acts on it
    # and reports it among the facts of its end; kept here for the asks made before the
    # process exists (and those of a job that never gets one).
    asked: list[Asked] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None  # job_timeout


class JobSupervisor:
    """Reserves slots for offers, runs assigned jobs in processes, stops them, reports."""

    def __init__(
        self,
        *,
        agent: str,
        rules: SupervisedRules,
        processes: ProcessSource,
        reporter: StatusReporter,
        book: JobBook,
        url: str,
        daemon: DaemonSettings,
        log: logging.LoggerAdapter[Any],
        metrics: Metrics | None = None,
        job_logs: JobLogs | None = None,
        rooms: RoomCleaner | None = None,
        on_end: Callable[[JobRecord], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.agent = agent
        self.rules = rules
        self.processes = processes
        self.reporter = reporter
        self.book = book
        self.url = url  # the LiveKit server's, for jobs whose assignment names none
        self.daemon = daemon
        self.log = log
        self.metrics = metrics
        self.job_logs = job_logs
        self.rooms = rooms
        # Told once of each assigned job whose record is final (status, cause, in the book's
        # history): lkrun.recovery decides there whether to bring the job back.
        self.on_end = on_end
        self.clock = clock  # timestamps in records; durations use ``monotonic``
        self.monotonic = monotonic
        self.accepting = True
        self.draining = False
        self.jobs: dict[str, Job] = {}  # every job not ENDED
        self._tasks = BackgroundTasks()
        self._idle = asyncio.Event()  # no job in any phase
        self._idle.set()

    # -- counting --------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Jobs that hold a slot: reserved, starting, running or stopping."""
        return len(self.jobs)

    def in_phase(self, *phases: Phase) -> list[Job]:
        return [job for job in self.jobs.values() if job.phase in phases]

    def running_processes(self) -> list[tuple[JobRecord, ProcessHandle]]:
        """Each job with a live process, for sampling its memory and CPU."""
        return [
            (job.record, job.process)
            for job in self.jobs.values()
            if job.spawned and job.record and job.process and not job.process.exited
        ]

    def owns(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.phase is not Phase.RESERVED

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- offers ----------------------------------------------------------------------------

    def offer(
        self, job_id: str, room: str, *, cpu_overload: str = "", starting: str = ""
    ) -> Decline | None:
        """Weigh an offer; on yes, reserve a slot until the assignment comes or time runs out."""
        self.expire_reservations()
        if job_id in self.jobs:  # LiveKit repeated an offer: one job must not hold two slots
            phase = self.jobs[job_id].phase.value
            return Decline("duplicate", f"room {room!r}: job {job_id} is already here ({phase})")
        now = Situation(self.count, self.accepting, cpu_overload, starting)
        if decline := weigh_offer(room, self.rules, now):
            return decline
        self.jobs[job_id] = Job(job_id, offered_at=self.clock(), reserved_at=self.monotonic())
        self._idle.clear()
        # If no assignment follows, free the slot even when no further offer arrives.
        asyncio.get_running_loop().call_later(ASSIGNMENT_WAIT + 0.1, self.expire_reservations)
        return None

    def answered(self, job_id: str, acceptance: Acceptance, *, connection: int) -> None:
        """What the offer was accepted with (the job's start message carries it), on which
        connection of the registration."""
        if (job := self.jobs.get(job_id)) is not None and job.phase is Phase.RESERVED:
            job.acceptance = acceptance
            job.connection = connection

    def lost(self, connection: int) -> list[str]:
        """The registration's ``connection`` ended: the server forgot the offers it made
        on it, answered ones too, and assigns none of them. Release their slots now (not
        ASSIGNMENT_WAIT later): LiveKit offers the job again, on the next connection, and a
        slot still held would decline it as a duplicate. The ids released."""
        gone = [
            job
            for job in self.in_phase(Phase.RESERVED)
            if job.connection is not None and job.connection == connection
        ]
        for job in gone:
            self._enter(job, Event.RELEASED)
        return [job.id for job in gone]

    def reserved(self, job_id: str) -> bool:
        """Whether ``job_id`` still holds a reserved slot (an expired one is released first)."""
        self.expire_reservations()
        job = self.jobs.get(job_id)
        return job is not None and job.phase is Phase.RESERVED

    def release(self, job_id: str) -> None:
        """No assignment will follow this offer (declined after all, or its answer was lost)."""
        job = self.jobs.get(job_id)
        if job is not None and job.phase is Phase.RESERVED:
            self._enter(job, Event.RELEASED)

    def expire_reservations(self) -> None:
        # The monotonic clock: a wall clock stepped back would hold the slot until it caught up.
        now = self.monotonic()
        for job in self.in_phase(Phase.RESERVED):
            if now - job.reserved_at > ASSIGNMENT_WAIT:
                self._enter(job, Event.RELEASED)

    # -- jobs ------------------------------------------------------------------------------

    def assign(self, assignment: proto.JobAssignment, *, worker_id: str = "") -> None:
        """Run the job LiveKit assigned to the worker ``worker_id`` (the registration's)."""
        info = assignment.job
        job = self.jobs.get(info.id)
        if job is not None and job.phase is not Phase.RESERVED:
            self.log.warning("job %s was assigned again while it runs; ignored", info.id)
            return
        if job is None:
            now = Situation(self.count, self.accepting)
            if why := weigh_unreserved_assignment(self.rules, now):
                self.log.warning("job %s refused: %s", info.id, why)
                self.reporter.update_job(info.id, proto.JS_FAILED, why)
                return
            job = self.jobs[info.id] = Job(info.id, offered_at=None)
            self._idle.clear()
        job.record = record = JobRecord(
            id=info.id,
            agent=self.agent,
            room=info.room.name,
            dispatch_id=info.dispatch_id,
            identity=info.state.participant_identity,
            offered_at=job.offered_at,
            accepted_at=self.clock(),
            worker_id=worker_id,
            **record_fields(info),  # what a redispatch needs; its place in a recovery chain
            # The policy as it is now: `lkrun recover` applies it if the daemon dies.
            on_failure=self.rules.on_failure,
            max_redispatches=self.rules.max_redispatches,
        )
        job.room_sid = info.room.sid
        self._enter(job, Event.ASSIGNED)
        try:
            self.book.add(record)
            self._claim_process(job)
            start = start_message(
                record=record,
                answer=job.acceptance,
                assignment=assignment,
                rules=self.rules,
                url=self.url,
                shutdown_timeout=self.shutdown_timeout(),
            )
        except Exception as exc:  # e.g. the job's log file cannot be opened
            self.log.exception("job %s could not be given a process", info.id)
            self._abandon_process(job, f"its job {info.id} could not start")
            self._end(job, self._start_failed(job, f"cannot start job: {describe(exc)}"))
            return
        self._tasks.spawn(self._run(job, start), name=f"job {info.id}")

    def stop(self, job_id: str, reason: str, *, cause: Cause) -> bool:
        """Ask a job to end, whatever its phase; False if there is no such job. ``cause``
        and ``reason`` say why, for its verdict (lifecycle.conclude)."""
        return self._request_stop(job_id, Asked(cause, reason))

    def kill(self, job_id: str, why: str, *, cause: Cause) -> bool:
        """End a job's processes by force, whatever its phase; False if there is no such job."""
        return self._request_stop(job_id, Asked(cause, why, force=True))

    def drain(self) -> None:
        """Take no new jobs and tell running ones, so they can wrap up."""
        self.draining = True
        self.accepting = False
        for job in self.jobs.values():
            if job.spawned and job.process is not None and job.phase is not Phase.STOPPING:
                job.process.drain()

    async def stop_all(self, reason: str) -> None:
        """Ask every job to end, kill what will not, and wait until every one has ended."""
        for job_id in list(self.jobs):
            self.stop(job_id, reason, cause=Cause.DRAIN)
        await self.wait_tasks()

    def kill_all(self, why: str) -> None:
        for job_id in list(self.jobs):
            self.kill(job_id, why, cause=Cause.DRAIN)

    async def wait_tasks(self) -> None:
        await self._tasks.join()

    def shutdown_timeout(self) -> float:
        return effective_shutdown_timeout(self.rules.shutdown_timeout, self.daemon.shutdown_timeout)

    # -- inside ----------------------------------------------------------------------------

    def _enter(self, job: Job, event: Event, verdict: Verdict | None = None) -> None:
        """The one place a job changes phase (and its record's status with it; an ended
        job's status is its ``verdict``'s)."""
        job.phase = transition(job.phase, event)
        if job.record is not None:
            job.record.status = status_of(job.phase, verdict)
        if job.phase is Phase.ENDED:
            del self.jobs[job.id]
            if not self.jobs:
                self._idle.set()
            self.reporter.load_changed()

    def _request_stop(self, job_id: str, asked: Asked) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            return False
        if job.phase is Phase.RESERVED:  # terminated before it was assigned: nothing runs
            self._enter(job, Event.STOP)
            return True
        job.asked.append(asked)
        self._enter(job, Event.STOP)
        assert job.record is not None
        # A preview while it stops: what was asked of it first. Not the verdict: _end
        # writes the reason conclude() decides (e.g. "room empty" from a done it crossed).
        job.record.stop_reason = job.record.stop_reason or asked.reason
        # Kept in the history if the daemon dies before the job ends (the row turns lost):
        # restart recovery leaves a job that was being stopped on purpose alone.
        job.record.stop_cause = job.record.stop_cause or asked.cause.value
        self.book.update(job.record)
        if job.spawned:
            self._stop_process(job, asked)
        # Else the launch is under way: _run finds the job STOPPING once the process exists.
        return True

    def _stop_process(self, job: Job, asked: Asked) -> None:
        proc = job.process
        assert proc is not None
        # The process takes the ask now, in this call: only carrying it out waits for the
        # task (an ask that reached it after it died on its own would be judged its cause).
        coro = proc.ask(asked, self.shutdown_timeout())
        self._tasks.spawn(coro, name=f"stop job {job.id}")

    def _claim_process(self, job: Job) -> None:
        """A warm process if one is ready, else a cold one (not started yet)."""
        assert job.record is not None
        record = job.record
        proc, record.warm = self.processes.claim()
        # Ours from here: whatever fails next, _abandon_process ends it.
        job.process, job.spawned = proc, record.warm
        sink = self.job_logs.writer(record.id).write_line if self.job_logs is not None else None
        proc.bind(job_logger(job_log, record.agent, record.id), lambda: self._on_running(job), sink)

    def _abandon_process(self, job: Job, why: str) -> None:
        """A claimed process that will run no job: kill it (a warm one lives already) and
        let the pool make another."""
        proc = job.process
        if proc is None:
            return
        if job.spawned and not proc.exited:
            coro = proc.kill(why, cause=Cause.START_FAILED)
            self._tasks.spawn(coro, name=f"kill unused process {proc.pid}")
        self.processes.replenish()

    async def _run(self, job: Job, start: dict[str, Any]) -> None:
        proc, record = job.process, job.record
        assert proc is not None and record is not None
        try:
            if not job.spawned:
                await proc.spawn()
                job.spawned = True
                for asked in job.asked:  # asked for while the process was being launched
                    self._stop_process(job, asked)
            record.pid = proc.pid
            self.book.update(record)
            self.log.info(
                "job %s in room %r: %s process %s",
                record.id,
                record.room,
                "warm" if record.warm else "cold",
                proc.pid,
            )
            ready = await proc.wait_ready(self.rules.prewarm_timeout)
            if ready and job.phase is Phase.STARTING:  # STOPPING: no job at all
                if self.draining:
                    proc.drain()
                # As long again for it to get going: a job that never says running would hold
                # its slot, shown as starting, for as long as it lives.
                proc.start(running_timeout=self.rules.prewarm_timeout, **start)
                job.timer = self._arm_timeout(job)
            self.processes.replenish()
            facts = await proc.wait()
        except LaunchError as exc:
            facts = self._start_failed(job, str(exc))
        except OSError as exc:
            facts = self._start_failed(job, f"cannot start job process: {exc}")
        except Exception as exc:  # a bug or a bad value must fail the job, not hold its slot
            self.log.exception("job %s could not be started", record.id)
            error = f"cannot start job process: {describe(exc)}"
            if job.spawned:
                await proc.kill(error, cause=Cause.START_FAILED)
            facts = self._start_failed(job, error)
        self._end(job, facts)

    def _start_failed(self, job: Job, error: str) -> Facts:
        """The facts of a job whose process could not be had, or started: what was asked
        of it, then lkrun giving up on it."""
        return Facts(asked=(*job.asked, Asked(Cause.START_FAILED, error, force=True)))

    def _arm_timeout(self, job: Job) -> asyncio.TimerHandle | None:
        limit = self.rules.job_timeout
        if not limit:
            return None
        why = f"job exceeded job_timeout={format_duration(limit)}"
        return asyncio.get_running_loop().call_later(
            limit, lambda: self.stop(job.id, why, cause=Cause.JOB_TIMEOUT)
        )

    def _on_running(self, job: Job) -> None:
        if job.phase is Phase.ENDED:
            return
        self._enter(job, Event.RUNNING)
        record, proc = job.record, job.process
        assert record is not None and proc is not None
        record.started_at = proc.running_at or self.clock()
        self.book.update(record)
        self.reporter.update_job(record.id, proto.JS_RUNNING)
        if self.metrics is not None:
            self.metrics.job_started(record.agent, record.warm)
            if record.offered_at is not None:
                wait = max(0.0, record.started_at - record.offered_at)
                self.metrics.offer_to_entrypoint(record.agent, record.warm, wait)

    def _end(self, job: Job, facts: Facts) -> None:
        record = job.record
        assert record is not None
        if job.timer is not None:
            job.timer.cancel()
        verdict = conclude(facts)
        self._enter(job, Event.EXITED, verdict)
        record.exit_code = facts.exit_code
        record.cause = verdict.cause.value
        record.stop_reason = verdict.reason
        record.error = verdict.error
        self.book.finish(record)
        if verdict.status is JobStatus.SUCCESS:
            self.reporter.update_job(record.id, proto.JS_SUCCESS)
            self.log.info("job %s succeeded (%s)", record.id, record.stop_reason or "done")
        else:
            self.reporter.update_job(record.id, proto.JS_FAILED, verdict.error)
            self.log.warning("job %s failed (%s): %s", record.id, verdict.cause, verdict.error)
        gone = facts.done.room_gone if facts.done is not None else None
        if gone is not None:
            self._remove_room(job, gone)
        if self.metrics is not None:
            self.metrics.job_ended(record.agent, record.status.value)
        if self.job_logs is not None:
            try:
                self.job_logs.writer(record.id).close()
            except Exception:  # the job has ended either way; its caller must go on
                self.log.exception("cannot close the log of job %s", record.id)
        if self.on_end is not None:
            try:
                self.on_end(record)
            except Exception:  # a hook's fault must not leave the job's end half done
                self.log.exception("on_end hook failed for job %s", record.id)

    def _remove_room(self, job: Job, gone: RoomGone) -> None:
        """Delete the room the job's join made anew, in the background (lkrun.rooms)."""
        record = job.record
        assert record is not None
        if self.rooms is None or not job.room_sid:
            return
        # The room and its assigned sid as the daemon was told; the job says which it joined.
        ours = RoomGone(record.room, job.room_sid, gone.joined_sid)
        coro = self.rooms.remove_recreated(ours, agent=record.agent, job_id=record.id)
        self._tasks.spawn(coro, name=f"delete room {record.room!r}")
