"""Where one agent's processes come from: its fork server, warm pool and request process.

The supervisor asks for a process per job (``claim``); this module decides whether it is a
warm one or a cold one, forked from the zygote or spawned, and keeps all three kinds in
step with the manifest entry and the code on disk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lkrun import interpreter
from lkrun.credentials import Credentials, child_env
from lkrun.logs import job_logger
from lkrun.manifest import AgentSpec
from lkrun.shared import DAEMON_PYTHON_ENV
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe
from lkrun.supervision.forkserver import ForkServer
from lkrun.supervision.inference import SOCKET_ENV, InferenceProcesses, Lease, runners_of
from lkrun.supervision.job_process import (
    AppSpec,
    CommandLauncher,
    JobProcess,
    Launched,
    Launcher,
    SpawnLauncher,
)
from lkrun.supervision.request_process import RequestProcess
from lkrun.supervision.warm_pool import WarmPool

job_log = logging.getLogger("lkrun.job")


# The variables ``job_threads`` sets: each sizes a pool of threads in every job process that
# otherwise has one thread per core (README "Threads and malloc arenas per job"):
# liblivekit_ffi's tokio runtime (Builder::new_multi_thread() with no worker_threads reads
# TOKIO_WORKER_THREADS), and the BLAS under numpy, which every livekit-agents job imports:
# pip's numpy bundles OpenBLAS (OPENBLAS_NUM_THREADS, else OMP_NUM_THREADS), conda's MKL.
THREAD_ENV = ("TOKIO_WORKER_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
ARENA_ENV = "MALLOC_ARENA_MAX"


def resource_env(spec: AgentSpec) -> dict[str, str]:
    """The variables ``job_threads`` and ``malloc_arena_max`` set, 0 setting none. They go
    in the environment the job's interpreter starts with (the fork server's, or a spawned
    job's): glibc and OpenBLAS read them when they load, before any Python code runs."""
    env = {}
    if spec.job_threads:
        env.update(dict.fromkeys(THREAD_ENV, str(spec.job_threads)))
    if spec.malloc_arena_max:
        env[ARENA_ENV] = str(spec.malloc_arena_max)
    return env


def job_env(
    spec: AgentSpec, credentials: Credentials, base: Mapping[str, str], workdir: Path
) -> dict[str, str]:
    """The job's environment: the daemon's, minus API credentials unless the agent asks for
    them (``pass_credentials``), with the agent's thread and arena caps over it (over the
    daemon's own values too: the manifest is the agent's configuration), then the agent's
    own ``env`` over all of it."""
    env = child_env(base)  # credentials from ``credentials`` below, if asked for
    env.update(resource_env(spec))
    env["LIVEKIT_URL"] = credentials.url
    if spec.pass_credentials:
        env["LIVEKIT_API_KEY"] = credentials.api_key
        env["LIVEKIT_API_SECRET"] = credentials.api_secret
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(workdir), base.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env[DAEMON_PYTHON_ENV] = sys.executable  # its install hints name the agent's own pip
    env.update(spec.env)  # the manifest may pass credentials on purpose
    if spec.python is not None:  # lkrun's child side comes first; the daemon's path stays out
        interpreter.own_python_env(env, workdir=workdir, agent_env=spec.env)
    return env


class AgentProcesses:
    """Job processes for one agent (a ProcessSource for its JobSupervisor)."""

    def __init__(
        self,
        *,
        spec: AgentSpec,
        workdir: Path,
        credentials: Credentials,
        log: logging.LoggerAdapter[Any],
        shutdown_timeout: Callable[[], float],
        on_readiness: Callable[[], None] = lambda: None,
        inference: InferenceProcesses | None = None,
    ) -> None:
        self.spec = spec
        # The daemon's inference processes: one per interpreter, for agents whose code
        # registers inference runners (None: this agent's jobs get no inference executor).
        self.inference = inference
        self._inference_lease: Lease | None = None
        self.on_readiness = on_readiness  # not_ready() may have changed
        self.workdir = workdir
        self.credentials = credentials
        self.log = log
        self.shutdown_timeout = shutdown_timeout
        self.wanted = True  # False once the agent takes no more jobs: nothing new is started
        self._running = False  # between start() and close(): helpers may start
        self._started = False  # start() was called
        self._loaded = False  # the code was loaded once since start(): see not_ready()
        self._tasks = BackgroundTasks()
        self.forkserver = self._new_forkserver()
        self.pool = WarmPool(
            label=spec.name,
            factory=self._new_process,
            size=spec.idle_processes,
            timeout=spec.prewarm_timeout,
            on_change=self._helper_changed,
            require_warm=bool(spec.command),
        )
        self._pool_task: asyncio.Task[None] | None = None
        self.requests = self._new_request_process()
        self._requests_task: asyncio.Task[None] | None = None

    # -- ProcessSource ---------------------------------------------------------------------

    def claim(self) -> tuple[JobProcess, bool]:
        """A warm process if one is ready, else a cold one (not started yet)."""
        proc = self.pool.take()
        return (proc, True) if proc is not None else (self._new_process(), False)

    def replenish(self) -> None:
        self.pool.replenish()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the fork server, the warm pool and the request process; they load while
        the agent registers, reporting itself not ready (not_ready()) until they have."""
        self._sync_inference()  # first: a model may take longest to load
        await self._start_forkserver()
        self._pool_task = asyncio.create_task(self.pool.run(), name=f"warm pool {self.spec.name}")
        self._running = self._started = True
        self._start_requests()
        self._helper_changed()

    def not_ready(self) -> str:
        """Why a job would not start at this agent's normal speed now, "" once it would.

        Until the code has loaded once (the fork server imported the module, and the first
        warm process is ready when idle_processes > 0; either may fail instead: jobs then
        fail with its error, as they would later), and whenever the request process that
        answers offers is not up. A reload later does not count: the jobs that come during
        it wait for the new code rather than be turned away.
        """
        if not self._loaded:
            return self._loading() or "not started"
        if self.requests is not None and not self.requests.ready:
            error = self.requests.last_error
            return "its request process is " + (f"not ready: {error}" if error else "starting")
        return ""

    def _loading(self) -> str:
        if not self._started:
            return ""
        if self.forkserver is not None and self.forkserver.loading:
            return f"the fork server is importing {self.spec.entrypoint}"
        if self.pool.warming_first:
            return "its first warm process is starting"
        lease = self._inference_lease
        if lease is not None and lease.waiting:
            return f"its inference process is loading {', '.join(sorted(lease.runners))}"
        return ""

    def _helper_changed(self) -> None:
        if not self._loaded and self._started and not self._loading():
            self._loaded = True
        self.on_readiness()

    async def close(self) -> None:
        """After the jobs were stopped: end every helper and the fork server."""
        self._running = False
        helpers = [t for t in (self._pool_task, self._requests_task) if t is not None]
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await self._tasks.join()
        if self.forkserver is not None:
            # Whatever is left of the jobs goes with it.
            await self.forkserver.close(self.shutdown_timeout())
        self._release_inference()  # its last agent gone, it stops

    async def wait_tasks(self) -> None:
        await self._tasks.join()

    def stop_warming(self) -> None:
        """The agent takes no new jobs (draining or removed): idle processes go."""
        self.wanted = False
        why = "no longer needed: the agent takes no new jobs (draining or removed)"
        self.pool.configure(self._new_process, 0, self.spec.prewarm_timeout, why=why)

    def update_spec(self, spec: AgentSpec) -> None:
        old, self.spec = self.spec, spec
        reload = _loaded_fields(old) != _loaded_fields(spec)
        if reload:
            self._replace_forkserver()
        elif self.forkserver is not None:
            self.forkserver.load_timeout = spec.prewarm_timeout
        if self._running:
            self._sync_inference()
        if _process_fields(old) != _process_fields(spec):
            self.pool.require_warm = bool(spec.command)
            self.pool.configure(self._new_process, spec.idle_processes, spec.prewarm_timeout)
        self._sync_requests(restart=reload)

    def code_changed(self) -> None:
        """Agent code changed on disk: the fork server and warm processes hold the old code."""
        if self.forkserver is not None or self.pool.idle:
            self.log.info("code changed on disk; reloading the agent's module for new jobs")
            self._replace_forkserver()
            self.pool.recycle()
            if self.requests is not None:
                self.requests.restart()
        lease = self._inference_lease
        if lease is not None and lease.process is not None:
            lease.process.code_changed()  # only if a runner's own source changed

    def idle_pids(self) -> list[int]:
        """Processes that serve no job yet: the warm processes and the fork server."""
        pids = [p.pid for p in self.pool.idle if p.pid]
        if self.forkserver is not None and self.forkserver.pid is not None:
            pids.append(self.forkserver.pid)
        return pids

    # -- inside ----------------------------------------------------------------------------

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
                name = f"stop request process {self.spec.name}"
                self._tasks.spawn(_wait_cancelled(task), name=name)
        elif self.requests is not None:
            self.requests.timeout = self.spec.request_timeout
            if restart:
                self.requests.restart()

    def _new_forkserver(self) -> ForkServer | None:
        if self.spec.start_method != "forkserver" or self.spec.command:
            return None
        return ForkServer(
            label=self.spec.name,
            app=self._app_spec(),
            cwd=self.workdir,
            env=self._job_env(),
            load_timeout=self.spec.prewarm_timeout,
            on_change=self._helper_changed,
        )

    def _replace_forkserver(self) -> None:
        """New jobs fork from a fresh zygote; the old one lives on until its jobs end."""
        old, self.forkserver = self.forkserver, self._new_forkserver()
        if old is not None:
            old.retire()
            self._tasks.spawn(old.close(), name=f"retired fork server {self.spec.name}")
        self._tasks.spawn(self._start_forkserver(), name=f"fork server {self.spec.name}")

    async def _start_forkserver(self) -> None:
        if self.forkserver is None or not self.wanted:
            return
        try:
            await self.forkserver.start()
        except Exception as exc:  # jobs retry; each failure reaches their records
            self.log.error("cannot start the fork server: %s", describe(exc))

    def _job_env(self) -> dict[str, str]:
        env = job_env(self.spec, self.credentials, os.environ, self.workdir)
        if self.inference is not None and runners_of(self.spec.app):
            # Fixed per interpreter, so it is known before the inference process runs.
            env[SOCKET_ENV] = str(self.inference.socket_path(self.spec.interpreter))
        return env

    def _sync_inference(self) -> None:
        """Use the inference process of this agent's interpreter while its code registers
        runners; a change of runners or interpreter moves to the right one."""
        if self.inference is None:
            return
        runners = runners_of(self.spec.app)
        lease = self._inference_lease
        if lease is not None and lease.process is not None:
            same = (lease.runners, lease.env) == (runners, dict(self.spec.env))
            if same and lease.process.interpreter == self.spec.interpreter:
                return
        new = None
        if runners:  # kept while draining too: the running jobs use it
            new = self.inference.attach(
                self.spec.name,
                self.spec.interpreter,
                runners,
                self._helper_changed,
                env=self.spec.env,
            )
        self._inference_lease = new
        if lease is not None:  # after the new one: a process both use goes on running
            lease.release()

    def _release_inference(self) -> None:
        lease, self._inference_lease = self._inference_lease, None
        if lease is not None:
            lease.release()

    def _app_spec(self) -> AppSpec:
        spec = self.spec
        python = str(spec.python) if spec.python is not None else ""
        return AppSpec(spec.entrypoint, spec.prewarm, spec.resolved_framework, python)

    def _launcher(self) -> Launcher:
        if self.forkserver is not None:
            return self.forkserver
        if self.spec.command:
            return CommandLauncher(command=self.spec.command, cwd=self.workdir, env=self._job_env())
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
            on_change=self._helper_changed,
        )

    def _new_process(self) -> JobProcess:
        return JobProcess(launcher=self._launch, log=job_logger(job_log, self.spec.name, "warm"))


def _loaded_fields(spec: AgentSpec) -> tuple[Any, ...]:
    """What a fork server was started with: a change needs a new one. That includes what
    the import check found of the agent's env: a pip install into it changes the versions
    under the same ``python``, and its running processes hold the old packages."""
    app = spec.app
    return (
        spec.entrypoint,
        spec.command,
        spec.prewarm,
        spec.env,
        spec.job_threads,  # in the fork server's environment
        spec.malloc_arena_max,
        spec.pass_credentials,
        spec.start_method,
        spec.resolved_framework,
        spec.python,
        runners_of(spec.app),  # the job environment names the inference socket
        app.version if app is not None else "",  # livekit-agents
        app.python_version if app is not None else "",
        app.livekit_version if app is not None else "",
    )


def _process_fields(spec: AgentSpec) -> tuple[Any, ...]:
    """What a warm process was started with: a change makes the idle ones stale."""
    return (*_loaded_fields(spec), spec.idle_processes, spec.prewarm_timeout)


async def _wait_cancelled(task: asyncio.Task[None]) -> None:
    await asyncio.gather(task, return_exceptions=True)
