"""An agent environment's inference process: ``python -m lkrun.child.framework.inference_proc
--socket PATH --runner METHOD=SOURCE:CLASS ...``.

It does what the official worker's inference process does (livekit-agents
``ipc/inference_proc_lazy_main.py``): it imports each runner class, makes one instance of
each, calls its ``initialize()`` (load the model), then answers ``run(data)`` calls in a
pool of threads, as many as there are CPUs. The difference is who asks: every job of every
agent of this environment, over a unix socket (the wire is in
lkrun.child.framework.inference), instead of the jobs of one worker over its pipes.

To the daemon, on stdout (JSON lines): ``ready`` {pid, runners, failed, seconds, files} once the
socket is listening; then ``stats`` {done: [[method, seconds, ok], ...]} as requests are
answered (those of one turn of its event loop together). stderr is its log. It exits when
stdin reaches EOF (the daemon is gone) and on SIGTERM; it dies with the daemon
(parent-death signal) too.

From the daemon, on stdin (JSON lines): ``drain`` when a new process has taken its socket
path (a restart asked for: the daemon starts the new one first). It stops accepting, tells
every connection ``moved`` (the job's next requests go to the new process), answers what
it has, and exits once every job has closed its connection.

Each connection has at most MAX_IN_FLIGHT requests in flight: when it has that many, the
next line is not read until one is answered, so one job cannot flood the process that all
the agents of its environment share.

A runner that cannot be imported or whose ``initialize()`` raises does not stop the others:
its requests get that error, and ``ready`` lists it under ``failed``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from livekit.agents.inference_runner import _InferenceRunner

from lkrun.child import apps
from lkrun.child.framework import inference
from lkrun.shared import jobpipe, pdeathsig
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe, one_line

READY = "ready"
STATS = "stats"
BACKLOG = 256
# Requests in flight on one connection (one job): more than the pool has threads, so a job's
# requests queue here rather than behind another job's.
MAX_IN_FLIGHT = 16


def load_runner(method: str, source: str) -> _InferenceRunner:
    """An instance of the runner class ``source`` names (``module:qualname``)."""
    module_name, _, qualname = source.rpartition(":")
    target: Any = apps.import_source(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not (isinstance(target, type) and issubclass(target, _InferenceRunner)):
        raise TypeError(f"{source} is not an _InferenceRunner class")
    declared = getattr(target, "INFERENCE_METHOD", None)
    if declared != method:
        raise TypeError(f"{source}.INFERENCE_METHOD is {declared!r}, not {method!r}")
    return target()


class InferenceServer:
    def __init__(
        self,
        runners: dict[str, _InferenceRunner],
        failed: dict[str, str],
        out: BinaryIO | None = None,
    ) -> None:
        self.runners = runners
        self.failed = failed
        self.out = out  # the daemon's channel; None: keep the statistics (tests)
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
        self.done: list[list[Any]] = []  # [method, seconds, ok] since the last stats line
        self._flushing = False
        self._peers: set[_Peer] = set()  # the open connections
        self.draining = False
        self._idle = asyncio.Event()  # draining and no connection left

    def _answered(self, method: str, seconds: float, ok: bool) -> None:
        """Counted at once: the answers that finish in one turn of the loop go out in one
        stats line at its end, so none is lost if the process is killed just after."""
        self.done.append([method, round(seconds, 6), ok])
        if self.out is not None and not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        done, self.done = self.done, []
        if done and self.out is not None:
            with contextlib.suppress(OSError):  # the daemon is gone: stdin's EOF ends us
                _send(self.out, STATS, done=done)

    async def answer(self, message: dict[str, Any]) -> bytes:
        """The answer line to one request."""
        request_id, method = message["id"], message.get("method")
        started = time.perf_counter()
        ok = False
        try:
            runner = self.runners.get(method) if isinstance(method, str) else None
            if runner is None:
                return inference.encode_error(request_id, self._unknown(method))
            data = message.get("data") or b""
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(self.pool, runner.run, data)
            if result is not None and not isinstance(result, bytes):
                kind = type(result).__name__
                return inference.encode_error(request_id, f"{method}.run returned a {kind}")
            ok = True
            return inference.encode_answer(request_id, result)
        except Exception as exc:
            traceback.print_exc()
            return inference.encode_error(request_id, one_line(describe(exc), 2000))
        finally:
            self._answered(str(method), time.perf_counter() - started, ok)

    def _unknown(self, method: Any) -> str:
        if isinstance(method, str) and method in self.failed:
            return f"runner {method} is unavailable: {self.failed[method]}"
        known = ", ".join(sorted(self.runners)) or "none"
        return f"unknown inference method {method!r} (this inference process runs: {known})"

    async def serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """One job's connection: its requests run concurrently (up to MAX_IN_FLIGHT), the
        answers in any order."""
        peer = _Peer(writer)
        self._peers.add(peer)
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        handlers = BackgroundTasks()

        async def handle(message: dict[str, Any]) -> None:
            try:
                await peer.send(await self.answer(message))
            finally:
                slots.release()

        try:
            if self.draining:  # accepted as the listener closed
                await peer.send(inference.encode_moved())
            while True:
                await slots.acquire()  # full: this job's next line waits for an answer
                line = await reader.readline()
                if not line:
                    return
                try:
                    message = inference.decode(line)
                    if "id" not in message:
                        raise inference.WireError("not a request")
                except inference.WireError as exc:
                    print(f"lkrun inference: dropping a connection: {exc}", file=sys.stderr)
                    return
                handlers.spawn(handle(message), name=f"inference request {message['id']}")
        except (OSError, ValueError):  # a reset, or a line over the limit
            return
        finally:
            # The job is gone (or broke the wire): nobody waits for these answers.
            handlers.cancel()
            await handlers.join()
            writer.close()
            self._peers.discard(peer)
            if self.draining and not self._peers:
                self._idle.set()

    async def drain(self) -> None:
        """A new process serves the socket path now: tell every job to send its next
        requests there, and return once each has closed its connection here (after its
        last answer)."""
        self.draining = True
        for peer in list(self._peers):
            await peer.send(inference.encode_moved())
        if not self._peers:
            self._idle.set()
        await self._idle.wait()


class _Peer:
    """A job's connection, written by each of its requests' handlers in turn."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.lock = asyncio.Lock()

    async def send(self, line: bytes) -> None:
        async with self.lock:
            if self.writer.is_closing():
                return
            self.writer.write(line)
            with contextlib.suppress(OSError):
                await self.writer.drain()


def bind(path: str) -> socket.socket:
    """Listen at ``path``; a socket file left there by a previous inference process goes."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(sock: socket.socket, server: InferenceServer, commands: int = 0) -> None:
    """Until stdin (``commands``) reaches EOF, or a ``drain`` from it has been done."""
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()  # the daemon is gone
    drain = asyncio.Event()
    buffer = bytearray()

    def on_stdin() -> None:
        try:
            data = os.read(commands, 4096)
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(commands)
            gone.set()
            return
        buffer.extend(data)
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            with contextlib.suppress(ValueError):
                if jobpipe.decode(line).get("type") == jobpipe.DRAIN:
                    drain.set()

    loop.add_reader(commands, on_stdin)
    listener = await asyncio.start_unix_server(
        server.serve_connection, sock=sock, limit=inference.MAX_LINE
    )
    try:
        await _first(gone.wait(), drain.wait())
        if not gone.is_set():
            # The socket path is the new process's now; what is left is the jobs'
            # connections here, until they have their answers.
            listener.close()
            await _first(gone.wait(), server.drain())
    finally:
        # Not wait_closed(): since Python 3.12 it waits for every connection to end.
        listener.close()
        loop.remove_reader(commands)


async def _first(*waits: Any) -> None:
    """Until the first of ``waits`` is done; the others are cancelled and awaited."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _files_of(runners: Iterable[_InferenceRunner]) -> list[str]:
    """The source files of the runner classes: when one changes, the daemon starts the
    process again (lkrun.supervision.inference.InferenceProcess.code_changed)."""
    files = {getattr(sys.modules.get(type(r).__module__), "__file__", None) for r in runners}
    return sorted(str(f) for f in files if f)


def _send(out: BinaryIO, kind: str, **fields: Any) -> None:
    out.write(jobpipe.encode(kind, **fields))
    out.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lkrun.child.framework.inference_proc")
    parser.add_argument("--socket", required=True)
    parser.add_argument("--runner", action="append", default=[], metavar="METHOD=SOURCE:CLASS")
    parser.add_argument("--daemon-pid", type=int)
    args = parser.parse_args(argv)

    pdeathsig.set_parent_death_signal(signal.SIGTERM, args.daemon_pid)
    # stdout is the daemon's channel: what runners print goes to the log (stderr).
    out = os.fdopen(os.dup(1), "wb")
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path.insert(0, os.getcwd())

    started = time.perf_counter()
    runners: dict[str, _InferenceRunner] = {}
    failed: dict[str, str] = {}
    for item in args.runner:
        method, _, source = item.partition("=")
        try:
            runner = load_runner(method, source)
            runner.initialize()
        except (Exception, SystemExit) as exc:  # one broken runner does not stop the others
            traceback.print_exc()
            failed[method] = one_line(f"{source}: {describe(exc)}", 500)
            print(f"lkrun inference: runner {method} failed: {failed[method]}", file=sys.stderr)
            continue
        runners[method] = runner
    server = InferenceServer(runners, failed, out)
    sock = bind(args.socket)
    _send(
        out,
        READY,
        pid=os.getpid(),
        runners=sorted(runners),
        failed=failed,
        seconds=round(time.perf_counter() - started, 3),
        files=_files_of(runners.values()),
    )
    try:
        asyncio.run(serve(sock, server))
    finally:
        server.pool.shutdown(wait=False, cancel_futures=True)
    # A runner's thread may still be busy: do not wait for it.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
