"""The daemon's side of an agent's request process (lkrun.child.framework.requests).

A livekit-agents app may decide per offer whether to take a job (``on_request``). That is
user code, so it runs in a process of the agent's own, started like a job process (forked
from the agent's fork server, or spawned), and kept running: each offer becomes a
``request`` message and its ``answer`` decides the reply to LiveKit. An offer that gets no
answer within ``request_timeout`` is declined, as is every offer while no process is ready;
each such refusal is logged by the agent with its reason. When the agent's code changes,
a new process is started while the old one goes on answering, and takes over once ready. A
process that dies is replaced with capped backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from typing import Any

from google.protobuf.json_format import MessageToDict
from livekit.protocol import agent as proto

from lkrun.logs import agent_logger
from lkrun.shared import jobpipe
from lkrun.shared.tasks import BackgroundTasks
from lkrun.supervision.job_process import JobProcess, LaunchError
from lkrun.supervision.lifecycle import conclude

log = logging.getLogger("lkrun.requests")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
ANSWER_MARGIN = 0.5  # the process enforces the timeout; this covers the pipe both ways
STOP_TIMEOUT = 5.0


class RequestRefused(Exception):
    """No answer from the request function; the text says why (for the log and metrics)."""


class RequestProcess:
    def __init__(
        self,
        *,
        label: str,
        factory: Callable[[], JobProcess],
        timeout: float,
        start_timeout: float,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.log = agent_logger(log, label)
        self.on_change = on_change  # ``ready`` changed
        self.factory = factory
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.last_error = ""
        self._serving: JobProcess | None = None  # the process that answers offers now
        self._ids = itertools.count(1)
        self._waiting: dict[int, tuple[JobProcess, asyncio.Future[dict[str, Any]]]] = {}
        self._restart = asyncio.Event()
        self._retiring = BackgroundTasks()

    @property
    def ready(self) -> bool:
        return self._serving is not None

    def _serve_with(self, proc: JobProcess | None) -> JobProcess | None:
        """Make ``proc`` the one that answers (None: none does); the one it replaces."""
        old, self._serving = self._serving, proc
        if (old is None) != (proc is None) and self.on_change is not None:
            self.on_change()
        return old

    def restart(self) -> None:
        """The agent's code changed: answer with a new process once it is ready."""
        self._restart.set()

    async def run(self) -> None:
        """Keep one request process answering until cancelled."""
        failures = 0
        try:
            while True:
                self._restart.clear()
                proc = await self._start()
                if proc is None:
                    failures += 1
                    await self._pause(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1)))
                    continue
                failures = 0
                self.last_error = ""
                old = self._serve_with(proc)
                self.log.info("request process %s ready", proc.pid)
                if old is not None:
                    self._retire(old, "replaced after a code change")
                if not await self._serve(proc):
                    failures += 1
                    await self._pause(min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1)))
        finally:
            serving = self._serve_with(None)
            if serving is not None:
                self._retire(serving, "the agent is stopping")
            await self._retiring.join()

    async def _start(self) -> JobProcess | None:
        """A new request process, ready; None (the reason recorded) if it did not start."""
        proc = self.factory()
        proc.on_message = lambda msg: self._on_message(proc, msg)
        try:
            await proc.spawn()
        except LaunchError as exc:
            self._failed(f"cannot start the request process: {exc}")
            return None
        try:
            ready = await proc.wait_ready(self.start_timeout)
        except asyncio.CancelledError:
            # Not serving yet, so run()'s cleanup does not know it: end it here.
            self._retiring.spawn(proc.kill("the agent stopped while it was starting"))
            raise
        if not ready:
            error = conclude(await proc.wait()).error
            self._failed(f"the request process did not start: {error}")
            return None
        return proc

    async def _serve(self, proc: JobProcess) -> bool:
        """Until the process exits (False) or a restart is asked for (True)."""
        restart = asyncio.ensure_future(self._restart.wait())
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({restart, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            restart.cancel()
            if not exited.done():
                exited.cancel()
        if self._restart.is_set():
            return True
        error = conclude(exited.result()).error
        self._failed(f"the request process exited: {error or 'no reason given'}")
        if self._serving is proc:
            self._serve_with(None)
        self._refuse(proc, "the request process exited")
        return False

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._restart.wait(), delay)  # a code change: try now

    def _retire(self, proc: JobProcess, why: str) -> None:
        """Stop ``proc`` once it has answered what it was asked (it finishes those first)."""

        async def stop() -> None:
            await proc.stop(why, STOP_TIMEOUT + self.timeout)
            self._refuse(proc, f"the request process stopped ({why})")

        self._retiring.spawn(stop(), name=f"retire request process {proc.pid}")

    def _failed(self, why: str) -> None:
        if why != self.last_error:
            self.log.error("%s", why)
        self.last_error = why

    async def ask(self, job: proto.Job) -> dict[str, Any]:
        """The request function's answer for ``job``; RequestRefused if there is none."""
        proc = self._serving
        if proc is None:
            why = f": {self.last_error}" if self.last_error else ""
            raise RequestRefused(f"the request process is not ready{why}")
        request_id = next(self._ids)
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (proc, answer)
        try:
            message = {"id": request_id, "job": MessageToDict(job), "timeout": self.timeout}
            if not proc.send(jobpipe.REQUEST, **message):
                raise RequestRefused("the request process is gone")
            try:
                return await asyncio.wait_for(answer, self.timeout + ANSWER_MARGIN)
            except asyncio.TimeoutError:
                raise RequestRefused(
                    f"no answer from on_request within request_timeout={self.timeout:g}s"
                ) from None
        finally:
            self._waiting.pop(request_id, None)

    def _on_message(self, proc: JobProcess, msg: dict[str, Any]) -> None:
        if msg.get("type") != jobpipe.ANSWER:
            return
        waiting = self._waiting.get(msg.get("id"))  # type: ignore[arg-type]
        if waiting is not None and waiting[0] is proc and not waiting[1].done():
            waiting[1].set_result(msg)

    def _refuse(self, proc: JobProcess, why: str) -> None:
        for asked, answer in self._waiting.values():
            if asked is proc and not answer.done():
                answer.set_exception(RequestRefused(why))
