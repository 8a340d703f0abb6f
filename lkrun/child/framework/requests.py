"""The agent's request process: answers job offers with the app's ``on_request``.

The daemon never runs user code, so an app with a request function (``on_request`` on its
``rtc_session``, ``request_fnc`` in ServerOptions) gets a process of its own, forked from
the agent's fork server like a job process. For each offer the daemon sends ``request``
{id, job}; the process calls the function with the framework's ``JobRequest`` and replies
``answer`` {id, accept, terminate, identity, name, metadata, attributes, error} as soon as
the function accepts or rejects, or when it returns without doing either (a rejection, as
in the official worker), raises, or runs out of its time limit.

Unlike the official worker, ``req.accept()`` returns as soon as the answer is sent, not
once LiveKit assigned the job: the job itself runs in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from google.protobuf.json_format import ParseDict
from livekit.agents import JobRequest
from livekit.agents.job import JobAcceptArguments
from livekit.protocol import agent as proto

from lkrun.child.appkind import Sender, call
from lkrun.shared import jobpipe
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe


class RequestingApp(Protocol):
    """What the request server needs of its app (FrameworkApp), typed by shape: no cycle."""

    request_fnc: Callable[..., Any] | None


log = logging.getLogger("lkrun.requests")


class RequestServer:
    def __init__(self, app: RequestingApp, pipe: Sender) -> None:
        self.app = app
        self.pipe = pipe
        self._tasks = BackgroundTasks()

    def handle(self, msg: Mapping[str, Any]) -> None:
        self._tasks.spawn(self.answer(msg))

    async def answer(self, msg: Mapping[str, Any]) -> None:
        request_id = msg.get("id")
        answered: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

        async def on_reject(terminate: bool) -> None:
            if not answered.done():
                answered.set_result({"accept": False, "terminate": bool(terminate)})

        async def on_accept(args: JobAcceptArguments) -> None:
            if not answered.done():
                answered.set_result(
                    {
                        "accept": True,
                        "identity": args.identity,
                        "name": args.name,
                        "metadata": args.metadata,
                        "attributes": dict(args.attributes or {}),
                    }
                )

        try:
            job = ParseDict(msg["job"], proto.Job(), ignore_unknown_fields=True)
        except Exception as exc:
            self._send(request_id, {"accept": False, "error": f"bad job: {describe(exc)}"})
            return
        request = JobRequest(job=job, on_reject=on_reject, on_accept=on_accept)
        timeout = float(msg.get("timeout") or 2.0)
        if self.app.request_fnc is None:  # e.g. the code lost its on_request since
            self._send(request_id, {"accept": False, "error": "the app has no on_request"})
            return
        runner = asyncio.ensure_future(call(self.app.request_fnc, request))
        try:
            await asyncio.wait(
                {runner, answered}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            runner.cancel()
            raise
        if not answered.done():
            answered.set_result({"accept": False, "error": self._why_no_answer(runner, timeout)})
        self._send(request_id, answered.result())
        if not runner.done():  # it answered and goes on (or hangs): bound what is left of it
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(runner, timeout)

    @staticmethod
    def _why_no_answer(runner: asyncio.Future[Any], timeout: float) -> str:
        if not runner.done():
            runner.cancel()
            return f"on_request did not answer within request_timeout={timeout:g}s"
        if not runner.cancelled() and (exc := runner.exception()) is not None:
            log.error("on_request failed", exc_info=exc)
            return f"on_request failed: {describe(exc)}"
        return "on_request returned without accepting or rejecting the job"

    def _send(self, request_id: Any, answer: Mapping[str, Any]) -> None:
        self.pipe.send(jobpipe.ANSWER, id=request_id, **answer)

    async def close(self, grace: float) -> None:
        """Finish the requests in hand (each has its own time limit), then stop."""
        await self._tasks.close(grace)
