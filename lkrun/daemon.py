"""The daemon: one AgentHost per manifest agent, the control API, health, reload, drain."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from lkrun import __version__, interpreter, memory_map, paths, reaper
from lkrun.agent_host import AgentHost, HostSettings
from lkrun.api.control import AgentStatus, ControlServer, DaemonStatus
from lkrun.api.health import HealthServer
from lkrun.api.metrics import AgentSnapshot, Metrics, metrics_handler
from lkrun.credentials import Credentials
from lkrun.dashboard.guard import Access, DashboardError, resolve_token
from lkrun.dashboard.samples import Samples
from lkrun.dashboard.server import Dashboard
from lkrun.entrypoints import check_entrypoints
from lkrun.jobs.book import JobBook
from lkrun.jobs.history import History
from lkrun.jobs.statelock import StateDirBusy, StateLock
from lkrun.jobs.store import JobQuery, StoreError
from lkrun.load import CpuMonitor, CpuPressure
from lkrun.logs import loop_error
from lkrun.lost_jobs import READY_TIMEOUT, lost_jobs, recover_lost, summary
from lkrun.manifest import (
    AgentSpec,
    AppInfo,
    DaemonSettings,
    Manifest,
    ManifestError,
    format_duration,
    load_manifest,
    parse_host_port,
)
from lkrun.reaper import OrphanReaper
from lkrun.recovery import FailedJob, Recoverer, RecoveryPolicy
from lkrun.registration import AuthError
from lkrun.shared import pdeathsig
from lkrun.shared.entrypoint import LIVEKIT_AGENTS
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe
from lkrun.supervision.inference import InferenceProcesses, socket_dir_for
from lkrun.supervision.job_monitor import JobMonitor, Target

log = logging.getLogger("lkrun.daemon")

FLUSH_TIMEOUT = 2.0  # time given to final job status updates before the sockets close
HANDOVER_TIMEOUT = 120.0  # longest an old registration waits for its replacement to be ready
WATCH_RETRY = 1.0  # after the manifest watch failed; doubles up to WATCH_RETRY_CAP
WATCH_RETRY_CAP = 60.0

Changes = set[tuple[Any, str]]  # watchfiles' (change, path) pairs


@dataclass(frozen=True)
class DaemonConfig:
    manifest: Manifest
    credentials: Credentials
    control_socket: Path
    # The manifest's [daemon] table, with what the command line overrides.
    settings: DaemonSettings
    reload: bool = True
    # Processes of this process started before the daemon, which it waits for itself (the
    # dev server): never reaped as orphans.
    own_children: tuple[int, ...] = ()


def _background_failed(task: asyncio.Future[Any], exc: BaseException) -> None:
    name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
    log.error("%s failed", name, exc_info=exc)


class FatalError(Exception):
    """The daemon cannot go on (bad credentials, control socket taken, ...)."""


class Daemon:
    def __init__(self, config: DaemonConfig, *, state_lock: StateLock | None = None) -> None:
        """state_lock: the state directory's lock, when the caller took it already (the CLI
        does, before it starts a dev server); else serve() takes it."""
        self.config = config
        self._state_lock = state_lock
        self.manifest = config.manifest
        self.metrics = Metrics()
        self.name = config.settings.name or socket.gethostname()
        self.metrics.set_daemon(self.name, __version__)
        # One daemon per state directory (StateLock): its history is its own.
        self.state_dir = state_dir_of(config.settings)
        interpreter.configure(self.state_dir)  # as `lkrun serve` did before its check
        self.history = History(
            database=config.settings.database or self.state_dir / "jobs.db",
            log_dir=config.settings.log_dir or self.state_dir / "logs",
            retention=config.settings.history_retention,
            log_max_bytes=config.settings.job_log_max_mb * 1024 * 1024,
        )
        self.book = JobBook(on_change=self.history.record)
        self.hosts: dict[str, AgentHost] = {}
        self.retiring: set[AgentHost] = set()  # removed or re-registered, finishing their jobs
        self.started_at = time.time()
        self.phase = "starting"  # starting | serving | draining | stopping
        self.cpu = CpuMonitor()
        self.reloads = 0
        self.health: HealthServer | None = None
        # `lkrun jobs show --memory`: smaps of job process trees, read off the event loop.
        self._memory_reads = memory_map.BoundedReads()
        # The dashboard's charts: an hour of samples of the agents' jobs and load.
        self.samples = Samples()
        self.dashboard_access: Access | None = None  # once the dashboard is mounted
        # The framework's shared inference processes, one per agent interpreter.
        self.inference = InferenceProcesses(
            workdir=self.manifest.workdir,
            metrics=self.metrics,
            env_for=self._inference_env,
            socket_dir=socket_dir_for(self.state_dir),
        )
        # Failed jobs' redispatches (lkrun.recovery): what was done goes into their history.
        self.recovery = Recoverer(
            config.credentials, metrics=self.metrics, note=self._note_recovery
        )
        self._settings = HostSettings(
            shutdown_timeout=config.settings.shutdown_timeout,
            cpu=CpuPressure(
                threshold=config.settings.load_threshold,
                overload_after=config.settings.overload_after,
            ),
            metrics=self.metrics,
            job_logs=self.history.logs,
            daemon_name=self.name,
            inference=self.inference,
            recovery=self.recovery,
        )
        self._runs: dict[AgentHost, asyncio.Task[None]] = {}
        self._tasks = BackgroundTasks(on_error=_background_failed)
        self._session: aiohttp.ClientSession | None = None
        self._stop = asyncio.Event()  # first signal: drain
        self._stop_now = asyncio.Event()  # second signal: skip the drain
        self._fatal: asyncio.Future[FatalError] | None = None
        self._signals = 0
        self._checks = 0  # import checks under way (their Popen waits for its own child)
        self.reaper = OrphanReaper(self._waited_for, paused=lambda: self._checks > 0)

    # -- the view the control API and health read ----------------------------------------

    def all_hosts(self) -> list[AgentHost]:
        return [*self.hosts.values(), *self.retiring]

    def status(self) -> DaemonStatus:
        ready, reason = self.readiness()
        return {
            "ready": ready,
            "not_ready_reason": reason,
            "pid": os.getpid(),
            "name": self.name,
            "version": __version__,
            "manifest": str(self.manifest.path),
            "url": self.config.credentials.url,
            "uptime": round(time.time() - self.started_at, 3),
            "phase": self.phase,
            "stopping": self.phase in ("draining", "stopping"),
            "cpu": round(self.cpu.value, 3),
            "cpu_high_for": round(self._settings.cpu.high_for(), 1),
            "reload": self.config.reload,
            "reloads": self.reloads,
            "http_port": self.health.port if self.health else None,
            "agents": [self._agent_status(h) for h in self.all_hosts()],
            "inference": self.inference.status(),
        }

    def _agent_status(self, host: AgentHost) -> AgentStatus:
        state = host.registration.state
        load = host.worker_load()
        app = host.spec.app
        return {
            "agent": host.spec.name,
            "dispatch": host.spec.dispatch,
            "registered_name": host.spec.registered_name,
            "rooms": list(host.spec.rooms),
            "retiring": host in self.retiring,
            "connected": state.connected,
            "worker_id": state.worker_id,
            "server_version": state.server_version,
            "reconnects": state.reconnects,
            "last_error": state.last_error,
            "jobs": load.job_count,
            "max_jobs": host.spec.max_jobs,
            "full": load.full,
            "full_reason": load.reason,
            "load": round(load.load, 3),
            "idle_processes": len(host.pool.idle),
            "idle_memory_mb": host.idle_memory_mb(),
            "warm_error": host.pool.last_error,
            "warm_failures": host.pool.failures,
            "start_method": host.spec.start_method,
            "app": host.spec.app.summary() if host.spec.app is not None else "",
            "framework": host.spec.resolved_framework,
            "framework_version": _framework_version(app),
            # A command agent runs its own program: no Python interpreter of ours.
            "python": "" if host.spec.command else host.spec.interpreter,
            "python_version": app.python_version if app is not None else "",
            "livekit_version": app.livekit_version if app is not None else "",
            "request_process_ready": host.requests.ready if host.requests else None,
            "request_process_error": host.requests.last_error if host.requests else "",
            "fork_server_pid": host.forkserver.pid if host.forkserver is not None else None,
            "fork_server_error": host.forkserver.error if host.forkserver is not None else "",
        }

    def live_jobs(self) -> dict[str, dict[str, Any]]:
        """Jobs this daemon runs now, as the control API shows them."""
        return {
            r.id: {**r.to_dict(), "daemon_pid": os.getpid(), "daemon": self.name}
            for r in self.book.active()
        }

    async def jobs(self, query: JobQuery | None) -> list[dict[str, Any]]:
        """Running jobs (no query), or a search of the history."""
        live = self.live_jobs()
        if query is None:
            return sorted(live.values(), key=lambda j: j["accepted_at"], reverse=True)
        # This daemon's history holds only its own jobs.
        return [{**j, "daemon": self.name} for j in await self.history.query(query, live)]

    async def job(self, job_id: str) -> dict[str, Any] | None:
        found = await self.history.get(job_id, self.live_jobs().get(job_id))
        return {**found, "daemon": self.name} if found is not None else None

    async def job_chain(self, job_id: str) -> list[dict[str, Any]]:
        """The attempts at the job's call, as this daemon's history has them (a replacement
        another daemon took is in that daemon's history), first attempt first."""
        fields = ("id", "attempt", "recovered_from", "status", "cause", "error", "recovery")
        rows = await self.history.chain(job_id)
        return [{key: row.get(key) for key in fields} for row in rows]

    def job_log_tail(self, job_id: str, lines: int) -> list[str]:
        return self.history.logs.tail(job_id, lines)

    def follow_job_log(self, job_id: str, lines: int) -> AsyncIterator[str]:
        def ended() -> bool:
            record = self.book.get(job_id)
            return record is None or record.status.ended

        return self.history.logs.follow(job_id, from_lines=lines, until=ended)

    async def job_memory(self, job_id: str) -> dict[str, Any] | None:
        """Where a running job's memory goes (lkrun.memory_map: its process tree by mapping
        kind, its threads by name), read from the pid this daemon started; None when it runs
        no process for that job (unknown, not started yet, or ended)."""
        pid = self._job_pid(job_id)
        if pid is None:
            return None
        try:
            data = await self._memory_reads.read(pid)
        except memory_map.Unreadable:
            return None  # it ended before the read
        if self._job_pid(job_id) != pid:
            return None  # it ended during the read: that pid may be another process's now
        return {"job_id": job_id, **data}

    def _job_pid(self, job_id: str) -> int | None:
        for host in self.all_hosts():
            for record, process in host.jobs.running_processes():
                if record.id == job_id:
                    return process.pid
        return None

    def kill_job(self, job_id: str, *, force: bool, by: str | None = None) -> str | None:
        """Stop a running job; None if this daemon does not run it."""
        for host in self.all_hosts():
            if host.owns(job_id):
                return host.kill_job(job_id, force=force, by=by)
        return None

    def drain(self) -> str:
        """What the first SIGTERM does (the control API's and the dashboard's drain): no new
        jobs, the running ones get drain_timeout, then the daemon exits."""
        if self.phase == "serving":
            log.info("drain requested through the control API")
            self._stop.set()
        return "draining" if self.phase == "serving" else self.phase

    def readiness(self) -> tuple[bool, str]:
        if self.phase != "serving":
            return False, self.phase
        down = [name for name, h in self.hosts.items() if not h.registration.state.connected]
        if down:
            return False, f"not registered with LiveKit: {', '.join(down)}"
        # The same readiness as each agent's worker status (FULL, "starting"): see AgentHost.
        waiting = [f"{name} ({why})" for name, h in self.hosts.items() if (why := h.not_ready())]
        if waiting:
            return False, "; ".join(waiting)
        return True, ""

    def _snapshot(self) -> list[AgentSnapshot]:
        """Per agent name; a re-registered agent's retiring registration adds its jobs."""
        by_name: dict[str, AgentSnapshot] = {}
        for host in self.all_hosts():
            name = host.spec.name
            load = host.worker_load()
            memory = sum(r.memory_mb for r in self.book.active(name) if host.owns(r.id))
            snap = AgentSnapshot(
                agent=name,
                up=host.registration.state.connected,
                jobs_running=load.job_count,
                max_jobs=host.spec.max_jobs,
                idle_processes=len(host.pool.idle),
                load=load.load,
                job_memory_bytes=int(memory * 1024 * 1024),
            )
            if (current := by_name.get(name)) is not None:  # the current host came first
                snap = dataclasses.replace(
                    current,
                    jobs_running=current.jobs_running + snap.jobs_running,
                    job_memory_bytes=current.job_memory_bytes + snap.job_memory_bytes,
                )
            by_name[name] = snap
        return list(by_name.values())

    # -- running ---------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run until stopped. Raises FatalError when the daemon cannot go on."""
        # Before anything is read, written or bound: a refused daemon touches nothing.
        lock = self._state_lock or lock_state_dir(self.state_dir)
        try:
            await self._serve()
        finally:
            lock.release()

    async def _serve(self) -> None:
        self._fatal = asyncio.get_running_loop().create_future()
        self._install_signal_handlers()
        if not pdeathsig.make_undumpable():
            log.debug("cannot make the daemon non-dumpable; jobs could read its environment")
        control = ControlServer(self.config.control_socket, self)
        async with aiohttp.ClientSession() as session:
            self._session = session
            try:
                await self._start_services(control)
                for spec in self.manifest.agents.values():
                    self._add_host(spec)
                self.phase = "serving"
                if lost := self.history.store.lost:
                    self._tasks.spawn(self._recover_lost(lost), "restart recovery")
                log.info(
                    "lkrun %s serving %d agent(s) from %s; control socket %s",
                    __version__,
                    len(self.hosts),
                    self.manifest.path,
                    self.config.control_socket,
                )
                if await self._until_stop_or_fatal():
                    await self._drain()
            finally:
                await self._shutdown()
                await control.stop()
                if self.health is not None:
                    await self.health.stop()
                await asyncio.to_thread(self.history.close)
        if self._fatal.done():
            raise self._fatal.result()

    async def _start_services(self, control: ControlServer) -> None:
        self.inference.clean_stale()  # what a killed daemon with this state dir left
        try:
            lost = await asyncio.to_thread(self.history.open)
        except StoreError as exc:
            raise FatalError(str(exc)) from exc
        if lost:
            log.warning("%d job(s) were running when the previous daemon died: marked lost", lost)
        self._tasks.spawn(self.history.prune_forever(), "history pruning")
        await control.start()
        if self.config.settings.http_addr:
            host, port = parse_host_port(self.config.settings.http_addr)
            self.health = HealthServer(host, port, ready=self.readiness)
            self.health.add_route("/metrics", metrics_handler(self.metrics, self._snapshot))
            dashboard = self._mount_dashboard(self.health) if self.config.settings.dashboard else ""
            await self.health.start()
            log.info(
                "health endpoint on http://%s:%d/healthz, /readyz and /metrics%s",
                host,
                self.health.port,
                dashboard,
            )
            if dashboard:
                self._tasks.spawn(self.samples.run(self.status), "dashboard samples")
        self._start_reaper()
        monitor = JobMonitor(self._monitor_targets)
        self._tasks.spawn(self.cpu.run(self._on_cpu_sample), "cpu monitor")
        self._tasks.spawn(monitor.run(), "job monitor")
        if self.config.reload:
            self._tasks.spawn(self._watch_manifest(), "manifest watcher")

    def _mount_dashboard(self, health: HealthServer) -> str:
        """The web dashboard's routes (lkrun.dashboard) on the health server; what the start
        line says of it."""
        try:
            token = resolve_token(self.config.settings.dashboard_token, os.environ)
        except DashboardError as exc:
            raise FatalError(str(exc)) from None
        access = self.dashboard_access = Access(health.host, token)
        for method, path, handler in Dashboard(self, self.samples, access).routes():
            health.add_route(path, handler, method)
        if access.disabled:
            log.warning("%s", access.disabled_reason())
            return "; dashboard disabled (403)"
        return "; dashboard on /" + (" (token required)" if token else "")

    def _start_reaper(self) -> None:
        """Adopt the orphans of jobs, fork servers and import checks, and reap them: as a
        container's PID 1 the daemon gets them anyway, and nobody else would reap them."""
        if not reaper.become_subreaper() and os.getpid() != 1:
            log.debug("not a child subreaper (not Linux?): orphans go to init")
            return
        self._tasks.spawn(self.reaper.run(), "orphan reaper")

    def _waited_for(self) -> set[int]:
        """Children whose exit statuses the daemon's own code waits for."""
        pids = {t.pid for t in self._monitor_targets()}
        pids.update(self.config.own_children)
        pids.update(self.inference.pids())
        return pids

    async def _until_stop_or_fatal(self) -> bool:
        """True when a stop was requested; False when something fatal happened."""
        assert self._fatal is not None
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([stop, self._fatal], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        return not self._fatal.done()

    def _add_host(self, spec: AgentSpec) -> AgentHost:
        assert self._session is not None
        host = AgentHost(
            spec=spec,
            workdir=self.manifest.workdir,
            credentials=self.config.credentials,
            book=self.book,
            session=self._session,
            settings=self._settings,
        )
        self.hosts[spec.name] = host
        task = asyncio.create_task(host.run(), name=f"agent {spec.name}")
        task.add_done_callback(self._registration_ended)
        self._runs[host] = task
        return host

    async def _recover_lost(self, ids: list[str]) -> None:
        """The calls of the jobs the previous daemon died with get their agents back, each
        agent's once it can take jobs (lkrun.lost_jobs); the policy is the manifest's now."""
        rows = await asyncio.to_thread(lambda: [self.history.store.get(i) for i in ids])
        jobs = lost_jobs(row for row in rows if row is not None)
        log.info("restart recovery: %d lost job(s), each once its agent can take jobs", len(jobs))
        outcomes = await recover_lost(
            jobs, self.recovery, policy_for=self._lost_policy, ready_for=self._agent_ready
        )
        log.info("restart recovery: %s", summary(outcomes))

    def _lost_policy(self, failed: FailedJob) -> RecoveryPolicy | None:
        host = self.hosts.get(failed.agent)
        return RecoveryPolicy.of(host.spec) if host is not None else None

    async def _agent_ready(self, agent: str) -> bool:
        """Whether the agent can take a job (registered, processes ready) within
        READY_TIMEOUT; a dispatch before that would find no worker and be dropped."""
        host = self.hosts.get(agent)
        if host is None:
            return False
        try:
            await asyncio.wait_for(host.wait_ready(), READY_TIMEOUT)
        except asyncio.TimeoutError:
            return False
        return True

    def _registration_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._fatal is None or self._fatal.done():
            return
        exc = task.exception()
        if isinstance(exc, AuthError):
            self._fatal.set_result(FatalError(str(exc)))
        elif exc is not None:
            self._fatal.set_result(FatalError(f"{task.get_name()} stopped: {exc!r}"))

    def _retire(self, host: AgentHost, why: str) -> None:
        """Stop offering jobs to this registration; close it once its jobs are done."""
        host.log.info(
            "%s; its %d running job(s) will finish first",
            why,
            host.job_count(),
        )
        host.stop_accepting()
        self.retiring.add(host)

        async def close_when_idle() -> None:
            await host.wait_idle()
            await host.registration.flush(FLUSH_TIMEOUT)
            if run := self._runs.pop(host, None):
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
            self.retiring.discard(host)
            host.log.info("old registration closed")

        self._tasks.spawn(close_when_idle(), f"retire {host.spec.name}")

    def _hand_over(self, old: AgentHost, new: AgentHost) -> None:
        """Re-register make-before-break: the old registration keeps taking jobs until the
        new one can start them at its normal speed (or HANDOVER_TIMEOUT), since LiveKit
        drops a dispatch that finds no available worker, and a new registration is FULL
        ("starting") while its code loads."""
        old.log.info("settings LiveKit sees changed; re-registering")
        self.retiring.add(old)  # listed and drained with the others meanwhile

        async def hand_over() -> None:
            try:
                await asyncio.wait_for(new.wait_ready(), HANDOVER_TIMEOUT)
            except asyncio.TimeoutError:
                new.log.warning(
                    "not ready after %s: closing the old registration anyway",
                    format_duration(HANDOVER_TIMEOUT),
                )
            if self.phase == "serving":  # else the drain or the stop has it
                self._retire(old, "the new registration is ready")

        self._tasks.spawn(hand_over(), f"hand over {new.spec.name}")

    async def _drain(self) -> None:
        self.phase = "draining"
        hosts = self.all_hosts()
        running = sum(h.job_count() for h in hosts)
        log.info(
            "draining: no new jobs; waiting up to %s for %d running job(s) to end",
            format_duration(self.config.settings.drain_timeout),
            running,
        )
        for host in hosts:
            host.drain()

        async def all_idle() -> None:
            for host in hosts:
                await host.wait_idle()

        idle = asyncio.create_task(all_idle())
        now = asyncio.create_task(self._stop_now.wait())
        try:
            await asyncio.wait(
                {idle, now},
                timeout=self.config.settings.drain_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in (idle, now):
                task.cancel()
            await asyncio.gather(idle, now, return_exceptions=True)
        if sum(h.job_count() for h in hosts):
            log.info("drain over with jobs still running: asking them to shut down")

    async def _shutdown(self) -> None:
        self.phase = "stopping"
        hosts = self.all_hosts()
        for host in hosts:
            host.stop_accepting()
        await asyncio.gather(*(h.stop_jobs("daemon shutting down") for h in hosts))
        await asyncio.gather(*(h.registration.flush(FLUSH_TIMEOUT) for h in hosts))
        runs = list(self._runs.values())
        for task in runs:
            task.cancel()
        # Redispatches under way finish (each is bounded): the calls they serve go on.
        await asyncio.gather(
            *runs, self._tasks.close(), self.recovery.close(), return_exceptions=True
        )
        await self.inference.close()  # after every agent: their jobs used it to the end

    def _note_recovery(self, job_id: str, columns: dict[str, str]) -> None:
        """What recovery did about an ended job, in its history row (``recovery``,
        ``recovery_skip``)."""
        self.history.store.upsert({"id": job_id, **columns})

    def _on_cpu_sample(self, value: float) -> None:
        """Each agent's status goes out when it changes, not at the next periodic refresh:
        an agent back from FULL gets offers again at once."""
        self._settings.cpu.observe(value)
        for host in self.all_hosts():
            host.registration.load_changed()

    def _inference_env(
        self, python: str, env: dict[str, str], agent_env: Mapping[str, str]
    ) -> None:
        """An inference process on an agent's own interpreter: lkrun's child side first on
        its path, the daemon's own path left out (as for that agent's jobs)."""
        interpreter.own_python_env(env, workdir=self.manifest.workdir, agent_env=agent_env)

    def _monitor_targets(self) -> list[Target]:
        return [t for host in self.all_hosts() for t in host.monitor_targets()]

    # -- hot reload --------------------------------------------------------------------------

    async def _watch_manifest(
        self,
        watch: Callable[[Path, Callable[[Any, str], bool]], AsyncIterator[Changes]] | None = None,
        *,
        retry: float = WATCH_RETRY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Reload on manifest edits; replace warm processes when Python code changes.

        An error (in the watch itself, or in applying one change) is logged and the watch
        goes on, after a backoff when the watch failed: hot reload must not turn itself
        off silently. `watch` and `sleep` are for tests."""
        path = self.manifest.path.resolve()
        watch = watch or _watchfiles
        failures = 0
        while True:
            problem: Exception
            try:
                # Watch the directory: editors replace files by renaming, which ends a file
                # watch.
                relevant = _relevant_to(path, self._command_files)
                async for changes in watch(path.parent, relevant):
                    failures = 0
                    await self._on_changes(path, changes)
                problem = RuntimeError("the file watch ended")
            except Exception as exc:
                problem = exc
            failures += 1
            delay = min(WATCH_RETRY_CAP, retry * 2 ** (failures - 1))
            log.error(
                "watching the manifest failed (%d in a row); watching again in %.1fs: %s",
                failures,
                delay,
                describe(problem),
                extra=loop_error("manifest watcher", problem, failures, delay),
            )
            await sleep(delay)

    async def _on_changes(self, path: Path, changes: Changes) -> None:
        """One batch of file changes; its errors are logged here, the watch goes on."""
        if self.phase != "serving":
            return
        manifest_changed = any(Path(changed) == path for _, changed in changes)
        code_changed = any(changed.endswith(".py") for _, changed in changes)
        try:
            if manifest_changed:
                await self.reload()
            elif code_changed and self._hosts_apps():
                await self._reread_apps()
            # The check above takes seconds: a drain may have begun meanwhile.
            if self.phase != "serving":
                return
            for host in self._changed_code(path.parent, changes):
                host.code_changed()
        except Exception as exc:
            log.error(
                "applying a change to %s failed; the watch goes on: %s",
                path.parent,
                describe(exc),
                exc_info=exc,
                extra=loop_error("manifest watcher", exc, 1, 0.0),
            )

    def _changed_code(self, workdir: Path, changes: Changes) -> list[AgentHost]:
        """The agents whose fork server and warm processes hold code that changed: a Python
        agent at any Python file's change, a command agent only when a file its command
        names changed (its program is its own; the agents' Python files are not)."""
        python = any(changed.endswith(".py") for _, changed in changes)
        files = {Path(changed).resolve() for _, changed in changes}
        return [
            host
            for host in self.hosts.values()
            if (files & command_files(host.spec.command, workdir) if host.spec.command else python)
        ]

    def _command_files(self) -> set[Path]:
        """The files command agents' commands name, watched whatever their kind."""
        workdir = self.manifest.path.resolve().parent
        return {
            f for host in self.hosts.values() for f in command_files(host.spec.command, workdir)
        }

    def _hosts_apps(self) -> bool:
        return any(h.spec.resolved_framework == LIVEKIT_AGENTS for h in self.hosts.values())

    async def _check_manifest(self) -> Manifest:
        """Load and import-check the manifest (a subprocess, in a thread). Orphans are not
        reaped meanwhile: the check's own child may be a zombie its Popen has yet to wait
        for."""
        self._checks += 1
        try:
            return await asyncio.to_thread(_load_checked, self.manifest.path)
        finally:
            self._checks -= 1

    async def _reread_apps(self) -> None:
        """A livekit-agents app carries settings in its code: check it again and apply them."""
        try:
            manifest = await self._check_manifest()
        except ManifestError as exc:
            log.error("agent code changed but does not load; new jobs will fail: %s", exc)
            return
        if self._stopped_meanwhile():
            return
        self._apply(manifest)
        self.manifest = manifest

    async def reload(self) -> bool:
        """Re-read the manifest and reconcile; an invalid one is reported and ignored."""
        try:
            manifest = await self._check_manifest()
        except ManifestError as exc:
            log.error("manifest change rejected, keeping the running configuration: %s", exc)
            return False
        if self._stopped_meanwhile():
            return False
        self._apply(manifest)
        self._apply_settings(self.manifest, manifest)
        self.manifest = manifest
        self.reloads += 1
        return True

    def _apply_settings(self, old: Manifest, new: Manifest) -> None:
        """``[daemon]`` and ``[livekit]`` are read at start. Of their edits, the dashboard's
        token applies at once (a new token signs everyone out); the others are named in a
        warning saying they wait for a restart (names only: values may be secrets)."""
        waiting = [f"[livekit] {name}" for name in _changed_fields(old.livekit, new.livekit)]
        for name in _changed_fields(old.daemon, new.daemon):
            if name == "dashboard_token" and self.dashboard_access is not None:
                self._apply_dashboard_token(new.daemon.dashboard_token)
            else:
                waiting.append(f"[daemon] {name}")
        if waiting:
            log.warning(
                "manifest: %s changed; not applied until the daemon restarts",
                ", ".join(waiting),
                extra={"fields": {"restart_needed": waiting}},
            )

    def _apply_dashboard_token(self, manifest_token: str) -> None:
        access = self.dashboard_access
        assert access is not None
        try:
            token = resolve_token(manifest_token, os.environ)
        except DashboardError as exc:  # the environment's, checked at start: not expected
            log.error("dashboard token not changed: %s", exc)
            return
        access.token = token
        if access.disabled:
            log.warning("dashboard token changed: %s", access.disabled_reason())
        elif access.open:
            log.info("dashboard token removed: the loopback dashboard is open")
        else:
            log.info("dashboard token changed: every dashboard session is signed out")

    def _stopped_meanwhile(self) -> bool:
        """Whether a drain or a stop began during the import check (it takes seconds): then
        nothing is applied, or an agent could register, or a warm pool regrow, while the
        daemon drains."""
        if self.phase == "serving":
            return False
        log.info("the daemon is %s: the changed configuration is not applied", self.phase)
        return True

    def _apply(self, manifest: Manifest) -> None:
        for name in list(self.hosts):
            if name not in manifest.agents:
                self._retire(self.hosts.pop(name), "removed from the manifest")
        for name, spec in manifest.agents.items():
            host = self.hosts.get(name)
            if host is None:
                self._add_host(spec).log.info("added to the manifest; registering")
            elif host.spec == spec:
                continue
            elif host.spec.registration_key() != spec.registration_key():
                self._hand_over(self.hosts.pop(name), self._add_host(spec))
            else:
                changed = ", ".join(_changed_fields(host.spec, spec))
                host.log.info("changes applied in place: %s", changed)
                host.update_spec(spec)

    # -- signals -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("received %s: draining (again to stop jobs now)", sig.name)
            self._stop.set()
        elif self._signals == 2:
            log.warning("received %s again: asking jobs to shut down now (again to kill)", sig.name)
            self._stop_now.set()
        else:
            log.warning("received %s a third time: killing jobs", sig.name)
            for host in self.all_hosts():
                host.kill_jobs("daemon received a third stop signal")


def _framework_version(app: AppInfo | None) -> str:
    """livekit-agents' version as the import check found it, for that framework's apps."""
    return app.version if app is not None and app.framework == LIVEKIT_AGENTS else ""


def state_dir_of(settings: DaemonSettings) -> Path:
    return settings.state_dir or paths.state_dir()


def lock_state_dir(directory: Path) -> StateLock:
    """The state directory's lock; FatalError (one line) if another daemon holds it."""
    try:
        return StateLock.acquire(directory)
    except StateDirBusy as exc:
        raise FatalError(str(exc)) from None
    except OSError as exc:
        raise FatalError(f"cannot lock the state directory {directory}: {exc}") from exc


def command_files(command: Sequence[str], workdir: Path) -> set[Path]:
    """The files of a command agent's program that its command names: the program when it
    is a path, and each argument that names a file under the manifest's directory
    (``node agent.mjs``). What those files load in turn is not known to lkrun."""
    found: set[Path] = set()
    root = workdir.resolve()
    for word in command:
        path = (root / word).resolve()  # an absolute word stays as it is
        if path.is_relative_to(root) and path.is_file():
            found.add(path)
    return found


def _relevant_to(
    manifest: Path, programs: Callable[[], Collection[Path]] = frozenset
) -> Callable[[Any, str], bool]:
    """The changes that matter: the manifest itself, the files command agents' commands
    name (as they are now: a reload may change them), and Python files, minus .venv, .git,
    __pycache__ and the like, and minus agents' Python environments kept beside the
    manifest (packages installed there are not code changes)."""
    from watchfiles import DefaultFilter

    ignore = DefaultFilter()

    def relevant(change: Any, changed: str) -> bool:
        if not ignore(change, changed):
            return False
        if Path(changed) == manifest or Path(changed).resolve() in programs():
            return True
        return changed.endswith(".py") and not interpreter.in_python_env(
            Path(changed), manifest.parent
        )

    return relevant


def _watchfiles(directory: Path, relevant: Callable[[Any, str], bool]) -> AsyncIterator[Changes]:
    from watchfiles import awatch

    return awatch(directory, watch_filter=relevant)


def _load_checked(path: Path) -> Manifest:
    return check_entrypoints(load_manifest(path))


def _changed_fields(old: Any, new: Any) -> list[str]:
    """The fields of two instances of one dataclass that differ."""
    from dataclasses import fields

    return [f.name for f in fields(old) if getattr(old, f.name) != getattr(new, f.name)]
