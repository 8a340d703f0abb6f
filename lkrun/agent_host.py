"""One agent of the manifest at run time: its registration, its offers policy, its jobs.

The agent host consumes its registration's events in one loop (``consume``), in the order
the server sent them: an assignment goes to the supervisor, a termination stops its job. An
offer is decided in a task of its own (``decide``: the supervisor's rules, then the app's
on_request if it has one), so the loop never waits on an app; the answer is stored and sent
once made. An offer whose connection dropped before it was decided is answered never, and
its slot released; so is the slot of an offer answered yes on a connection that dropped
before its assignment came (the server forgot the offer with it, and offers the job again).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.api.metrics import Metrics
from lkrun.credentials import Credentials
from lkrun.decisions import Acceptance, Decision, Decline
from lkrun.dispatch import AGENT_NAME_ATTRIBUTE, DAEMON_ATTRIBUTE
from lkrun.jobs.book import JobBook, JobRecord
from lkrun.jobs.logfiles import JobLogs
from lkrun.load import CpuPressure, WorkerLoad, agent_load
from lkrun.logs import agent_logger
from lkrun.manifest import AgentSpec
from lkrun.recovery import (
    ATTEMPT,
    PARTICIPANT,
    RECOVERED_FROM,
    FailedJob,
    Recoverer,
    RecoveryPolicy,
    lineage,
    wrong_participant,
)
from lkrun.registration import (
    Assigned,
    AvailableSeen,
    Lost,
    Offer,
    Registered,
    Registration,
    RegistrationEvent,
    Terminated,
    WorkerSpec,
)
from lkrun.rooms import RoomJanitor
from lkrun.shared.text import describe
from lkrun.supervision.agent_processes import AgentProcesses
from lkrun.supervision.forkserver import ForkServer
from lkrun.supervision.inference import InferenceProcesses
from lkrun.supervision.job_monitor import MB, Target, Usage
from lkrun.supervision.lifecycle import Cause
from lkrun.supervision.offers import not_accepting
from lkrun.supervision.request_process import RequestProcess, RequestRefused
from lkrun.supervision.supervisor import JobSupervisor, ProcessHandle, effective_shutdown_timeout
from lkrun.supervision.warm_pool import WarmPool

log = logging.getLogger("lkrun.agent")
job_log = logging.getLogger("lkrun.job")


def worker_spec(spec: AgentSpec) -> WorkerSpec:
    perms = spec.permissions
    return WorkerSpec(
        agent_name=spec.registered_name,
        job_type=spec.job_type,
        namespace=spec.namespace,
        permissions=models.ParticipantPermission(
            can_publish=perms.can_publish,
            can_subscribe=perms.can_subscribe,
            can_publish_data=perms.can_publish_data,
            can_update_metadata=perms.can_update_metadata,
            hidden=perms.hidden,
            agent=True,
        ),
    )


@dataclass
class HostSettings:
    """Daemon-wide knobs every agent shares."""

    shutdown_timeout: float
    # The machine's CPU as the load policy sees it; by default it never makes an agent full.
    cpu: CpuPressure = field(default_factory=lambda: CpuPressure(threshold=math.inf))
    metrics: Metrics = field(default_factory=Metrics)
    job_logs: JobLogs | None = None  # per-job log files
    daemon_name: str = ""  # on each agent participant, so clients see which daemon serves
    # One inference process per interpreter, for apps that register inference runners.
    inference: InferenceProcesses | None = None
    # Redispatches failed jobs as each agent's on_failure says (lkrun.recovery).
    recovery: Recoverer | None = None


class AgentHost:
    """Answers offers for one agent and supervises its jobs."""

    def __init__(
        self,
        *,
        spec: AgentSpec,
        workdir: Path,
        credentials: Credentials,
        book: JobBook,
        session: aiohttp.ClientSession,
        settings: HostSettings,
        registration: type[Registration] = Registration,  # tests: a fake without a server
    ) -> None:
        self.spec = spec
        self.log = agent_logger(log, spec.name)
        self.workdir = workdir
        self.credentials = credentials
        self.book = book
        self.settings = settings
        self.registration = registration(
            label=spec.name,
            spec=worker_spec(spec),
            credentials=credentials,
            load=self.worker_load,
            session=session,
        )
        self.processes = AgentProcesses(
            spec=spec,
            workdir=workdir,
            credentials=credentials,
            log=self.log,
            shutdown_timeout=self._shutdown_timeout,
            on_readiness=self._processes_changed,
            inference=settings.inference,
        )
        self.jobs = JobSupervisor(
            agent=spec.name,
            rules=spec,
            processes=self.processes,
            reporter=self.registration,
            book=book,
            url=credentials.url,
            daemon=settings,
            log=self.log,
            metrics=settings.metrics,
            job_logs=settings.job_logs,
            rooms=RoomJanitor(credentials),
            on_end=self._job_ended,
        )
        self._offers: dict[asyncio.Task[None], Offer] = {}  # offers being decided
        self._status: WorkerLoad | None = None  # the last load computed, for its changes
        self._status_at = time.monotonic()
        self._idle_memory: dict[int, float] = {}  # warm process pid -> MB
        self._readiness_moved = asyncio.Event()  # the processes' not_ready() may have changed

    # -- the registration's events --------------------------------------------------------

    async def consume(self) -> None:
        """Each event of the registration in turn, until cancelled (run() runs it)."""
        while True:
            event = await self.registration.next_event()
            try:
                self.handle(event)
            except Exception:  # a fault concerns one job: it must not stop the others'
                self.log.exception("handling %s failed", type(event).__name__)

    def handle(self, event: RegistrationEvent) -> None:
        if isinstance(event, Offer):
            task = asyncio.create_task(self._answer(event), name=f"offer {event.job.id}")
            self._offers[task] = event
            task.add_done_callback(self._offer_done)
        elif isinstance(event, Assigned):
            self.jobs.assign(event.assignment, worker_id=event.worker_id)
        elif isinstance(event, Terminated):
            if self.jobs.stop(event.job_id, "terminated by LiveKit", cause=Cause.TERMINATED):
                self.log.info("job %s terminated by LiveKit", event.job_id)
        elif isinstance(event, Registered):
            self._readiness_moved.set()
            if event.again:
                self.settings.metrics.registration_reconnected(self.spec.name)
        elif isinstance(event, AvailableSeen):
            self._readiness_moved.set()
        elif isinstance(event, Lost):
            # The server forgot every offer of that connection: those being decided are
            # given up, those answered yes no longer wait for an assignment.
            for task, offer in list(self._offers.items()):
                if offer.connection == event.connection:
                    task.cancel()
            if released := self.jobs.lost(event.connection):
                self.log.info(
                    "registration connection lost: released %d reserved job(s): %s",
                    len(released),
                    ", ".join(released),
                )

    async def _answer(self, offer: Offer) -> None:
        job = offer.job
        try:
            decision = await self.decide(job)
        except Exception as exc:
            self.log.exception("deciding on job %s failed; declining", job.id)
            decision = Decline("error", describe(exc))
        try:
            if not self.registration.answer(offer, decision):
                self.jobs.release(job.id)  # its connection dropped meanwhile: no job follows
                return
            # Stored once, as it goes out: the job's start message carries what it was
            # accepted with, the metrics how long the decision took from the offer's arrival.
            if isinstance(decision, Acceptance):
                self.jobs.answered(job.id, decision, connection=offer.connection)
        except Exception:  # e.g. an answer protobuf refuses: the slot must not stay held
            self.jobs.release(job.id)
            self.log.exception("answering job %s failed; its slot is released", job.id)
            return
        accepted = isinstance(decision, Acceptance)
        reason = decision.reason if isinstance(decision, Decline) else ""
        seconds = time.perf_counter() - offer.received
        self.settings.metrics.offer_answered(self.spec.name, accepted, seconds, reason)

    def _offer_done(self, task: asyncio.Task[None]) -> None:
        self._offers.pop(task, None)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("answering %s failed", task.get_name(), exc_info=exc)

    async def decide(self, job: proto.Job) -> Decision:
        """Whether this agent takes ``job``. A yes holds a slot for it until its assignment
        comes (or the wait for it ends); a no, or a decision given up (cancelled), holds none.
        """
        room = job.room.name
        if why := wrong_participant(job.attributes, job.participant):
            # Not ours to take, nor any worker's: terminate, so no other worker is asked.
            decline = Decline("participant", f"room {room!r}: {why}", terminate=True)
            self.log.info("declined job %s: %s", job.id, decline.text)
            return decline
        cpu = self.settings.cpu
        overload = cpu.why() if cpu.overloaded else ""
        starting = self.processes.not_ready()
        if decline := self.jobs.offer(job.id, room, cpu_overload=overload, starting=starting):
            self.log.info("declined job %s: %s", job.id, decline.text)
            return decline
        try:
            decision = await self._ask_app(job, self._acceptance(job))
            if not self.jobs.accepting:  # drained or removed while the app was deciding
                decision = not_accepting(room)
            elif isinstance(decision, Acceptance) and not self.jobs.reserved(job.id):
                # The app took longer than the wait for an assignment (its request_timeout
                # may be longer): the slot is gone, and a yes now would hold none.
                decision = Decline(
                    "expired", f"room {room!r}: decided after its reservation expired"
                )
        except BaseException:
            self.jobs.release(job.id)
            raise
        if isinstance(decision, Decline):
            self.jobs.release(job.id)
            self.log.info("declined job %s: %s", job.id, decision.text)
        return decision

    def _acceptance(self, job: proto.Job) -> Acceptance:
        """Yes, as lkrun answers it: the agent participant's identity, name, attributes."""
        identity = self.spec.format_identity(
            job_id=job.id, room=job.room.name, participant=job.participant.identity
        )
        # As the official worker does: clients (and `lkrun dispatch --wait`) tell agents apart.
        attributes = {AGENT_NAME_ATTRIBUTE: self.spec.registered_name}
        if self.settings.daemon_name:
            attributes[DAEMON_ATTRIBUTE] = self.settings.daemon_name
        attributes.update(self.spec.participant_attributes)
        attributes.update(_job_attributes(job))
        return Acceptance(
            identity=identity,
            name=self.spec.display_name(),
            metadata=self.spec.participant_metadata,
            attributes=tuple(attributes.items()),
        )

    async def _ask_app(self, job: proto.Job, ours: Acceptance) -> Decision:
        """The app's own request function decides when it has one; else ``ours`` stands."""
        requests = self.processes.requests
        if requests is None:
            return ours
        room = job.room.name
        try:
            decision = _app_decision(await requests.ask(job), ours)
        except RequestRefused as exc:
            return Decline("on_request", f"room {room!r}: {exc}")
        if isinstance(decision, Decline):
            decision = dataclasses.replace(decision, text=f"room {room!r}: {decision.text}")
        return decision

    def _job_ended(self, record: JobRecord) -> None:
        """The supervisor's on_end: a failed job may get its agent back (lkrun.recovery)."""
        recovery = self.settings.recovery
        if recovery is not None:
            recovery.job_ended(FailedJob.from_record(record), RecoveryPolicy.of(self.spec))

    # -- the agent's state ----------------------------------------------------------------

    def worker_load(self) -> WorkerLoad:
        cpu = self.settings.cpu
        load = agent_load(
            jobs=self.job_count(),
            max_jobs=self.spec.max_jobs,
            draining=not self.jobs.accepting,
            cpu=cpu.level,
            load_threshold=cpu.threshold,
            cpu_overloaded=cpu.overloaded,
            starting=bool(self.processes.not_ready()),
        )
        self._note_status(load)
        return load

    def not_ready(self) -> str:
        """Why this agent cannot take a job at its normal speed now ("" when it can): what
        /readyz and `lkrun status` say; its worker status is FULL ("starting") meanwhile."""
        if not self.registration.state.connected:
            return "not registered with LiveKit"
        if why := self.processes.not_ready():
            return f"starting: {why}"
        status = self._status
        if not self.registration.state.available_seen and (status is None or not status.full):
            # Ready only once a dispatch made now would find it: the AVAILABLE that the
            # processes' readiness sent may still be on its way (a pong away).
            return "starting: LiveKit has not yet taken its AVAILABLE status"
        return ""

    async def wait_ready(self) -> None:
        """Until not_ready() is "": registered, the processes ready, and LiveKit has seen
        the agent AVAILABLE (unless it is FULL for a reason of its own, e.g. max_jobs)."""
        while True:
            self._readiness_moved.clear()
            if not self.registration.state.connected:
                await self.registration.wait_registered()
            elif not self.not_ready():
                return
            else:
                await self._readiness_moved.wait()

    def _processes_changed(self) -> None:
        self._readiness_moved.set()
        self.registration.load_changed()

    def _note_status(self, load: WorkerLoad) -> None:
        """Log each change between AVAILABLE and FULL (and of FULL's reason): while FULL,
        LiveKit offers the agent nothing and drops a dispatch that finds no other worker."""
        was, since = self._status, self._status_at
        self._status, self._status_at = load, time.monotonic()
        if was is not None and was.full:
            self.settings.metrics.was_full(self.spec.name, was.reason, self._status_at - since)
        if was is not None and (was.full, was.reason) == (load.full, load.reason):
            return
        self._readiness_moved.set()  # FULL or not decides whether readiness waits for LiveKit
        if load.full:
            why = {
                "draining": "draining or removed from the manifest",
                "max_jobs": f"{load.job_count} job(s), max_jobs={self.spec.max_jobs}",
                "cpu": self.settings.cpu.why(),
                "starting": f"starting: {self.processes.not_ready()}",
            }.get(load.reason, load.reason)
            level = logging.INFO if load.reason in ("draining", "starting") else logging.WARNING
            self.log.log(level, "FULL (%s): LiveKit will offer it no job", why)
        elif was is not None:
            self.log.info("AVAILABLE again (%d job(s), load %.2f)", load.job_count, load.load)

    # -- lifecycle -----------------------------------------------------------------------

    def job_count(self) -> int:
        return self.jobs.count

    async def run(self) -> None:
        """Stay registered and keep the agent's processes until cancelled.

        AuthError propagates to the daemon.
        """
        await self.processes.start()
        consumer = asyncio.create_task(self.consume(), name=f"agent {self.spec.name} events")
        try:
            await self.registration.run()
        finally:
            consumer.cancel()
            offers = [consumer, *self._offers]
            for task in offers:
                task.cancel()
            await asyncio.gather(*offers, return_exceptions=True)
            # Jobs were stopped before this (see Daemon).
            await self.processes.close()

    def update_spec(self, spec: AgentSpec) -> None:
        """Apply a changed manifest entry that LiveKit does not see (limits, rooms, env...)."""
        self.spec = self.jobs.rules = spec
        self.registration.load_changed()
        self.processes.update_spec(spec)

    def code_changed(self) -> None:
        self.processes.code_changed()

    # The status payload reads these.
    @property
    def forkserver(self) -> ForkServer | None:
        return self.processes.forkserver

    @property
    def pool(self) -> WarmPool:
        return self.processes.pool

    @property
    def requests(self) -> RequestProcess | None:
        return self.processes.requests

    def stop_accepting(self) -> None:
        self.jobs.accepting = False
        self.registration.load_changed()
        self.processes.stop_warming()

    def drain(self) -> None:
        """Take no new jobs and tell running ones, so they can wrap up."""
        self.jobs.drain()
        self.stop_accepting()

    async def wait_idle(self) -> None:
        await self.jobs.wait_idle()

    async def stop_jobs(self, reason: str) -> None:
        """Ask every job to end, kill what will not, and wait for their records to close."""
        await self.jobs.stop_all(reason)
        await self.processes.wait_tasks()

    def kill_jobs(self, why: str) -> None:
        self.settings.shutdown_timeout = 0
        self.jobs.kill_all(why)

    def owns(self, job_id: str) -> bool:
        return self.jobs.owns(job_id)

    def kill_job(self, job_id: str, *, force: bool, by: str | None = None) -> str:
        """For `lkrun jobs kill` (or ``by``, e.g. "the dashboard"): ask the job to end (then
        kill it), or kill it at once."""
        if force:
            why = f"killed by {by} (force)" if by else "killed by `lkrun jobs kill --force`"
            self.jobs.kill(job_id, why, cause=Cause.KILLED)
            return "killed"
        self.jobs.stop(job_id, f"stopped by {by or '`lkrun jobs kill`'}", cause=Cause.KILLED)
        return "shutdown requested"

    def monitor_targets(self) -> list[Target]:
        forkserver = self.processes.forkserver
        zygote = forkserver.pid if forkserver is not None else None
        idle = self.processes.idle_pids()
        self._forget_idle_memory(idle)  # each round: warm processes come and go all day
        targets = [
            # The fork server's descendants are jobs and warm processes: counted as such.
            Target("idle", pid, self._idle_sampler(pid), tree=pid != zygote)
            for pid in idle
        ]
        for record, proc in self.jobs.running_processes():
            if proc.pid is not None:
                targets.append(Target(record.id, proc.pid, self._sampler(record, proc)))
        return targets

    def idle_memory_mb(self) -> float:
        pids = self.processes.idle_pids()
        self._forget_idle_memory(pids)
        return round(sum(self._idle_memory.get(pid, 0.0) for pid in pids), 1)

    def _forget_idle_memory(self, idle: list[int]) -> None:
        """Drop the samples of processes no longer idle (taken by a job, or gone)."""
        for gone in set(self._idle_memory) - set(idle):
            del self._idle_memory[gone]

    def _idle_sampler(self, pid: int) -> Callable[[Usage], None]:
        def on_sample(usage: Usage) -> None:
            self._idle_memory[pid] = usage.rss_bytes / MB

        return on_sample

    def _sampler(self, record: JobRecord, proc: ProcessHandle) -> Callable[[Usage], None]:
        def on_sample(usage: Usage) -> None:
            record.memory_mb = round(usage.rss_bytes / MB, 1)
            record.peak_memory_mb = max(record.peak_memory_mb, record.memory_mb)
            record.cpu_percent = round(usage.cpu_percent, 1)
            limit = self.spec.memory_limit_mb
            if limit and usage.rss_bytes > limit * MB and not proc.being_killed:
                why = (
                    f"memory limit exceeded: {record.memory_mb:.0f} MB in "
                    f"{usage.processes} process(es) > memory_limit_mb={limit}"
                )
                self.jobs.kill(record.id, why, cause=Cause.MEMORY_LIMIT)

        return on_sample

    def _shutdown_timeout(self) -> float:
        return effective_shutdown_timeout(
            self.spec.shutdown_timeout, self.settings.shutdown_timeout
        )


def _job_attributes(job: proto.Job) -> dict[str, str]:
    """The agent participant's attributes from the job: for clients (and a restart's
    recovery) to see which participant it serves and which failed job it replaces."""
    attributes = {}
    if job.participant.identity:
        attributes[PARTICIPANT] = job.participant.identity
    recovered_from, attempt = lineage(job.attributes)
    if recovered_from:
        attributes[RECOVERED_FROM] = recovered_from
        attributes[ATTEMPT] = str(attempt)
    return attributes


def _app_decision(answer: Mapping[str, Any], ours: Acceptance) -> Decision:
    """The app's request function's answer, with lkrun's values where it gave none."""
    if not answer.get("accept"):
        why = answer.get("error") or (
            "rejected by on_request" + (" (terminate)" if answer.get("terminate") else "")
        )
        return Decline("on_request", str(why), terminate=bool(answer.get("terminate")))
    attributes = dict(ours.attributes)
    extra = answer.get("attributes")
    if isinstance(extra, dict):
        attributes.update({str(k): str(v) for k, v in extra.items()})
    return Acceptance(
        identity=str(answer.get("identity") or ours.identity),
        name=str(answer.get("name") or ours.name),
        metadata=str(answer.get("metadata") or ours.metadata),
        attributes=tuple(attributes.items()),
    )
