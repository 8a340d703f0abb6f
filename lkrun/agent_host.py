"""One agent of the manifest at run time: its registration, its offers policy, its jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from google.protobuf.json_format import MessageToDict
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.child.apps import describe
from lkrun.credentials import SECRET_ENV, Credentials
from lkrun.dispatch import AGENT_NAME_ATTRIBUTE
from lkrun.forkserver import ForkServer
from lkrun.job_monitor import MB, Target, Usage
from lkrun.job_process import (
    AppSpec,
    JobProcess,
    Launched,
    Launcher,
    LaunchError,
    Outcome,
    SpawnLauncher,
)
from lkrun.joblogs import JobLogs
from lkrun.jobs import JobBook, JobRecord, JobStatus
from lkrun.load import WorkerLoad, agent_load
from lkrun.logs import agent_logger, job_logger
from lkrun.manifest import AgentSpec
from lkrun.metrics import Metrics
from lkrun.registration import Acceptance, Decision, Decline, Registration, WorkerSpec
from lkrun.request_process import RequestProcess, RequestRefused
from lkrun.warm_pool import WarmPool

log = logging.getLogger("lkrun.agent")
job_log = logging.getLogger("lkrun.job")

# The server waits 10 s for our answer to be followed by an assignment; after that
# a reserved slot is released.
ASSIGNMENT_WAIT = 15.0


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


def job_env(
    spec: AgentSpec, credentials: Credentials, base: Mapping[str, str], workdir: Path
) -> dict[str, str]:
    """The job's environment: the daemon's, minus API credentials unless the agent asks for
    them (``pass_credentials``), plus the agent's own."""
    env = {k: v for k, v in base.items() if k not in SECRET_ENV}
    env["LIVEKIT_URL"] = credentials.url
    if spec.pass_credentials:
        env["LIVEKIT_API_KEY"] = credentials.api_key
        env["LIVEKIT_API_SECRET"] = credentials.api_secret
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(workdir), base.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(spec.env)  # the manifest may pass credentials on purpose
    return env


def format_duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


@dataclass
class HostSettings:
    """Daemon-wide knobs every agent shares."""

    shutdown_timeout: float
    load_threshold: float = 1.0
    cpu: Callable[[], float] = lambda: 0.0
    metrics: Metrics = field(default_factory=Metrics)
    job_logs: JobLogs | None = None  # per-job log files


class AgentHost:
    """Answers offers for one agent and supervises its jobs. Implements WorkerHandler."""

    def __init__(
        self,
        *,
        spec: AgentSpec,
        workdir: Path,
        credentials: Credentials,
        book: JobBook,
        session: aiohttp.ClientSession,
        settings: HostSettings,
    ) -> None:
        self.spec = spec
        self.log = agent_logger(log, spec.name)
        self.workdir = workdir
        self.credentials = credentials
        self.book = book
        self.settings = settings
        self.accepting = True
        self.draining = False
        self.registration = Registration(
            label=spec.name,
            spec=worker_spec(spec),
            credentials=credentials,
            handler=self,
            session=session,
        )
        self._reserved: dict[str, float] = {}  # job id -> when we said yes
        self._accepted: dict[str, Acceptance] = {}  # job id -> what we said yes with
        self._deciding: set[asyncio.Task[None]] = set()  # offers the app's on_request weighs
        self._active: set[str] = set()  # assigned jobs not yet finished
        self._idle_memory: dict[int, float] = {}  # warm process pid -> MB
        self._procs: dict[str, JobProcess] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()  # no job running or reserved
        self._idle.set()
        self.forkserver = self._new_forkserver()
        self.pool = WarmPool(
            label=spec.name,
            factory=self._new_process,
            size=spec.idle_processes,
            timeout=spec.prewarm_timeout,
        )
        self.requests = self._new_request_process()
        self._requests_task: asyncio.Task[None] | None = None
        self._running = False  # run() is on: helpers may start

    # -- WorkerHandler -----------------------------------------------------------------

    def on_availability(self, job: proto.Job) -> Decision | asyncio.Future[Decision]:
        self._expire_reservations()
        room = job.room.name
        if decline := self._decline(room):
            self.log.info("declined job %s: %s", job.id, decline.text)
            return decline
        self._reserved[job.id] = time.time()
        self._idle.clear()
        # If no assignment follows, free the slot even when no further offer arrives.
        asyncio.get_running_loop().call_later(ASSIGNMENT_WAIT + 0.1, self._expire_reservations)
        identity = self.spec.format_identity(
            job_id=job.id, room=room, participant=job.participant.identity
        )
        # As the official worker does: clients (and `lkrun dispatch --wait`) tell agents apart.
        attributes = {AGENT_NAME_ATTRIBUTE: self.spec.registered_name}
        attributes.update(self.spec.participant_attributes)
        ours = Acceptance(
            identity=identity,
            name=self.spec.display_name(),
            metadata=self.spec.participant_metadata,
            attributes=tuple(attributes.items()),
        )
        if self.requests is not None:
            return self._ask_app(job, ours)
        return ours

    def _ask_app(self, job: proto.Job, ours: Acceptance) -> asyncio.Future[Decision]:
        """The app's own request function decides, in a task of ours; the slot is held
        meanwhile. Whoever awaits the answer may give up (its connection dropped): the
        answer is then cancelled and the slot released."""
        answer: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._decide(job, ours, answer), name=f"offer {job.id}")
        self._deciding.add(task)
        task.add_done_callback(self._deciding.discard)
        return answer

    async def _decide(
        self, job: proto.Job, ours: Acceptance, answer: asyncio.Future[Decision]
    ) -> None:
        room = job.room.name
        decision: Decision = Decline("error", f"room {room!r}: no decision was made")
        try:
            assert self.requests is not None
            decision = _app_decision(await self.requests.ask(job), ours)
            if isinstance(decision, Decline):
                decision = dataclasses.replace(decision, text=f"room {room!r}: {decision.text}")
        except RequestRefused as exc:
            decision = Decline("on_request", f"room {room!r}: {exc}")
        finally:
            if not self.accepting:  # drained or removed while the app was deciding
                why = f"room {room!r}: not accepting jobs (draining or removed)"
                decision = Decline("not_accepting", why)
            if isinstance(decision, Decline) or answer.done():  # no job will follow
                self._release(job.id)
        if answer.done():
            return
        if isinstance(decision, Decline):
            self.log.info("declined job %s: %s", job.id, decision.text)
        answer.set_result(decision)

    def _release(self, job_id: str) -> None:
        self._reserved.pop(job_id, None)
        self._accepted.pop(job_id, None)
        self._check_idle()
        self.registration.load_changed()

    def _decline(self, room: str) -> Decline | None:
        if not self.accepting:
            return Decline(
                "not_accepting", f"room {room!r}: not accepting jobs (draining or removed)"
            )
        if not self.spec.accepts_room(room):
            return Decline("rooms", f"room {room!r} matches none of {list(self.spec.rooms)}")
        if self.job_count() >= self.spec.max_jobs:
            return Decline("max_jobs", f"room {room!r}: at max_jobs={self.spec.max_jobs}")
        if (cpu := self.settings.cpu()) >= self.settings.load_threshold:
            return Decline("cpu", f"room {room!r}: CPU {cpu:.0%} is over load_threshold")
        return None

    def on_answered(self, job_id: str, decision: Decision, seconds: float) -> None:
        declined = isinstance(decision, Decline)
        if isinstance(decision, Acceptance) and job_id in self._reserved:
            self._accepted[job_id] = decision
        reason = decision.reason if isinstance(decision, Decline) else ""
        self.settings.metrics.offer_answered(self.spec.name, not declined, seconds, reason)

    def on_registered(self, worker_id: str, again: bool) -> None:
        if again:
            self.settings.metrics.registration_reconnected(self.spec.name)

    def on_assignment(self, assignment: proto.JobAssignment) -> None:
        job = assignment.job
        if job.id in self._active:
            self.log.warning("job %s was assigned again while it runs; ignored", job.id)
            return
        offered_at = self._reserved.pop(job.id, None)
        if offered_at is None and (not self.accepting or self.job_count() >= self.spec.max_jobs):
            # Not an offer we hold a slot for (it expired, or came before a reconnect), and
            # no slot is free: say so at once rather than leave LiveKit waiting.
            why = "assigned without a reserved slot, and the agent is full or draining"
            self.log.warning("job %s refused: %s", job.id, why)
            self.registration.update_job(job.id, proto.JS_FAILED, why)
            return
        record = JobRecord(
            id=job.id,
            agent=self.spec.name,
            room=job.room.name,
            dispatch_id=job.dispatch_id,
            identity=job.state.participant_identity,
            offered_at=offered_at,
            worker_id=self.registration.state.worker_id,
        )
        self.book.add(record)
        self._active.add(job.id)
        try:
            self._claim_process(record)
        except Exception as exc:  # e.g. the job's log file cannot be opened
            self.log.exception("job %s could not be given a process", job.id)
            self._finish(record, Outcome(ok=False, error=f"cannot start job: {describe(exc)}"))
            return
        self._spawn(self._run_job(record, assignment), name=f"job {job.id}")

    def on_termination(self, job_id: str) -> None:
        if self.stop_job(job_id, "terminated by LiveKit"):
            self.log.info("job %s terminated by LiveKit", job_id)

    def worker_load(self) -> WorkerLoad:
        return agent_load(
            jobs=self.job_count(),
            max_jobs=self.spec.max_jobs,
            cpu=self.settings.cpu(),
            load_threshold=self.settings.load_threshold,
            draining=not self.accepting,
        )

    # -- lifecycle -----------------------------------------------------------------------

    def job_count(self) -> int:
        return len(self._active) + len(self._reserved)

    async def run(self) -> None:
        """Stay registered and keep warm processes until cancelled.

        AuthError propagates to the daemon.
        """
        await self._start_forkserver()
        pool = asyncio.create_task(self.pool.run(), name=f"warm pool {self.spec.name}")
        self._running = True
        self._start_requests()
        try:
            await self.registration.run()
        finally:
            self._running = False
            helpers = [pool, *self._deciding]
            if self._requests_task is not None:
                helpers.append(self._requests_task)
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self.forkserver is not None:
                # Jobs were stopped before this (see Daemon); whatever is left goes with it.
                await self.forkserver.close(self._shutdown_timeout())

    def update_spec(self, spec: AgentSpec) -> None:
        """Apply a changed manifest entry that LiveKit does not see (limits, rooms, env...)."""
        old, self.spec = self.spec, spec
        self.registration.load_changed()
        if _loaded_fields(old) != _loaded_fields(spec):
            self._replace_forkserver()
        elif self.forkserver is not None:
            self.forkserver.load_timeout = spec.prewarm_timeout
        if _process_fields(old) != _process_fields(spec):
            self.pool.configure(self._new_process, spec.idle_processes, spec.prewarm_timeout)
        self._sync_requests(restart=_loaded_fields(old) != _loaded_fields(spec))

    def _start_requests(self) -> None:
        if self.requests is not None and self._requests_task is None and self._running:
            name = f"request process {self.spec.name}"
            self._requests_task = asyncio.create_task(self.requests.run(), name=name)

    def _sync_requests(self, *, restart: bool) -> None:
        """Start or stop the request process as the app gained or lost its on_request."""
        wanted = self.spec.app is not None and self.spec.app.on_request
        if wanted and self.requests is None:
            self.requests = self._new_request_process()
            self._start_requests()
        elif not wanted and self.requests is not None:
            self.requests, task, self._requests_task = None, self._requests_task, None
            if task is not None:
                task.cancel()
                self._spawn(_wait_cancelled(task), name=f"stop request process {self.spec.name}")
        elif self.requests is not None:
            self.requests.timeout = self.spec.request_timeout
            if restart:
                self.requests.restart()

    def code_changed(self) -> None:
        """Agent code changed on disk: the fork server and warm processes hold the old code."""
        if self.forkserver is not None or self.pool.idle:
            self.log.info("code changed on disk; reloading the agent's module for new jobs")
            self._replace_forkserver()
            self.pool.recycle()
            if self.requests is not None:
                self.requests.restart()

    def _new_forkserver(self) -> ForkServer | None:
        if self.spec.start_method != "forkserver":
            return None
        return ForkServer(
            label=self.spec.name,
            app=self._app_spec(),
            cwd=self.workdir,
            env=self._job_env(),
            load_timeout=self.spec.prewarm_timeout,
        )

    def _replace_forkserver(self) -> None:
        """New jobs fork from a fresh zygote; the old one lives on until its jobs end."""
        old, self.forkserver = self.forkserver, self._new_forkserver()
        if old is not None:
            old.retire()
            self._spawn(old.close(), name=f"retired fork server {self.spec.name}")
        self._spawn(self._start_forkserver())

    async def _start_forkserver(self) -> None:
        if self.forkserver is None or not self.accepting:
            return
        try:
            await self.forkserver.start()
        except Exception as exc:  # jobs retry; each failure reaches their records
            self.log.error("cannot start the fork server: %s", describe(exc))

    def stop_accepting(self) -> None:
        self.accepting = False
        self.registration.load_changed()
        why = "no longer needed: the agent takes no new jobs (draining or removed)"
        self.pool.configure(self._new_process, 0, self.spec.prewarm_timeout, why=why)

    def drain(self) -> None:
        """Take no new jobs and tell running ones, so they can wrap up."""
        self.draining = True
        self.stop_accepting()
        for proc in self._procs.values():
            proc.drain()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def stop_jobs(self, reason: str) -> None:
        """Ask every job to end, kill what will not, and wait for their records to close."""
        for job_id in list(self._procs):
            self.stop_job(job_id, reason)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def kill_jobs(self, why: str) -> None:
        self.settings.shutdown_timeout = 0
        for proc in list(self._procs.values()):
            self._spawn(proc.kill(why))

    def owns(self, job_id: str) -> bool:
        return job_id in self._procs

    def kill_job(self, job_id: str, *, force: bool) -> str:
        """For `lkrun jobs kill`: ask the job to end (then kill it), or kill it at once."""
        proc = self._procs[job_id]
        if force:
            self._spawn(proc.kill("killed by `lkrun jobs kill --force`", failure=True))
            return "killed"
        self.stop_job(job_id, "stopped by `lkrun jobs kill`")
        return "shutdown requested"

    def stop_job(self, job_id: str, reason: str, *, failure: str = "") -> bool:
        proc = self._procs.get(job_id)
        record = self.book.get(job_id)
        if proc is None or record is None:
            return False
        record.status = JobStatus.STOPPING
        record.stop_reason = record.stop_reason or reason
        self.book.update(record)
        self._spawn(proc.stop(reason, self._shutdown_timeout(), failure=failure))
        return True

    def idle_pids(self) -> list[int]:
        """Processes that serve no job yet: the warm processes and the fork server."""
        pids = [p.pid for p in self.pool.idle if p.pid]
        if self.forkserver is not None and self.forkserver.pid is not None:
            pids.append(self.forkserver.pid)
        return pids

    def monitor_targets(self) -> list[Target]:
        zygote = self.forkserver.pid if self.forkserver is not None else None
        targets = [
            # The fork server's descendants are jobs and warm processes: counted as such.
            Target("idle", pid, self._idle_sampler(pid), tree=pid != zygote)
            for pid in self.idle_pids()
        ]
        for job_id, proc in self._procs.items():
            record = self.book.get(job_id)
            if proc.pid is not None and record is not None and not proc.exited:
                targets.append(Target(job_id, proc.pid, self._sampler(record, proc)))
        return targets

    def idle_memory_mb(self) -> float:
        pids = self.idle_pids()
        for gone in set(self._idle_memory) - set(pids):
            del self._idle_memory[gone]
        return round(sum(self._idle_memory.get(pid, 0.0) for pid in pids), 1)

    def _idle_sampler(self, pid: int) -> Callable[[Usage], None]:
        def on_sample(usage: Usage) -> None:
            self._idle_memory[pid] = usage.rss_bytes / MB

        return on_sample

    def _sampler(self, record: JobRecord, proc: JobProcess) -> Callable[[Usage], None]:
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
                self._spawn(proc.kill(why, failure=True))

        return on_sample

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str | None = None) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _job_env(self) -> dict[str, str]:
        return job_env(self.spec, self.credentials, os.environ, self.workdir)

    def _app_spec(self) -> AppSpec:
        spec = self.spec
        return AppSpec(spec.entrypoint, spec.prewarm, spec.resolved_framework)

    def _shutdown_timeout(self) -> float:
        # The third stop signal sets the daemon's to 0: that wins over the agent's own.
        daemon = self.settings.shutdown_timeout
        return 0.0 if daemon == 0 else (self.spec.shutdown_timeout or daemon)

    def _launcher(self) -> Launcher:
        if self.forkserver is not None:
            return self.forkserver
        return SpawnLauncher(app=self._app_spec(), cwd=self.workdir, env=self._job_env())

    async def _launch(self) -> Launched:
        # Resolved at spawn time, so a process asked for before a reload gets the new code.
        return await self._launcher()()

    async def _launch_requests(self) -> Launched:
        return await self._launcher()("requests")

    def _new_request_process(self) -> RequestProcess | None:
        app = self.spec.app
        if app is None or not app.on_request:
            return None
        return RequestProcess(
            label=self.spec.name,
            factory=lambda: JobProcess(
                launcher=self._launch_requests,
                log=job_logger(job_log, self.spec.name, "on_request"),
            ),
            timeout=self.spec.request_timeout,
            start_timeout=self.spec.prewarm_timeout,
        )

    def _new_process(self) -> JobProcess:
        return JobProcess(
            launcher=self._launch,
            log=job_logger(job_log, self.spec.name, "warm"),
        )

    def _claim_process(self, record: JobRecord) -> JobProcess:
        """A warm process if one is ready, else a cold one (not started yet), bound to this
        job at once: a stop or kill from now on reaches it, whatever state it is in."""
        proc = self.pool.take()
        record.warm = proc is not None
        if proc is None:
            proc = self._new_process()
        bound = proc
        logs = self.settings.job_logs
        proc.bind(
            job_logger(job_log, record.agent, record.id),
            lambda: self._on_running(record, bound),
            sink=logs.writer(record.id).write_line if logs is not None else None,
        )
        self._procs[record.id] = proc
        return proc

    async def _started_process(self, record: JobRecord, proc: JobProcess) -> JobProcess:
        if not record.warm:
            await proc.spawn()
        record.pid = proc.pid
        self.book.update(record)
        self.log.info(
            "job %s in room %r: %s process %s",
            record.id,
            record.room,
            "warm" if record.warm else "cold",
            proc.pid,
        )
        return proc

    async def _run_job(self, record: JobRecord, assignment: proto.JobAssignment) -> None:
        timer: asyncio.TimerHandle | None = None
        try:
            proc = await self._started_process(record, self._procs[record.id])
            ready = await proc.wait_ready(self.spec.prewarm_timeout)
            if ready and not proc.stop_requested:  # a stop before the start: no job at all
                if self.draining:
                    proc.drain()
                proc.start(**self._start_message(record, assignment))
                timer = self._arm_timeout(record)
            self.pool.replenish()
            outcome = await proc.wait()
        except LaunchError as exc:
            outcome = Outcome(ok=False, error=str(exc))
        except OSError as exc:
            outcome = Outcome(ok=False, error=f"cannot start job process: {exc}")
        except Exception as exc:  # a bug or a bad value must fail the job, not hold its slot
            self.log.exception("job %s could not be started", record.id)
            outcome = Outcome(ok=False, error=f"cannot start job process: {describe(exc)}")
            if (started := self._procs.get(record.id)) is not None:
                await started.kill(outcome.error)
        finally:
            if timer is not None:
                timer.cancel()
            self._procs.pop(record.id, None)
            self._accepted.pop(record.id, None)  # when it never got as far as its start
        self._finish(record, outcome)

    def _start_message(self, record: JobRecord, assignment: proto.JobAssignment) -> dict[str, Any]:
        answer = self._accepted.pop(record.id, None)
        return {
            "job": MessageToDict(assignment.job),
            "url": assignment.url or self.credentials.url,
            "token": assignment.token,
            "identity": record.identity,
            "agent": self.spec.name,
            "shutdown_timeout": self._shutdown_timeout(),
            # For a livekit-agents job's RunningJobInfo: how it was accepted, and when.
            "name": answer.name if answer else self.spec.display_name(),
            "metadata": answer.metadata if answer else self.spec.participant_metadata,
            "attributes": dict(answer.attributes) if answer else {},
            "worker_id": self.registration.state.worker_id,
            "received_at": record.offered_at or 0.0,
            "assigned_at": record.accepted_at,
        }

    def _arm_timeout(self, record: JobRecord) -> asyncio.TimerHandle | None:
        limit = self.spec.job_timeout
        if not limit:
            return None
        why = f"job exceeded job_timeout={format_duration(limit)}"
        return asyncio.get_running_loop().call_later(
            limit, lambda: self.stop_job(record.id, why, failure=why)
        )

    def _on_running(self, record: JobRecord, proc: JobProcess) -> None:
        record.status = JobStatus.RUNNING
        record.started_at = proc.running_at or time.time()
        self.book.update(record)
        self.registration.update_job(record.id, proto.JS_RUNNING)
        metrics = self.settings.metrics
        metrics.job_started(record.agent, record.warm)
        if record.offered_at is not None:
            metrics.offer_to_entrypoint(
                record.agent, record.warm, max(0.0, record.started_at - record.offered_at)
            )

    def _finish(self, record: JobRecord, outcome: Outcome) -> None:
        self._active.discard(record.id)
        record.exit_code = outcome.exit_code
        if outcome.reason and not record.stop_reason:
            record.stop_reason = outcome.reason
        if outcome.ok:
            self.book.finish(record, JobStatus.SUCCESS)
            self.registration.update_job(record.id, proto.JS_SUCCESS)
            self.log.info(
                "job %s succeeded (%s)",
                record.id,
                record.stop_reason or "done",
            )
        else:
            self.book.finish(record, JobStatus.FAILED, outcome.error)
            self.registration.update_job(record.id, proto.JS_FAILED, outcome.error)
            self.log.warning("job %s failed: %s", record.id, outcome.error)
        self.settings.metrics.job_ended(record.agent, record.status.value)
        if self.settings.job_logs is not None:
            self.settings.job_logs.writer(record.id).close()
        self._check_idle()
        self.registration.load_changed()

    def _check_idle(self) -> None:
        if not self._active and not self._reserved:
            self._idle.set()

    def _expire_reservations(self) -> None:
        now = time.time()
        for job_id, when in list(self._reserved.items()):
            if now - when > ASSIGNMENT_WAIT:
                del self._reserved[job_id]
                self._accepted.pop(job_id, None)
        self._check_idle()


def _loaded_fields(spec: AgentSpec) -> tuple[Any, ...]:
    """What a fork server was started with: a change needs a new one."""
    return (
        spec.entrypoint,
        spec.prewarm,
        spec.env,
        spec.pass_credentials,
        spec.start_method,
        spec.resolved_framework,
    )


def _process_fields(spec: AgentSpec) -> tuple[Any, ...]:
    """What a warm process was started with: a change makes the idle ones stale."""
    return (*_loaded_fields(spec), spec.idle_processes, spec.prewarm_timeout)


async def _wait_cancelled(task: asyncio.Task[None]) -> None:
    await asyncio.gather(task, return_exceptions=True)


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
