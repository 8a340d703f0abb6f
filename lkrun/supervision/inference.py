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
dies (the jobs' requests in flight fail at once: their connections close).

What the process loads is made from the current leases each time one comes or goes (an
agent's newest lease stands for it; between agents, the one that attached first owns a
method name). When that differs from what the serving process loaded (an agent brought a
runner, renamed or dropped one, or went), or a runner's source changed on disk, a new
process is started beside it, make before break: it listens at a temporary path, takes
the socket path by rename() once it has loaded, and the old one is told to drain (its jobs
send their next requests to the new one; it answers those it has, then exits).

Jobs find it at a fixed socket path per interpreter, in their environment
(``LKRUN_INFERENCE_SOCKET``), so a restarted process is found where the old one was.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import logging
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from lkrun import paths
from lkrun.api.control import InferenceStatus
from lkrun.api.metrics import Metrics
from lkrun.credentials import child_env, withheld_env
from lkrun.shared import jobpipe, pdeathsig
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe
from lkrun.supervision.stderr import relay_lines

log = logging.getLogger("lkrun.inference")

MODULE = "lkrun.child.framework.inference_proc"
SOCKET_ENV = "LKRUN_INFERENCE_SOCKET"  # as lkrun.child.framework.inference reads it
INITIALIZE_TIMEOUT = 300.0  # the official worker's: loading a model can take minutes
DRAIN_TIMEOUT = 30.0  # a replaced process's requests in flight get this long to be answered
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
    # Its agent's seniority in the process. A new lease of the same agent (its code or env
    # changed: attached before the old one is released) keeps it, so which agent owns a
    # method name does not change with that.
    rank: int = 0
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


class _Instance:
    """One OS process of an environment's inference process: loading, serving the socket
    path, or retired (answering what it has while its successor serves)."""

    def __init__(
        self,
        *,
        pid: int,
        path: Path,
        runners: dict[str, str],
        generation: int,
        proc: asyncio.subprocess.Process | None = None,
    ) -> None:
        self.pid = pid
        self.path = path  # where it listens: a temporary path until it serves
        self.runners = runners  # what it was started with: method -> class source
        self.generation = generation  # of the runners' code (InferenceProcess.code_changed)
        self.proc = proc
        self.started = time.monotonic()
        self.ready = asyncio.Event()  # it loaded its runners and listens
        self.exited = asyncio.Event()  # its stdout reached EOF: it exited or is exiting
        self.served: list[str] = []  # runners it loaded
        self.failed: dict[str, str] = {}  # runners it could not load, and why
        self.files: dict[str, float] = {}  # the runners' source files -> mtime when ready
        self.last_line = ""
        self.tasks = BackgroundTasks()  # its stdout and stderr readers

    @property
    def loaded(self) -> set[str]:
        return set(self.served) | set(self.failed)

    async def drain(self, timeout: float) -> None:
        """Its successor has the socket path: tell it, and wait up to ``timeout`` for it to
        answer the requests it has and exit."""
        stdin = self.proc.stdin if self.proc is not None else None
        if stdin is None:
            return
        try:
            stdin.write(jobpipe.encode(jobpipe.DRAIN))
            await stdin.drain()
        except (OSError, RuntimeError):  # gone already
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.exited.wait(), timeout)

    async def stop(self) -> int | None:
        """SIGTERM to its group, SIGKILL after KILL_GRACE (at once if cancelled while
        waiting); its exit code."""
        proc = self.proc
        try:
            if proc is None:
                return None
            if proc.returncode is None:
                pdeathsig.signal_group(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE)
                except asyncio.TimeoutError:
                    pass
                finally:
                    if proc.returncode is None:  # also when cancelled: it must not outlive us
                        pdeathsig.signal_group(proc.pid, signal.SIGKILL)
            code = await proc.wait()
            with contextlib.suppress(asyncio.TimeoutError):  # its last log lines
                await asyncio.wait_for(self.tasks.join(), KILL_GRACE)
            return code
        finally:
            await self.tasks.close()


Outcome = Literal["ready", "failed", "superseded"]


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
        drain_timeout: float = DRAIN_TIMEOUT,
    ) -> None:
        self.interpreter = interpreter
        self.socket_path = socket_path
        self.cwd = cwd
        self.make_env = make_env  # its environment, from its agents' when it starts
        self.env: dict[str, str] = {}
        self.metrics = metrics
        self.initialize_timeout = initialize_timeout
        self.drain_timeout = drain_timeout
        self.runners: dict[str, str] = {}  # what a process started now loads: the leases'
        self._owners: dict[str, str] = {}  # method -> the agent whose class that is
        self.leases: list[Lease] = []
        self._ranks = itertools.count(1)
        self.last_error = ""  # why it last ended or failed to start; kept once started again
        self.restarts = 0
        self.up_since: float | None = None  # time.time() the serving process took over
        self.rss_bytes = 0
        self.pss_bytes = 0
        self.requests = _Requests()
        self._current: _Instance | None = None  # the one at the socket path
        self._loading: _Instance | None = None  # the one that will be, once it has loaded
        self._instances: set[_Instance] = set()  # every one not reaped yet, retired ones too
        self._generation = 0  # counts changes on disk to the runners' source
        self._restart = asyncio.Event()  # wakes run(): the runners or their source changed
        self._tasks = BackgroundTasks()  # the memory sampler, the retired processes' stops
        self._gauges = True  # False once retired: a successor may own the interpreter's gauges

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def pid(self) -> int | None:
        shown = self._current or self._loading
        return shown.pid if shown is not None else None

    @property
    def served(self) -> list[str]:
        return list(self._current.served) if self._current is not None else []

    @property
    def failed(self) -> dict[str, str]:
        return dict(self._current.failed) if self._current is not None else {}

    def pids(self) -> set[int]:
        """Its processes until they are reaped: loading, serving and retired ones."""
        return {instance.pid for instance in self._instances}

    def retire(self) -> None:
        """It is stopping for good: from now on it leaves the interpreter's gauges alone
        (an agent of that interpreter may already have started a successor)."""
        self._gauges = False

    # -- leases ------------------------------------------------------------------------

    def add(self, lease: Lease) -> None:
        lease.process = self
        same = next((held for held in self.leases if held.agent == lease.agent), None)
        lease.rank = same.rank if same is not None else next(self._ranks)
        self.leases.append(lease)
        self._rebuild()
        for method, source in lease.runners.items():
            owner = self._owners.get(method)
            if owner != lease.agent and self.runners.get(method) != source:
                log.warning(
                    "agent %s registers inference runner %s as %s, but the inference process "
                    "of %s runs %s under that name (registered first by agent %s)",
                    lease.agent,
                    method,
                    source,
                    self.interpreter,
                    self.runners.get(method),
                    owner,
                )
        lease.waiting = not self._serves(lease)

    def remove(self, lease: Lease) -> None:
        with contextlib.suppress(ValueError):
            self.leases.remove(lease)
        if self.leases:  # with none left it stops: nothing to load again
            self._rebuild()

    def _newest(self) -> list[Lease]:
        """Each agent's newest lease, the senior agents first."""
        newest: dict[str, Lease] = {}
        for lease in sorted(self.leases, key=lambda held: held.rank):  # stable: newest last
            newest[lease.agent] = lease
        return list(newest.values())

    def _rebuild(self) -> None:
        """What a process started now loads, from the leases held now; wake run() when that
        is not what the serving (or loading) process has."""
        runners: dict[str, str] = {}
        owners: dict[str, str] = {}
        for lease in self._newest():
            for method, source in lease.runners.items():
                if method not in runners:
                    runners[method], owners[method] = source, lease.agent
        changed = runners != self.runners
        self.runners, self._owners = runners, owners
        target = self._loading or self._current
        if target.runners != runners if target is not None else changed:
            self._restart.set()

    def _serves(self, lease: Lease) -> bool:
        """Whether the serving process has loaded (or failed to load) the lease's runners,
        each as the class that owns its name now."""
        current = self._current
        return current is not None and all(
            method in current.loaded and current.runners.get(method) == self.runners.get(method)
            for method in lease.runners
        )

    def _stale(self) -> bool:
        """Whether a new process is wanted: none serves, or it loaded other runners or
        older source than there are now."""
        current = self._current
        return current is None or self._superseded(current)

    def _superseded(self, instance: _Instance) -> bool:
        return instance.runners != self.runners or instance.generation != self._generation

    def _changed(self) -> None:
        for lease in list(self.leases):
            lease.on_change()

    def _settle_leases(self, *, failed: bool) -> None:
        """A process took over (every lease whose runners it loaded stops waiting) or a
        start failed (every lease stops waiting: its jobs get the error)."""
        for lease in self.leases:
            if failed or self._serves(lease):
                lease.waiting = False
        self._changed()

    # -- the supervising task -------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: keep a process serving the socket path with what the leases
        want; after a failure, start again with capped backoff."""
        self._tasks.spawn(self._sample(), name=f"inference memory {self.interpreter}")
        backoff = 0.0  # the last pause after a failure; the next one doubles it
        pause = 0.0  # before the next start
        try:
            while True:
                await self._idle(pause)
                current = self._current
                if current is not None and current.exited.is_set():
                    lasted = time.monotonic() - current.started
                    await self._lost(current)
                    backoff = pause = _backoff(backoff, lasted)
                    log.warning(
                        "inference process of %s: %s; starting it again in %gs",
                        self.interpreter,
                        self.last_error,
                        pause,
                    )
                    continue
                if current is not None and not self._stale():
                    pause = 0.0  # woken by a change that was undone
                    continue
                began = time.monotonic()
                outcome = await self._start()
                if outcome != "failed":
                    pause = 0.0
                    continue
                self.restarts += 1
                if self.metrics is not None:
                    self.metrics.inference_restarted(self.interpreter)
                backoff = pause = _backoff(backoff, time.monotonic() - began)
                serving = self._current
                log.warning(
                    "inference process of %s: %s; starting it again in %gs%s",
                    self.interpreter,
                    self.last_error,
                    pause,
                    f" (process {serving.pid} goes on serving)" if serving is not None else "",
                )
        finally:
            await self._stop_all()

    async def _idle(self, pause: float) -> None:
        """Until there is something to do: the serving process died, or a start is due (at
        once, or after ``pause``; a change to the runners cuts the pause short)."""
        current = self._current
        if current is not None and current.exited.is_set():
            return
        if current is not None and not self._stale():
            timeout: float | None = None  # serving: until it dies or the leases change
        elif pause:
            timeout = pause
        else:
            return
        self._restart.clear()
        waits = [self._restart.wait()]
        if current is not None:
            waits.append(current.exited.wait())
        await _first(*waits, timeout=timeout)

    def command(
        self, path: Path | None = None, runners: Mapping[str, str] | None = None
    ) -> list[str]:
        runners = self.runners if runners is None else runners
        return [
            self.interpreter,
            "-m",
            MODULE,
            "--socket",
            str(self.socket_path if path is None else path),
            "--daemon-pid",
            str(os.getpid()),
            *(f"--runner={method}={source}" for method, source in sorted(runners.items())),
        ]

    def _loading_path(self) -> Path:
        """Where a new process listens until it has loaded: beside the socket path, so a
        rename() moves it there."""
        return self.socket_path.with_name(self.socket_path.stem + ".loading.sock")

    async def _start(self) -> Outcome:
        """Start a process with the runners wanted now and wait for it to load them; once
        it has, it takes over the socket path from the one serving, if any, which drains.
        "superseded": the runners changed meanwhile, so it was stopped."""
        instance = await self._spawn()
        if instance is None:
            return "failed"
        loaded: Outcome | Literal["timeout"] = "failed"
        code: int | None = None
        try:
            loaded = await self._load(instance)
        finally:
            if loaded != "ready":
                self._loading = None
                code = await self._reap(instance)
        if loaded == "ready":
            try:
                os.replace(instance.path, self.socket_path)  # atomic: jobs find one or the other
            except OSError as exc:
                self._loading = None
                await self._reap(instance)
                self.last_error = f"cannot move its socket to {self.socket_path}: {describe(exc)}"
                self._settle_leases(failed=True)
                return "failed"
            self._promote(instance)
            return "ready"
        if loaded == "superseded":
            log.info(
                "inference process %s of %s stopped while loading: its runners changed",
                instance.pid,
                self.interpreter,
            )
            return "superseded"
        if loaded == "timeout":
            self.last_error = f"it did not load its runners within {self.initialize_timeout:g}s"
        else:
            last = f" (last log line: {instance.last_line[:200]})" if instance.last_line else ""
            self.last_error = f"process {instance.pid} exited with code {code}{last}"
        self._settle_leases(failed=True)
        return "failed"

    async def _spawn(self) -> _Instance | None:
        """A new process with the runners wanted now, listening at the loading path; None
        if it could not be started (last_error says why)."""
        runners, generation = dict(self.runners), self._generation
        path = self._loading_path()
        try:
            self.env = self.make_env(self._newest())
            proc = await asyncio.create_subprocess_exec(
                *self.command(path, runners),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # its group is killed whole: a runner's helpers too
                limit=jobpipe.MAX_LINE,
            )
        except Exception as exc:  # its env (the child side cannot go there), the interpreter...
            self.last_error = f"cannot start it: {describe(exc)}"
            self._settle_leases(failed=True)
            return None
        instance = _Instance(
            pid=proc.pid, path=path, runners=runners, generation=generation, proc=proc
        )
        self._instances.add(instance)
        self._loading = instance
        assert proc.stdout is not None and proc.stderr is not None
        instance.tasks.spawn(self._read(instance, proc.stdout), name=f"inference {proc.pid}")
        instance.tasks.spawn(self._log_stderr(instance, proc.stderr), name=f"log {proc.pid}")
        serving = self._current
        log.info(
            "inference process %s started for %s with runners %s%s",
            proc.pid,
            self.interpreter,
            ", ".join(sorted(runners)) or "none",
            f"; process {serving.pid} serves until it has loaded them" if serving else "",
        )
        return instance

    async def _load(self, instance: _Instance) -> Outcome | Literal["timeout"]:
        """Until ``instance`` is ready, exits, is superseded or runs out of time. The
        serving process dying meanwhile is dealt with here: ``instance`` takes over."""
        deadline = time.monotonic() + self.initialize_timeout
        while True:
            current = self._current
            if instance.ready.is_set():
                return "ready"
            if instance.exited.is_set():
                return "failed"
            if current is not None and current.exited.is_set():
                await self._lost(current)
                log.warning(
                    "inference process of %s: %s; process %s is loading to take over",
                    self.interpreter,
                    self.last_error,
                    instance.pid,
                )
                continue
            if self._superseded(instance):
                return "superseded"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            self._restart.clear()
            waits = [instance.ready.wait(), instance.exited.wait(), self._restart.wait()]
            if current is not None:
                waits.append(current.exited.wait())
            await _first(*waits, timeout=remaining)

    def _promote(self, instance: _Instance) -> None:
        """``instance`` serves the socket path now; the one before it drains."""
        old, self._current, self._loading = self._current, instance, None
        self.up_since = time.time()
        self.rss_bytes = self.pss_bytes = 0
        if self.metrics is not None and self._gauges:
            self.metrics.inference_state(self.interpreter, up=True)
        if old is not None:
            log.info(
                "inference process %s of %s took over from %s, which answers the requests it "
                "has and exits",
                instance.pid,
                self.interpreter,
                old.pid,
            )
            self._tasks.spawn(self._retire(old), name=f"retired inference process {old.pid}")
        self._settle_leases(failed=False)

    async def _retire(self, instance: _Instance) -> None:
        try:
            await instance.drain(self.drain_timeout)
        finally:
            await self._reap(instance)

    async def _lost(self, instance: _Instance) -> None:
        """The serving process died: its jobs' requests in flight have failed."""
        self._current = None
        self.up_since = None
        self.rss_bytes = self.pss_bytes = 0
        if self.metrics is not None and self._gauges:
            self.metrics.inference_state(self.interpreter, up=False)
        code = await self._reap(instance)
        last = f" (last log line: {instance.last_line[:200]})" if instance.last_line else ""
        self.last_error = f"process {instance.pid} exited with code {code}{last}"
        self.restarts += 1
        if self.metrics is not None:
            self.metrics.inference_restarted(self.interpreter)
        self._changed()

    async def _reap(self, instance: _Instance) -> int | None:
        try:
            return await instance.stop()
        finally:
            self._instances.discard(instance)

    async def _stop_all(self) -> None:
        """It stops for good: every process it has goes (SIGTERM, then SIGKILL)."""
        self._tasks.cancel()  # the sampler; a retired process is stopped as its task ends
        instances = [i for i in (self._current, self._loading) if i is not None]
        self._current = self._loading = None
        self.up_since = None
        try:
            await asyncio.gather(*(self._reap(instance) for instance in instances))
        finally:
            await self._tasks.join()

    async def _read(self, instance: _Instance, stream: asyncio.StreamReader) -> None:
        """Its messages to the daemon, until EOF (it exited)."""

        def bad(why: str) -> None:
            log.warning("inference process %s of %s: %s", instance.pid, self.interpreter, why)

        try:
            await jobpipe.read_messages(stream, lambda msg: self._on_message(instance, msg), bad)
        finally:
            instance.exited.set()

    def _on_message(self, instance: _Instance, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "ready":
            instance.served = [str(m) for m in msg.get("runners") or ()]
            instance.files = {str(f): _mtime(str(f)) for f in msg.get("files") or ()}
            failed = msg.get("failed")
            instance.failed = (
                {str(k): str(v) for k, v in failed.items()} if isinstance(failed, dict) else {}
            )
            log.info(
                "inference process %s of %s ready in %ss: %s",
                instance.pid,
                self.interpreter,
                msg.get("seconds"),
                ", ".join(instance.served) or "no runner",
            )
            for method, why in instance.failed.items():
                log.error("inference runner %s failed to load: %s", method, why)
            instance.ready.set()
        elif kind == "stats":  # a retired process's too: its answers count
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

    async def _sample(self) -> None:
        """The serving process's memory, every SAMPLE_INTERVAL."""
        while True:
            current = self._current
            if current is not None:
                try:
                    info = psutil.Process(current.pid).memory_full_info()  # PSS: shared fairly
                except psutil.Error:  # gone, or not ours to read
                    pass
                else:
                    self.rss_bytes, self.pss_bytes = info.rss, getattr(info, "pss", 0)
                    if self.metrics is not None and self._gauges:
                        self.metrics.inference_memory(
                            self.interpreter, self.rss_bytes, self.pss_bytes
                        )
            await asyncio.sleep(SAMPLE_INTERVAL)

    async def _log_stderr(self, instance: _Instance, stream: asyncio.StreamReader) -> None:
        def on_line(text: str) -> None:
            instance.last_line = text
            log.info("inference process %s: %s", instance.pid, text)

        await relay_lines(stream, on_line)

    def code_changed(self) -> bool:
        """Code changed on disk (the daemon's watch): start again if the source of a runner
        class changed since the serving process loaded it (a runner written beside the
        agents); the new process takes over once it has loaded. Several agents saying so
        at once make one restart. The watch skips site-packages and virtualenvs, so a
        plugin installed or upgraded there is seen at the next change the watch does see
        (or when the daemon starts again)."""
        current = self._current
        if current is None:
            return False
        changed = [f for f, mtime in current.files.items() if _mtime(f) != mtime]
        if not changed:
            return False
        log.info(
            "inference process of %s: %s changed on disk; starting it again",
            self.interpreter,
            ", ".join(changed),
        )
        current.files = {}
        self._generation += 1
        self._restart.set()
        return True

    # -- what status shows ------------------------------------------------------------------

    def status(self) -> InferenceStatus:
        return {
            "interpreter": self.interpreter,
            "socket": str(self.socket_path),
            "pid": self.pid,
            "ready": self.ready,
            "agents": sorted({lease.agent for lease in self.leases}),
            "runners": sorted(self.runners),
            "failed_runners": self.failed,
            "uptime": round(time.time() - self.up_since, 3) if self.up_since else None,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "rss_mb": round(self.rss_bytes / MB, 1),
            "pss_mb": round(self.pss_bytes / MB, 1),
            "requests": self.requests.count,
            "errors": self.requests.errors,
            "latency_ms": self.requests.latency_ms(),
        }


def _backoff(previous: float, lasted: float) -> float:
    """The pause after a failure: doubled each time, up to BACKOFF_CAP, unless what failed
    had been up STABLE_AFTER."""
    if lasted >= STABLE_AFTER:
        return BACKOFF_BASE
    return min(BACKOFF_CAP, max(BACKOFF_BASE, 2 * previous))


async def _first(*waits: Awaitable[Any], timeout: float | None = None) -> None:
    """Until the first of ``waits`` is done (or ``timeout``); the others are cancelled and
    awaited: nothing is left running."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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
        socket_dir: Path | None = None,
    ) -> None:
        """``env_for(interpreter, env, agent_env)`` adapts the environment for an
        interpreter that is not the daemon's (lkrun's child side on its path; its agents'
        ``env``, with the PYTHONPATH their jobs have, in ``agent_env``). ``socket_dir``:
        where the sockets go, fixed for the daemon (``socket_dir_for``); None: a new
        temporary directory."""
        self.workdir = workdir
        self.metrics = metrics
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.env_for = env_for
        self._socket_dir = socket_dir
        self._dir: Path | None = None
        self._processes: dict[str, InferenceProcess] = {}
        self._runs: dict[InferenceProcess, asyncio.Task[None]] = {}  # the registered ones'
        self._retired: set[InferenceProcess] = set()  # their last agent went; stopping
        self._stopping = BackgroundTasks()

    def clean_stale(self) -> None:
        """Remove the socket directory a killed daemon with this state directory left: the
        daemon holds that directory's lock, so no other one uses the name."""
        if self._socket_dir is not None and self._dir is None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    def socket_path(self, interpreter: str) -> Path:
        """Where the jobs of agents on ``interpreter`` find its inference process; fixed for
        the daemon's life, so it can go in a fork server's environment before it starts."""
        if self._dir is None and self._socket_dir is not None:
            self._dir = _own_dir(self._socket_dir)
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="lkrun-inference-"))
        digest = hashlib.sha256(interpreter.encode()).hexdigest()[:12]
        return self._dir / f"{digest}.sock"

    def env(self, interpreter: str, leases: Sequence[Lease]) -> dict[str, str]:
        """The environment of the inference process of ``interpreter``: what its agents'
        jobs get, as far as they share it. The daemon's environment without the API
        credentials and the dashboard's token (it runs plugin code, as jobs do; not even an
        agent's ``env`` brings them: runners are local models), the agents' manifest ``env``
        over it (a variable two agents set differently: the first one's, logged), and a
        PYTHONPATH with every entry one of their jobs has: the agent's own PYTHONPATH if it
        sets one, else the manifest's directory and, on the daemon's interpreter, the
        daemon's PYTHONPATH."""
        own = interpreter != sys.executable and self.env_for is not None
        default = [str(self.workdir)]
        if not own:
            default += self.base_env.get("PYTHONPATH", "").split(os.pathsep)
        agents: dict[str, str] = {}
        setter: dict[str, str] = {}
        path: list[str] = []
        withheld = withheld_env()
        for lease in leases:
            given = lease.env.get("PYTHONPATH")
            entries = given.split(os.pathsep) if given is not None else default
            path += [p for p in entries if p and p not in path]
            for name, value in lease.env.items():
                if name == "PYTHONPATH" or name in withheld:
                    continue
                if name not in agents:
                    agents[name], setter[name] = value, lease.agent
                elif agents[name] != value and setter[name] != lease.agent:
                    log.warning(
                        "agent %s sets %s=%r, but the shared inference process of %s has "
                        "agent %s's value",
                        lease.agent,
                        name,
                        value,
                        interpreter,
                        setter[name],
                    )
        env = child_env(self.base_env)
        env.update(agents)
        env["PYTHONUNBUFFERED"] = "1"
        if own:
            assert self.env_for is not None
            self.env_for(interpreter, env, {**agents, "PYTHONPATH": os.pathsep.join(path)})
        else:
            env["PYTHONPATH"] = os.pathsep.join(path)
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
            if self.metrics is not None:  # not what a predecessor left, if one is stopping
                self.metrics.inference_state(interpreter, up=False)
            self._processes[interpreter] = process
            run = asyncio.create_task(process.run(), name=f"inference process {interpreter}")
            run.add_done_callback(lambda task, p=process: _run_ended(p, task))
            self._runs[process] = run
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
        process.retire()
        run = self._runs.pop(process, None)
        if run is not None:
            log.info(
                "inference process of %s: no agent uses it any more; stopping it",
                process.interpreter,
            )
            run.cancel()
            self._retired.add(process)
            name = f"stop inference {process.interpreter}"
            self._stopping.spawn(self._wait_stopped(process, run), name=name)

    async def _wait_stopped(self, process: InferenceProcess, run: asyncio.Task[None]) -> None:
        try:
            await asyncio.gather(run, return_exceptions=True)
        finally:
            self._retired.discard(process)
            if process.interpreter not in self._processes:  # else a successor owns them
                self._gone(process.interpreter)

    def _gone(self, interpreter: str) -> None:
        if self.metrics is not None:
            self.metrics.inference_gone(interpreter)

    async def close(self) -> None:
        """Stop every process (the daemon is stopping) and wait for them. Those already
        stopping are waited for, not cancelled again: that would cut their stop short."""
        runs = list(self._runs.items())
        self._runs.clear()
        self._processes.clear()
        for process, run in runs:
            process.retire()
            run.cancel()
        await asyncio.gather(*(run for _, run in runs), return_exceptions=True)
        await self._stopping.join()
        for process, _ in runs:
            self._gone(process.interpreter)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def status(self) -> list[InferenceStatus]:
        return [p.status() for p in self._processes.values()]

    def pids(self) -> set[int]:
        """Every process of theirs until it is reaped, those of processes stopping too:
        the daemon waits for them itself, its orphan reaper must not."""
        return {pid for p in (*self._runs, *self._retired) for pid in p.pids()}


def _run_ended(process: InferenceProcess, task: asyncio.Task[None]) -> None:
    """A supervising task ends only when cancelled; anything else is a bug to see."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error(
            "inference process of %s: its supervision failed: %s",
            process.interpreter,
            describe(exc),
            exc_info=exc,
        )


def _own_dir(directory: Path) -> Path | None:
    """``directory``, made if need be, unless it or its parent is no place for sockets the
    jobs trust (lkrun.paths.unsafe_dir: another user could put a socket of theirs there);
    None then, said in the log."""
    try:
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        problem = paths.unsafe_dir(directory.parent) or paths.unsafe_dir(directory)
    except OSError as exc:
        problem = describe(exc)
    if not problem:
        return directory
    log.warning(
        "not putting the inference sockets in %s (%s); using a temporary directory",
        directory,
        problem,
    )
    return None


def socket_dir_for(state_dir: Path) -> Path:
    """The daemon's directory of inference sockets: in the runtime directory (a unix socket
    path must stay under ~100 bytes, so not the state directory), named after the state
    directory, which one daemon at a time holds: the next daemon with it removes what a
    killed one left (``clean_stale``)."""
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:12]
    return paths.runtime_dir() / f"inference-{digest}"


def runners_of(app: Any) -> dict[str, str]:
    """The runners an agent's app registers (method -> class source), from the check."""
    runners = getattr(app, "runners", None) or ()
    return {str(method): str(source) for method, source in runners}
