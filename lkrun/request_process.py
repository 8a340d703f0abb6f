"""The daemon's side of an agent's request process (lkrun.framework.requests).

A livekit-agents app may decide per offer whether to take a job (``on_request``). That is
user code, so it runs in a process of the agent's own, started like a job process (forked
from the agent's fork server, or spawned), and kept running: each offer becomes a
``request`` message and its ``answer`` decides the reply to LiveKit. An offer that gets no
answer within ``request_timeout`` is declined, as is every offer while the process is
(re)starting; each such refusal is logged with its reason. A process that dies is
restarted with capped backoff.
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

from lkrun import jobpipe
from lkrun.job_process import JobProcess, LaunchError
from lkrun.logs import agent_logger

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
    ) -> None:
        self.log = agent_logger(log, label)
        self.factory = factory
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.last_error = ""
        self._proc: JobProcess | None = None
        self._ready = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._restart = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._ready

    async def run(self) -> None:
        """Keep one request process ready until cancelled."""
        failures = 0
        try:
            while True:
                if await self._serve_once():
                    failures = 0
                else:
                    failures += 1
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** max(0, failures - 1))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._restart.wait(), delay if failures else 0)
                self._restart.clear()
        finally:
            await self._stop("the agent is stopping")

    def restart(self) -> None:
        """The agent's code changed: answer with a new process from now on."""
        self._ready = False
        self._restart.set()

    async def _serve_once(self) -> bool:
        """Start a process and serve with it until it exits; False if it never got ready."""
        proc = self.factory()
        proc.on_message = self._on_message
        self._proc = proc
        try:
            await proc.spawn()
        except LaunchError as exc:
            self._failed(f"cannot start the request process: {exc}")
            return False
        if not await proc.wait_ready(self.start_timeout):
            outcome = await proc.wait()
            self._failed(f"the request process did not start: {outcome.error}")
            return False
        self._ready = not self._restart.is_set()
        self.last_error = ""
        self.log.info("request process %s ready", proc.pid)
        restart = asyncio.ensure_future(self._restart.wait())
        exited = asyncio.ensure_future(proc.wait())
        try:
            await asyncio.wait({restart, exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            restart.cancel()
            self._ready = False
        if not exited.done():
            await proc.stop("the agent's code changed", STOP_TIMEOUT)
        outcome = await exited
        self._refuse_waiting("the request process exited")
        if outcome.error:
            self._failed(f"the request process exited: {outcome.error}")
        return True

    def _failed(self, why: str) -> None:
        if why != self.last_error:
            self.log.error("%s", why)
        self.last_error = why
        self._refuse_waiting(why)

    async def ask(self, job: proto.Job) -> dict[str, Any]:
        """The request function's answer for ``job``; RequestRefused if there is none."""
        proc = self._proc
        if not self._ready or proc is None:
            raise RequestRefused(
                "the request process is not ready"
                + (f": {self.last_error}" if self.last_error else "")
            )
        request_id = next(self._ids)
        answer = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = answer
        try:
            sent = proc.send(
                jobpipe.REQUEST, id=request_id, job=MessageToDict(job), timeout=self.timeout
            )
            if not sent:
                raise RequestRefused("the request process is gone")
            try:
                return await asyncio.wait_for(answer, self.timeout + ANSWER_MARGIN)
            except asyncio.TimeoutError:
                raise RequestRefused(
                    f"no answer from on_request within request_timeout={self.timeout:g}s"
                ) from None
        finally:
            self._waiting.pop(request_id, None)

    def _on_message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") != jobpipe.ANSWER:
            return
        answer = self._waiting.get(msg.get("id"))  # type: ignore[arg-type]
        if answer is not None and not answer.done():
            answer.set_result(msg)

    def _refuse_waiting(self, why: str) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(RequestRefused(why))

    async def _stop(self, why: str) -> None:
        self._ready = False
        proc = self._proc
        if proc is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.stop(why, STOP_TIMEOUT))
        self._refuse_waiting(why)
