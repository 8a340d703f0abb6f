"""Prewarmed job processes for one agent: started ahead, each used for exactly one job."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from lkrun.logs import agent_logger
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe
from lkrun.supervision.job_process import JobProcess
from lkrun.supervision.lifecycle import Cause, conclude

log = logging.getLogger("lkrun.pool")

BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
REFILL_DELAY = 0.5


class WarmPool:
    """Keeps ``size`` processes READY (module imported, prewarm run) for one agent.

    A process that fails to warm up is reported once per distinct cause, and warming is
    retried with capped exponential backoff, never in a tight spawn/kill loop.
    """

    def __init__(
        self,
        *,
        label: str,
        factory: Callable[[], JobProcess],
        size: int,
        timeout: float,
        on_change: Callable[[], None] | None = None,
        require_warm: bool = False,
    ) -> None:
        self.label = label
        # Keep a process idle only if its ready message says "warm": true (a command
        # agent's program, docs/protocol.md); lkrun's own runner always waits for its start.
        self.require_warm = require_warm
        self.cold_only = ""  # why no process is kept idle after all (its program said so)
        self.on_change = on_change  # called once the first process is ready or has failed
        self.settled = False  # a first process was ready, or failed: the pool's start is over
        self.log = agent_logger(log, label)
        self.factory = factory
        self.size = size
        self.timeout = timeout
        self.failures = 0
        self.last_error = ""
        self._ready: list[JobProcess] = []
        self._watchers: dict[JobProcess, asyncio.Task[None]] = {}
        self._killing = BackgroundTasks()
        self._changed = asyncio.Event()
        self._generation = 0  # bumped by recycle(): a process started before holds old code

    @property
    def idle(self) -> list[JobProcess]:
        return list(self._ready)

    @property
    def warming_first(self) -> bool:
        """Its first process is on its way: a job now would start cold."""
        return self.size > 0 and not self.settled

    @property
    def wanted(self) -> int:
        """How many idle processes it keeps: none once the program said it cannot wait."""
        return 0 if self.cold_only else self.size

    def _settle(self) -> None:
        if not self.settled:
            self.settled = True
            if self.on_change is not None:
                self.on_change()

    def take(self) -> JobProcess | None:
        """A ready process for a job, or None (the caller starts a cold one)."""
        while self._ready:
            proc = self._ready.pop(0)
            watcher = self._watchers.pop(proc, None)
            if watcher is not None:
                watcher.cancel()
            if not proc.exited:
                return proc
        return None

    def replenish(self) -> None:
        """Start replacing taken processes, a moment after a job got its start message.

        A new Python process burns a core for ~150 ms while it imports; on a small machine
        that slows the job that is joining its room right now, so it waits a little.
        """
        asyncio.get_running_loop().call_later(REFILL_DELAY, self._changed.set)

    def configure(
        self,
        factory: Callable[[], JobProcess],
        size: int,
        timeout: float,
        *,
        why: str = "replaced after a change",
    ) -> None:
        """New settings (or new code on disk, or no more jobs): idle processes go."""
        self.factory, self.size, self.timeout = factory, size, timeout
        self.recycle(why)

    def recycle(self, why: str = "replaced after a change") -> None:
        self._generation += 1
        self.cold_only = ""  # new code or settings may say otherwise
        stale, self._ready = self._ready, []
        for proc in stale:
            self._discard(proc, why)
        self.failures = 0  # new settings deserve a fresh try
        self._changed.set()

    async def run(self) -> None:
        """Keep the pool full until cancelled; then kill the idle processes."""
        try:
            while True:
                if len(self._ready) < self.wanted:
                    if self.failures:
                        await self._backoff()
                    await self._warm_one()
                else:
                    await self._changed.wait()
                    self._changed.clear()
        finally:
            for proc in self._ready:
                self._discard(proc, "pool closed")
            self._ready = []
            await self._killing.join()

    async def _warm_one(self) -> None:
        generation = self._generation
        proc = self.factory()
        try:
            ready = await self._start(proc)
        except asyncio.CancelledError:
            # Not in the ready set yet, so nobody else would end it: it would outlive us.
            if proc.pid is not None:
                self._discard(proc, "the pool closed while it was starting")
            raise
        if ready is None:
            return
        if ready:
            if generation != self._generation:  # a change came while it warmed up
                self._discard(proc, "replaced after a change")
                return
            if self.require_warm and not _says_warm(proc):
                self._go_cold(proc)
                return
            if self.failures:
                self.log.info("warm processes start again")
            self.failures = 0
            self.last_error = ""
            self._ready.append(proc)
            self._watchers[proc] = asyncio.create_task(self._watch(proc))
            self._settle()
            return
        verdict = conclude(await proc.wait())
        error = verdict.error
        if verdict.cause is Cause.START_FAILED and proc.load_timed_out:
            # In a warm process the entrypoint is loaded and the prewarm run before ready:
            # say which limit, in the manifest's words.
            error = f"prewarm took longer than prewarm_timeout={self.timeout:g}s"
        self._failed(error)

    async def _start(self, proc: JobProcess) -> bool | None:
        """Spawn ``proc`` and wait until it is ready: whether it is, None if it never ran."""
        try:
            await proc.spawn()
        except OSError as exc:
            self._failed(f"cannot start a process: {exc}")
            return None
        except Exception as exc:  # e.g. ValueError: a NUL byte in the environment
            self._failed(f"cannot start a process: {describe(exc)}")
            return None
        return await proc.wait_ready(self.timeout)

    def _go_cold(self, proc: JobProcess) -> None:
        """The program cannot be started ahead: each job starts its own process."""
        self.cold_only = 'its ready message does not say "warm": true'
        self.log.warning(
            "idle_processes=%d is not used: %s, so each job starts its own process "
            "(docs/protocol.md)",
            self.size,
            self.cold_only,
        )
        self._discard(proc, f"not kept idle: {self.cold_only}")
        self._settle()

    def _failed(self, error: str) -> None:
        self.failures += 1
        if error != self.last_error:  # once per cause, not once per attempt
            self.log.error("a warm process failed to start: %s", error)
            self.last_error = error
        self._settle()  # jobs will not wait for a pool that cannot fill

    async def _backoff(self) -> None:
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (self.failures - 1))
        self.log.debug("next warm process in %.0fs", delay)
        self._changed.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            # A configuration change cuts the wait short.
            await asyncio.wait_for(self._changed.wait(), delay)

    async def _watch(self, proc: JobProcess) -> None:
        """An idle process that dies (OOM, crash) leaves the pool and is replaced."""
        error = conclude(await proc.wait()).error
        if proc in self._ready:
            self._ready.remove(proc)
            self._watchers.pop(proc, None)
            self._failed(f"an idle process exited: {error or 'no error given'}")
            self._changed.set()

    def _discard(self, proc: JobProcess, why: str) -> None:
        watcher = self._watchers.pop(proc, None)
        if watcher is not None:
            watcher.cancel()
        self._killing.spawn(proc.kill(why), name=f"discard warm process {proc.pid}")


def _says_warm(proc: JobProcess) -> bool:
    """Its ready said ``"warm": true``: it waits for its start message as long as that takes."""
    ready = proc.ready_message
    return ready is not None and ready.get("warm") is True
