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
                               {"moved": true}

``moved`` says the process is being replaced by a new one (new runners, or a runner's
source edited): the job sends its next requests over a new connection, which reaches the
new process, while the answers to the requests it sent on this one still come here; it
closes this connection once they have (lkrun.supervision.inference starts the new
process before it stops the old one, so a restart asked for loses no request).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

from livekit.agents.ipc.inference_executor import InferenceExecutor

from lkrun.child import apps
from lkrun.shared.tasks import BackgroundTasks

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


def encode_moved() -> bytes:
    return _line({"moved": True})


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    """One message, its ``data`` decoded to bytes (or None); WireError if malformed."""
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise WireError(f"not JSON: {exc}") from None
    if isinstance(message, dict) and message.get("moved") is True and "id" not in message:
        return message
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


class _Connection:
    """One connection to the inference process and the requests sent on it."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.moved = False  # the process said so: no new request goes on this one


class SocketInference(InferenceExecutor):
    """``do_inference`` over the inference process's socket: one connection per job,
    opened at the first call, any number of requests in flight on it. When the process
    dies every request in flight fails with InferenceUnavailable, and the next call
    connects again (to the restarted process, or fails at once while it is down). When it
    is replaced (``moved``), new requests go over a new connection to the new process while
    the old one answers those it has."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._current: _Connection | None = None  # where new requests go
        self._connections: set[_Connection] = set()  # with a reader each: current and moved
        self._readers = BackgroundTasks()
        self._next_id = 0
        self._connecting: asyncio.Lock | None = None
        self._closed = False

    async def do_inference(self, method: str, data: bytes) -> bytes | None:
        connection = await self._connection(method)
        self._next_id += 1
        request_id = self._next_id
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        connection.pending[request_id] = answer
        try:
            try:
                connection.writer.write(encode_request(request_id, method, data))
                await connection.writer.drain()
            except (OSError, RuntimeError) as exc:  # RuntimeError: the transport is closing
                self._lost(connection, f"sending failed: {exc}")
            message = await answer
        finally:
            connection.pending.pop(request_id, None)
            if connection.moved and not connection.pending:
                connection.writer.close()  # its last answer came: the old process may go
        if "error" in message:
            raise RuntimeError(f"inference of {method} failed: {message['error']}")
        result = message.get("data")
        return result if isinstance(result, bytes) else None

    async def _connection(self, method: str) -> _Connection:
        if self._closed:
            raise InferenceUnavailable(f"inference of {method}: the job is over")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._current is not None:
                return self._current
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
            connection = _Connection(writer)
            self._current = connection
            self._connections.add(connection)
            self._readers.spawn(self._read(reader, connection), name="inference answers")
            return connection

    async def _read(self, reader: asyncio.StreamReader, connection: _Connection) -> None:
        why = "the inference process closed the connection (it exited or restarted)"
        try:
            while line := await reader.readline():
                try:
                    message = decode(line)
                except WireError as exc:
                    why = f"the inference process sent a bad answer ({exc})"
                    break
                if message.get("moved"):
                    connection.moved = True
                    if self._current is connection:
                        self._current = None  # the next request connects to the new one
                    if not connection.pending:
                        break
                    continue
                answer = connection.pending.get(message["id"])
                if answer is not None and not answer.done():
                    answer.set_result(message)
        except (OSError, ValueError) as exc:  # ValueError: a line over MAX_LINE
            why = f"reading from the inference process failed: {exc}"
        finally:
            self._lost(connection, why)

    def _lost(self, connection: _Connection, why: str) -> None:
        """The connection is gone: fail what is in flight on it; the next call reconnects."""
        if self._current is connection:
            self._current = None
        self._connections.discard(connection)
        connection.writer.close()
        for answer in connection.pending.values():
            if not answer.done():
                answer.set_exception(InferenceUnavailable(why))

    async def aclose(self) -> None:
        """At the end of the job."""
        self._closed = True
        for connection in list(self._connections):
            self._lost(connection, "the job is over")
        await self._readers.close()


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
