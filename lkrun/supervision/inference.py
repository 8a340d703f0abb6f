"""The daemon's side of the framework's inference processes (lkrun.child.framework.inference_proc).

A livekit-agents app whose code registers ``_InferenceRunner``s (a local model, e.g. the
turn detector plugin's) expects a process that runs them for its jobs. The official worker
starts one per worker, so one per agent; lkrun starts one per agent environment (per
interpreter), shared by every agent of that environment that registers runners: one copy
of each model in memory however many agents use it.

``InferenceProcesses`` (one per daemon) owns them: an agent attaches when its processes
start (``attach`` -> a ``Lease``) and releases when they close; the process starts with the
first agent and stops after the last one is gone. ``InferenceProcess.run`` is its one
supervising task: it starts the process, waits for it to load its runners, reads its
request statistics, samples its memory, and starts it again with capped backoff when it
dies (the jobs' requests in flight fail at once: their connections close). An agent that
brings a runner the running process lacks makes it start again with the union.

Jobs find it at a fixed socket path per interpreter, in their environment
(``LKRUN_INFERENCE_SOCKET``), so a restarted process is found where the old one was.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from lkrun.api.metrics import Metrics
from lkrun.credentials import SECRET_ENV
from lkrun.shared import jobpipe, pdeathsig
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe

log = logging.getLogger("lkrun.inference")

MODULE = "lkrun.child.framework.inference_proc"
SOCKET_ENV = "LKRUN_INFERENCE_SOCKET"  # as lkrun.child.framework.inference reads it
INITIALIZE_TIMEOUT = 300.0  # the official worker's: loading a model can take minutes
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0  # up this long: the next failure starts the backoff over
SAMPLE_INTERVAL = 2.0
KILL_GRACE = 2.0
RECENT = 256  # requests the status's latency figures are taken over
MB = 1024 * 1024


@dataclass(eq=False)
class Lease:
    """One agent's use of an inference process, from its start until it closes."""

    agent: str
    runners: dict[str, str]  # method -> class source, as the import check found them
    on_change: Callable[[], None]
    env: dict[str, str] = field(default_factory=dict)  # the agent's manifest ``env``
    process: InferenceProcess | None = None
    # The agent waits (FULL "starting") until the process is up with its runners, or
    # failed to start (its jobs then get that error, as with a fork server that failed).
    waiting: bool = True
    _release: Callable[[Lease], None] | None = None

    @property
    def socket_path(self) -> str:
        assert self.process is not None
        return str(self.process.socket_path)

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self)


@dataclass
class _Requests:
    count: int = 0
    errors: int = 0
    recent: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT)
    )

    def latency_ms(self) -> dict[str, float] | None:
        if not self.recent:
            return None
        values = sorted(self.recent)

        def at(q: float) -> float:
            return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 3)

        return {
            "p50": at(0.5),
            "p95": at(0.95),
            "max": round(values[-1] * 1000, 3),
            "mean": round(statistics.fmean(values) * 1000, 3),
            "samples": len(values),
        }


class InferenceProcess:
    """One interpreter's inference process, supervised by ``run()``."""

    def __init__(
        self,
        *,
        interpreter: str,
        socket_path: Path,
        cwd: Path,
        make_env: Callable[[Sequence[Lease]], dict[str, str]],
        metrics: Metrics | None = None,
        initialize_timeout: float = INITIALIZE_TIMEOUT,
    ) -> None:
        self.interpreter = interpreter
        self.socket_path = socket_path
        self.cwd = cwd
        self.make_env = make_env  # its environment, from its agents' when it starts
        self.env: dict[str, str] = {}
        self.metrics = metrics
        self.initialize_timeout = initialize_timeout
        self.runners: dict[str, str] = {}  # what the next process loads: every lease's
        self.leases: list[Lease] = []
        self.pid: int | None = None
        self.ready = False
        self.served: list[str] = []  # runners the running process loaded
        self.failed: dict[str, str] = {}  # runners it could not load, and why
        self.last_error = ""  # why it last ended or failed to start; kept once started again
        self.restarts = 0
        self.up_since: float | None = None  # time.time() it became ready
        self.rss_bytes = 0
        self.pss_bytes = 0
        self.requests = _Requests()
        self._files: dict[str, float] = {}  # the runners' source files -> mtime at its start
        self._restart = asyncio.Event()  # the runners changed: start a new process now
        self._ready = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._last_line = ""
        self._tasks = BackgroundTasks()

    # -- leases ------------------------------------------------------------------------

    def add(self, lease: Lease) -> None:
        lease.process = self
        self.leases.append(lease)
        missing = {m: s for m, s in lease.runners.items() if m not in self.runners}
        for method, source in lease.runners.items():
            if self.runners.get(method, source) != source:
                log.warning(
                    "agent %s registers inference runner %s as %s, but the inference process "
                    "of %s runs %s under that name (registered first by another agent)",
                    lease.agent,
                    method,
                    source,
                    self.interpreter,
                    self.runners[method],
                )
        self.runners.update(missing)
        lease.waiting = bool(missing) or not self.ready
        if missing:
            self._restart.set()  # a process that runs (or is loading) lacks them

    def remove(self, lease: Lease) -> None:
        with contextlib.suppress(ValueError):
            self.leases.remove(lease)

    def _changed(self) -> None:
        for lease in list(self.leases):
            lease.on_change()

    def _settle_leases(self, *, failed: bool) -> None:
        """The process is up (every lease whose runners it loaded stops waiting) or its
        start failed (every lease stops waiting: its jobs get the error)."""
        loaded = set(self.served) | set(self.failed)
        for lease in self.leases:
            if failed or set(lease.runners) <= loaded:
                lease.waiting = False
        self._changed()

    # -- the supervising task -------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: keep one process running, restarted with capped backoff."""
        delay = 0.0
        try:
            while True:
                if delay:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._restart.wait(), delay)
                began = time.monotonic()
                if await self._run_once():  # ended for a restart with new runners
                    delay = 0.0
                    continue
                self.restarts += 1
                if self.metrics is not None:
                    self.metrics.inference_restarted(self.interpreter)
                lasted = time.monotonic() - began
                delay = (
                    BACKOFF_BASE
                    if lasted >= STABLE_AFTER
                    else min(BACKOFF_CAP, max(BACKOFF_BASE, 2 * delay))
                )
                log.warning(
                    "inference process of %s: %s; starting it again in %gs",
                    self.interpreter,
                    self.last_error,
                    delay,
                )
        finally:
            await self._stop_process()
            await self._tasks.close(KILL_GRACE)
            if self.metrics is not None:
                self.metrics.inference_gone(self.interpreter)

    def command(self) -> list[str]:
        runners = [f"--runner={method}={source}" for method, source in sorted(self.runners.items())]
        return [
            self.interpreter,
            "-m",
            MODULE,
            "--socket",
            str(self.socket_path),
            "--daemon-pid",
            str(os.getpid()),
            *runners,
        ]

    async def _run_once(self) -> bool:
        """Start one process and supervise it until it ends; True if it was ended because
        the runners changed (a restart that is not a failure)."""
        self._restart.clear()
        self._ready.clear()
        command = self.command()  # with the runners known now: a later change restarts it
        self.env = self.make_env(self.leases)
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # its group is killed whole: a runner's helpers too
                limit=jobpipe.MAX_LINE,
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the environment
            self.last_error = f"cannot start it: {describe(exc)}"
            self._settle_leases(failed=True)
            return False
        self._proc, self.pid, self._last_line = proc, proc.pid, ""
        log.info(
            "inference process %s started for %s with runners %s",
            proc.pid,
            self.interpreter,
            ", ".join(sorted(self.runners)) or "none",
        )
        assert proc.stdout is not None and proc.stderr is not None
        logging_task = self._tasks.spawn(self._log_stderr(proc.stderr, proc.pid))
        reading = asyncio.ensure_future(self._read(proc.stdout))
        restart = asyncio.ensure_future(self._restart.wait())
        ready = asyncio.ensure_future(self._ready.wait())
        sampler: asyncio.Future[None] | None = None
        requested = False
        try:
            done, _ = await asyncio.wait(
                {reading, restart, ready},
                timeout=self.initialize_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if restart in done:
                requested = True
            elif ready in done:
                sampler = asyncio.ensure_future(self._sample(proc.pid))
                done, _ = await asyncio.wait(
                    {reading, restart}, return_when=asyncio.FIRST_COMPLETED
                )
                requested = restart in done and reading not in done
            elif not done:
                self.last_error = f"it did not load its runners within {self.initialize_timeout:g}s"
        finally:
            for task in (reading, restart, ready, sampler):
                if task is not None:
                    task.cancel()
            code = await self._stop_process()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(logging_task), KILL_GRACE)
        if not requested and not self.last_error.startswith("it did not load"):
            last = f" (last log line: {self._last_line[:200]})" if self._last_line else ""
            self.last_error = f"process {proc.pid} exited with code {code}{last}"
        if not requested:
            self._settle_leases(failed=True)
        return requested

    async def _read(self, stream: asyncio.StreamReader) -> None:
        """Its messages to the daemon, until EOF (it exited)."""

        def bad(why: str) -> None:
            log.warning("inference process of %s: %s", self.interpreter, why)

        await jobpipe.read_messages(stream, self._on_message, bad)

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "ready":
            self.ready, self.up_since = True, time.time()
            self.served = [str(m) for m in msg.get("runners") or ()]
            self._files = {str(f): _mtime(str(f)) for f in msg.get("files") or ()}
            failed = msg.get("failed")
            self.failed = (
                {str(k): str(v) for k, v in failed.items()} if isinstance(failed, dict) else {}
            )
            log.info(
                "inference process %s of %s ready in %ss: %s",
                msg.get("pid"),
                self.interpreter,
                msg.get("seconds"),
                ", ".join(self.served) or "no runner",
            )
            for method, why in self.failed.items():
                log.error("inference runner %s failed to load: %s", method, why)
            if self.metrics is not None:
                self.metrics.inference_state(self.interpreter, up=True)
            self._ready.set()
            self._settle_leases(failed=False)
        elif kind == "stats":
            for item in msg.get("done") or ():
                with contextlib.suppress(TypeError, ValueError, IndexError):
                    self._count(str(item[0]), float(item[1]), bool(item[2]))

    def _count(self, method: str, seconds: float, ok: bool) -> None:
        self.requests.count += 1
        self.requests.errors += not ok
        self.requests.recent.append(seconds)
        if self.metrics is not None:
            # Methods the jobs name are their text: only known ones become label values.
            label = method if method in self.runners else "unknown"
            self.metrics.inference_request(self.interpreter, label, seconds, ok)

    async def _sample(self, pid: int) -> None:
        """Its memory, every SAMPLE_INTERVAL while it runs."""
        try:
            proc = psutil.Process(pid)
            while True:
                info = proc.memory_full_info()  # PSS: the shared pages counted fairly
                self.rss_bytes, self.pss_bytes = info.rss, getattr(info, "pss", 0)
                if self.metrics is not None:
                    self.metrics.inference_memory(self.interpreter, self.rss_bytes, self.pss_bytes)
                await asyncio.sleep(SAMPLE_INTERVAL)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            return

    async def _stop_process(self) -> int | None:
        """SIGTERM to its group, SIGKILL after KILL_GRACE; its exit code."""
        proc, self._proc = self._proc, None
        was_ready, self.ready, self.up_since = self.ready, False, None
        self.rss_bytes = self.pss_bytes = 0
        if was_ready and self.metrics is not None:
            self.metrics.inference_state(self.interpreter, up=False)
        if proc is None:
            return None
        self.pid = None
        if proc.returncode is None:
            pdeathsig.signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE)
            except asyncio.TimeoutError:
                pdeathsig.signal_group(proc.pid, signal.SIGKILL)
        code = await proc.wait()
        if was_ready:
            self._changed()
        return code

    async def _log_stderr(self, stream: asyncio.StreamReader, pid: int) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the limit: skip it
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text:
                self._last_line = text
                log.info("inference process %s: %s", pid, text)

    def code_changed(self) -> bool:
        """Code changed on disk (the daemon's watch): start again if the source of a runner
        class changed since the process loaded it (a runner written beside the agents, or a
        plugin installed anew); in-flight requests fail as when it dies. Several agents
        saying so at once make one restart."""
        changed = [f for f, mtime in self._files.items() if _mtime(f) != mtime]
        if not changed or self._restart.is_set():
            return bool(changed)
        log.info(
            "inference process of %s: %s changed on disk; starting it again",
            self.interpreter,
            ", ".join(changed),
        )
        self._files = {}
        self._restart.set()
        return True

    # -- what status shows ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "interpreter": self.interpreter,
            "socket": str(self.socket_path),
            "pid": self.pid,
            "ready": self.ready,
            "agents": sorted({lease.agent for lease in self.leases}),
            "runners": sorted(self.runners),
            "failed_runners": dict(self.failed),
            "uptime": round(time.time() - self.up_since, 3) if self.up_since else None,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "rss_mb": round(self.rss_bytes / MB, 1),
            "pss_mb": round(self.pss_bytes / MB, 1),
            "requests": self.requests.count,
            "errors": self.requests.errors,
            "latency_ms": self.requests.latency_ms(),
        }


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return -1.0  # gone: a change too


class InferenceProcesses:
    """Every inference process of the daemon, one per interpreter that needs one."""

    def __init__(
        self,
        *,
        workdir: Path,
        metrics: Metrics | None = None,
        base_env: Mapping[str, str] | None = None,
        env_for: Callable[[str, dict[str, str], Mapping[str, str]], None] | None = None,
    ) -> None:
        """``env_for(interpreter, env, agent_env)`` adapts the environment for an
        interpreter that is not the daemon's (lkrun's child side on its path; its agents'
        PYTHONPATH, if they set one, in ``agent_env``)."""
        self.workdir = workdir
        self.metrics = metrics
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.env_for = env_for
        self._dir: Path | None = None
        self._processes: dict[str, InferenceProcess] = {}
        self._runs: dict[InferenceProcess, asyncio.Task[None]] = {}  # stopping ones too
        self._stopping = BackgroundTasks()

    def socket_path(self, interpreter: str) -> Path:
        """Where the jobs of agents on ``interpreter`` find its inference process; fixed for
        the daemon's life, so it can go in a fork server's environment before it starts."""
        if self._dir is None:
            # Not the state directory: a unix socket path must stay under ~100 bytes.
            self._dir = Path(tempfile.mkdtemp(prefix="lkrun-inference-"))
        digest = hashlib.sha256(interpreter.encode()).hexdigest()[:12]
        return self._dir / f"{digest}.sock"

    def env(self, interpreter: str, leases: Sequence[Lease]) -> dict[str, str]:
        """The environment of the inference process of ``interpreter``: what its agents'
        jobs get, as far as they share it. The daemon's environment without the API
        credentials (it runs plugin code, as jobs do), plus the agents' manifest ``env``:
        their PYTHONPATH entries joined (so it imports what each agent imports), any other
        variable as the first agent sets it."""
        env = {k: v for k, v in self.base_env.items() if k not in SECRET_ENV}
        paths: list[str] = []
        for lease in leases:
            for name, value in lease.env.items():
                if name == "PYTHONPATH":
                    paths += [p for p in value.split(os.pathsep) if p and p not in paths]
                elif env.setdefault(name, value) != value and name not in self.base_env:
                    log.warning(
                        "agent %s sets %s=%r, but the shared inference process of %s gets "
                        "another agent's value",
                        lease.agent,
                        name,
                        value,
                        interpreter,
                    )
        env["PYTHONUNBUFFERED"] = "1"
        if interpreter != sys.executable and self.env_for is not None:
            own = {"PYTHONPATH": os.pathsep.join(paths)} if paths else {}
            self.env_for(interpreter, env, own)
        else:
            path = paths or [str(self.workdir), self.base_env.get("PYTHONPATH", "")]
            env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
        return env

    def attach(
        self,
        agent: str,
        interpreter: str,
        runners: Mapping[str, str],
        on_change: Callable[[], None] = lambda: None,
        env: Mapping[str, str] | None = None,
    ) -> Lease:
        """Use the inference process of ``interpreter``, starting it if none runs; ``env``
        is the agent's manifest ``env``."""
        process = self._processes.get(interpreter)
        if process is None:
            process = InferenceProcess(
                interpreter=interpreter,
                socket_path=self.socket_path(interpreter),
                cwd=self.workdir,
                make_env=lambda leases, python=interpreter: self.env(python, leases),
                metrics=self.metrics,
            )
            self._processes[interpreter] = process
            name = f"inference process {interpreter}"
            self._runs[process] = asyncio.create_task(process.run(), name=name)
        lease = Lease(agent=agent, runners=dict(runners), on_change=on_change, env=dict(env or {}))
        lease._release = self._release
        process.add(lease)
        return lease

    def _release(self, lease: Lease) -> None:
        process = lease.process
        if process is None:
            return
        process.remove(lease)
        if process.leases or self._processes.get(process.interpreter) is not process:
            return
        del self._processes[process.interpreter]
        run = self._runs.get(process)
        if run is not None:
            log.info(
                "inference process of %s: no agent uses it any more; stopping it",
                process.interpreter,
            )
            run.cancel()
            name = f"stop inference {process.interpreter}"
            self._stopping.spawn(self._wait_stopped(process, run), name=name)

    async def _wait_stopped(self, process: InferenceProcess, run: asyncio.Task[None]) -> None:
        await asyncio.gather(run, return_exceptions=True)
        self._runs.pop(process, None)

    async def close(self) -> None:
        """Stop every process (the daemon is stopping) and wait for them."""
        runs = list(self._runs.values())
        self._runs.clear()
        self._processes.clear()
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await self._stopping.join()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def status(self) -> list[dict[str, Any]]:
        return [p.status() for p in self._processes.values()]

    def pids(self) -> set[int]:
        """Its processes, also those stopping: the daemon waits for them itself."""
        return {p.pid for p in self._runs if p.pid is not None}


def runners_of(app: Any) -> dict[str, str]:
    """The runners an agent's app registers (method -> class source), from the check."""
    runners = getattr(app, "runners", None) or ()
    return {str(method): str(source) for method, source in runners}
