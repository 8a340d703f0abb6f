"""The framework's inference runners under lkrun: the job's side and the wire between.

livekit-agents lets a plugin register an ``_InferenceRunner`` (a class with an
``INFERENCE_METHOD`` name, ``initialize()`` and ``run(data: bytes) -> bytes | None``; the
deprecated livekit-plugins-turn-detector's end-of-utterance models are the known ones). The
official worker starts one inference process per worker that instantiates every registered
runner, and a job calls one with ``ctx.inference_executor.do_inference(method, data)``.

lkrun runs one inference process per agent environment (interpreter), shared by all its
agents (lkrun.child.framework.inference_proc; the daemon's side is
lkrun.supervision.inference). A job reaches it over a unix socket whose path the daemon
puts in the job's environment (``LKRUN_INFERENCE_SOCKET``), with ``SocketInference`` as
the JobContext's ``inference_executor``.

The wire: JSON lines, one object per line, the data base64-encoded; a connection carries
any number of concurrent requests, told apart by their ids::

    job -> inference process:  {"id": 1, "method": "lk_end_of_utterance_en", "data": "..."}
    inference process -> job:  {"id": 1, "data": "..." | null}
                               {"id": 1, "error": "one line"}
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from livekit.agents.ipc.inference_executor import InferenceExecutor

from lkrun.child import apps

SOCKET_ENV = "LKRUN_INFERENCE_SOCKET"
# A request or an answer: model inputs and outputs are small (a chat context, a score), but
# an embedder may send more; base64 adds a third.
MAX_LINE = 64 * 1024 * 1024
CONNECT_TIMEOUT = 5.0


class WireError(ValueError):
    """A line that is not a request or an answer."""


def encode_request(request_id: int, method: str, data: bytes) -> bytes:
    text = base64.b64encode(data).decode("ascii")
    return _line({"id": request_id, "method": method, "data": text})


def encode_answer(request_id: int, data: bytes | None) -> bytes:
    text = None if data is None else base64.b64encode(data).decode("ascii")
    return _line({"id": request_id, "data": text})


def encode_error(request_id: int, error: str) -> bytes:
    return _line({"id": request_id, "error": error})


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One message, its ``data`` decoded to bytes (or None); WireError if malformed."""
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise WireError(f"not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("id"), int):
        raise WireError("not an object with an integer id")
    data = message.get("data")
    if data is not None:
        if not isinstance(data, str):
            raise WireError("data is not a base64 string")
        try:
            message["data"] = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise WireError("data is not valid base64") from None
    if "method" in message and not isinstance(message["method"], str):
        raise WireError("method is not a string")
    if "error" in message and not isinstance(message["error"], str):
        raise WireError("error is not a string")
    return message


class InferenceUnavailable(RuntimeError):
    """The inference process could not answer (not running, restarting, or it died)."""


class NoInference(InferenceExecutor):
    """For a job with no inference process: the import check found no runner registered
    by the agent's code, so the daemon started none for it."""

    async def do_inference(self, method: str, data: bytes) -> bytes | None:
        raise InferenceUnavailable(
            f"inference of {method}: this agent has no inference process; lkrun starts one "
            "when the agent's code registers an _InferenceRunner at import (`lkrun check` "
            "lists them)"
        )


class SocketInference(InferenceExecutor):
    """``do_inference`` over the inference process's socket: one connection per job,
    opened at the first call, any number of requests in flight on it. When the process
    dies every request in flight fails with InferenceUnavailable, and the next call
    connects again (to the restarted process, or fails at once while it is down)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._writer: asyncio.StreamWriter | None = None
        self._reading: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def do_inference(self, method: str, data: bytes) -> bytes | None:
        writer = await self._connection(method)
        self._next_id += 1
        request_id = self._next_id
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = answer
        try:
            try:
                writer.write(encode_request(request_id, method, data))
                await writer.drain()
            except (OSError, RuntimeError) as exc:  # RuntimeError: the transport is closing
                self._lost(f"sending failed: {exc}")
            message = await answer
        finally:
            self._pending.pop(request_id, None)
        if "error" in message:
            raise RuntimeError(f"inference of {method} failed: {message['error']}")
        result = message.get("data")
        return result if isinstance(result, bytes) else None

    async def _connection(self, method: str) -> asyncio.StreamWriter:
        if self._closed:
            raise InferenceUnavailable(f"inference of {method}: the job is over")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None:
                return self._writer
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(self.path, limit=MAX_LINE), CONNECT_TIMEOUT
                )
            except (OSError, asyncio.TimeoutError) as exc:
                why = str(exc) or type(exc).__name__
                raise InferenceUnavailable(
                    f"inference of {method}: cannot reach the inference process at "
                    f"{self.path} ({why}); it is starting or restarting"
                ) from None
            self._writer = writer
            self._reading = asyncio.create_task(self._read(reader, writer), name="inference")
            return writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why = "the inference process closed the connection (it exited or restarted)"
        try:
            while line := await reader.readline():
                try:
                    message = decode(line)
                except WireError as exc:
                    why = f"the inference process sent a bad answer ({exc})"
                    break
                answer = self._pending.get(message["id"])
                if answer is not None and not answer.done():
                    answer.set_result(message)
        except (OSError, ValueError) as exc:  # ValueError: a line over MAX_LINE
            why = f"reading from the inference process failed: {exc}"
        finally:
            if self._writer is writer:
                self._lost(why)

    def _lost(self, why: str) -> None:
        """The connection is gone: fail what is in flight; the next call reconnects."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(InferenceUnavailable(why))

    async def aclose(self) -> None:
        """At the end of the job."""
        self._closed = True
        reading, self._reading = self._reading, None
        self._lost("the job is over")
        if reading is not None:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading


def executor_for_job() -> InferenceExecutor:
    """The job's ``inference_executor``: the agent's inference process, if it has one."""
    path = os.environ.get(SOCKET_ENV)
    return SocketInference(path) if path else NoInference()


async def close_executor(executor: InferenceExecutor) -> None:
    if isinstance(executor, SocketInference):
        await executor.aclose()


# -- what the import check reports ------------------------------------------------------


def registered_runners(reach: Iterable[str] | None) -> list[dict[str, str]]:
    """The runners registered so far whose class comes from a module in ``reach`` (every
    one when None), as ``{"method", "class"}``; ``class`` is ``module:qualname``, or
    ``path/to/file.py:qualname`` for an entrypoint loaded from a file, which is what the
    inference process imports."""
    registry = sys.modules.get("livekit.agents.inference_runner")
    if registry is None:
        return []
    runners = registry._InferenceRunner.registered_runners
    modules = set(reach) if reach is not None else None
    found = []
    for method, cls in sorted(runners.items()):
        module = cls.__module__
        if modules is not None and module not in modules:
            continue
        found.append({"method": method, "class": f"{_source_of(module)}:{cls.__qualname__}"})
    return found


def _source_of(module_name: str) -> str:
    if module_name.startswith(apps.FILE_MODULE_PREFIX):
        module = sys.modules.get(module_name)
        path = getattr(module, "__file__", None)
        if path:
            return str(path)
    return module_name
