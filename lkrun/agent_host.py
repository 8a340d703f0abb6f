"""One agent of the manifest at run time: its registration, its offers policy, its jobs."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
from google.protobuf.json_format import MessageToDict
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.credentials import Credentials
from lkrun.job_process import JobProcess, Outcome
from lkrun.jobs import JobBook, JobRecord, JobStatus
from lkrun.manifest import AgentSpec
from lkrun.registration import (
    Acceptance,
    Registration,
    WorkerLoad,
    WorkerSpec,
)

log = logging.getLogger("lkrun.agent")
job_log = logging.getLogger("lkrun.job")

# The server waits 10 s for our answer to be followed by an assignment; after that
# a reserved slot is released.
ASSIGNMENT_WAIT = 15.0
SECRET_ENV = ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")


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


def job_env(spec: AgentSpec, url: str, base: Mapping[str, str], workdir: Path) -> dict[str, str]:
    """The job's environment: the daemon's, minus API credentials, plus the agent's own."""
    env = {k: v for k, v in base.items() if k not in SECRET_ENV}
    env["LIVEKIT_URL"] = url
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(workdir), base.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(spec.env)  # the manifest may pass credentials on purpose
    return env


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
        shutdown_timeout: float,
    ) -> None:
        self.spec = spec
        self.workdir = workdir
        self.credentials = credentials
        self.book = book
        self.shutdown_timeout = shutdown_timeout
        self.accepting = True
        self.registration = Registration(
            label=spec.name,
            spec=worker_spec(spec),
            credentials=credentials,
            handler=self,
            session=session,
        )
        self._reserved: dict[str, float] = {}  # job id -> when we said yes
        self._procs: dict[str, JobProcess] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- WorkerHandler -----------------------------------------------------------------

    def on_availability(self, job: proto.Job) -> Acceptance | None:
        self._expire_reservations()
        room = job.room.name
        if not self.accepting:
            log.info(
                "agent %s: declined job %s in room %r: not accepting", self.spec.name, job.id, room
            )
            return None
        if not self.spec.accepts_room(room):
            log.info(
                "agent %s: declined job %s: room %r matches none of %s",
                self.spec.name,
                job.id,
                room,
                list(self.spec.rooms),
            )
            return None
        if self.job_count() >= self.spec.max_jobs:
            log.info(
                "agent %s: declined job %s in room %r: at max_jobs=%d",
                self.spec.name,
                job.id,
                room,
                self.spec.max_jobs,
            )
            return None
        self._reserved[job.id] = time.monotonic()
        identity = self.spec.format_identity(
            job_id=job.id, room=room, participant=job.participant.identity
        )
        return Acceptance(
            identity=identity,
            name=self.spec.display_name(),
            metadata=self.spec.participant_metadata,
            attributes=tuple(self.spec.participant_attributes.items()),
        )

    def on_assignment(self, assignment: proto.JobAssignment) -> None:
        job = assignment.job
        self._reserved.pop(job.id, None)
        record = JobRecord(
            id=job.id,
            agent=self.spec.name,
            room=job.room.name,
            dispatch_id=job.dispatch_id,
            identity=job.state.participant_identity,
        )
        self.book.add(record)
        task = asyncio.create_task(self._run_job(record, assignment), name=f"job {job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_termination(self, job_id: str) -> None:
        proc = self._procs.get(job_id)
        if proc is None:
            return
        log.info("agent %s: job %s terminated by the server", self.spec.name, job_id)
        self._spawn(self._stop_job(job_id, "terminated by LiveKit"))

    def worker_load(self) -> WorkerLoad:
        count = self.job_count()
        full = not self.accepting or count >= self.spec.max_jobs
        return WorkerLoad(full=full, load=min(1.0, count / self.spec.max_jobs), job_count=count)

    # -- lifecycle -----------------------------------------------------------------------

    def job_count(self) -> int:
        return len(self.book.active(self.spec.name)) + len(self._reserved)

    async def run(self) -> None:
        """Stay registered until cancelled. AuthError propagates to the daemon."""
        await self.registration.run()

    def stop_accepting(self) -> None:
        self.accepting = False
        self.registration.load_changed()

    async def stop_jobs(self, reason: str) -> None:
        """Ask every job to end, kill what will not, and wait for their records to close."""
        for job_id in list(self._procs):
            self._spawn(self._stop_job(job_id, reason))
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def kill_jobs(self, why: str) -> None:
        self.shutdown_timeout = 0
        for proc in list(self._procs.values()):
            self._spawn(proc.kill(why))

    def stop_job(self, job_id: str, reason: str) -> bool:
        if job_id not in self._procs:
            return False
        self._spawn(self._stop_job(job_id, reason))
        return True

    async def _stop_job(self, job_id: str, reason: str) -> None:
        proc = self._procs.get(job_id)
        record = self.book.get(job_id)
        if proc is None or record is None:
            return
        record.status = JobStatus.STOPPING
        record.stop_reason = record.stop_reason or reason
        await proc.stop(reason, self.shutdown_timeout)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_job(self, record: JobRecord, assignment: proto.JobAssignment) -> None:
        adapter = logging.LoggerAdapter(job_log, {"agent": record.agent, "job_id": record.id})
        proc = JobProcess(
            entrypoint=self.spec.entrypoint,
            cwd=self.workdir,
            env=job_env(self.spec, self.credentials.url, os.environ, self.workdir),
            log=adapter,
            on_running=lambda: self._on_running(record),
        )
        self._procs[record.id] = proc
        self.registration.load_changed()
        try:
            await proc.spawn()
            record.pid = proc.pid
            log.info(
                "agent %s: job %s started in room %r (pid %s)",
                record.agent,
                record.id,
                record.room,
                proc.pid,
            )
            proc.start(
                job=MessageToDict(assignment.job),
                url=assignment.url or self.credentials.url,
                token=assignment.token,
                identity=record.identity,
                agent=self.spec.name,
            )
            outcome = await proc.wait()
        except OSError as exc:
            outcome = Outcome(ok=False, error=f"cannot start job process: {exc}")
        finally:
            self._procs.pop(record.id, None)
        self._finish(record, outcome)

    def _on_running(self, record: JobRecord) -> None:
        record.status = JobStatus.RUNNING
        record.started_at = time.time()
        self.registration.update_job(record.id, proto.JS_RUNNING)

    def _finish(self, record: JobRecord, outcome: Outcome) -> None:
        record.exit_code = outcome.exit_code
        if outcome.reason and not record.stop_reason:
            record.stop_reason = outcome.reason
        if outcome.ok:
            self.book.finish(record, JobStatus.SUCCESS)
            self.registration.update_job(record.id, proto.JS_SUCCESS)
            log.info(
                "agent %s: job %s succeeded (%s)",
                record.agent,
                record.id,
                record.stop_reason or "done",
            )
        else:
            self.book.finish(record, JobStatus.FAILED, outcome.error)
            self.registration.update_job(record.id, proto.JS_FAILED, outcome.error)
            log.warning("agent %s: job %s failed: %s", record.agent, record.id, outcome.error)
        self.registration.load_changed()

    def _expire_reservations(self) -> None:
        now = time.monotonic()
        for job_id, when in list(self._reserved.items()):
            if now - when > ASSIGNMENT_WAIT:
                del self._reserved[job_id]
