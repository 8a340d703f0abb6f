"""Child side of a job: ``python -m lkrun.runner --entrypoint pkg.module:function``.

The daemon starts one of these per job (``start_method = "spawn"``), or the agent's fork
server (lkrun.zygote) forks one and calls ``become_job_process`` and ``run_job``. Either way
the job process has the entrypoint's module loaded, says ``ready``, waits for ``start`` on
stdin, runs the entrypoint, and reports ``running`` and ``done`` on the real stdout. User
code's ``print()`` goes to stderr, the job's log. EOF on stdin means the daemon is gone:
the job ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, BinaryIO

from lkrun import jobpipe, pdeathsig

log = logging.getLogger("lkrun.runner")

SHUTDOWN_CALLBACK_TIMEOUT = 10.0
ORPHAN_GRACE = 1.0  # how long an orphaned job may take to wrap up before it exits


class Pipe:
    """The protocol channel: writes to the real stdout, reads stdin lines."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out

    def send(self, kind: str, **fields: Any) -> None:
        try:
            self._out.write(jobpipe.encode(kind, **fields))
            self._out.flush()
        except (BrokenPipeError, ValueError):
            pass  # the daemon is gone; stdin EOF will end the job


def take_protocol_stdout() -> BinaryIO:
    """Keep fd 1 for protocol messages only, and send everything else printed to stderr."""
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # C extensions and subprocesses writing to fd 1 land in the log
    sys.stdout = sys.stderr
    return os.fdopen(proto_fd, "wb", buffering=0)


def load_entrypoint(spec: str) -> Callable[..., Any]:
    module_name, _, func_name = spec.partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name)
    if not callable(func):
        raise TypeError(f"{spec} is not callable")
    return func


def describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())  # one line, for jobs ls and UpdateJobStatus


class JobRun:
    """Drives one job: reads the daemon's messages and runs the entrypoint."""

    def __init__(self, pipe: Pipe, entrypoint: Callable[..., Any], userdata: Any) -> None:
        self.pipe = pipe
        self.entrypoint = entrypoint
        self.userdata = userdata
        self.ctx: Any = None  # JobContext once started
        self.start_msg: asyncio.Future[dict[str, Any]] = asyncio.Future()
        self.orphaned = False
        self.draining = False  # a drain may be announced before the job starts
        self.stop_reason: str | None = None  # a shutdown that came before the context did

    async def read_stdin(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                msg = jobpipe.decode(line)
            except jobpipe.PipeError as exc:
                log.warning("ignoring bad message from daemon: %s", exc)
                continue
            self.handle(msg)
        self.orphaned = True
        self.request_shutdown("daemon went away")

    def handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == jobpipe.PING:
            self.pipe.send(jobpipe.PONG, ts=msg.get("ts"))
        elif kind == jobpipe.START and not self.start_msg.done():
            self.start_msg.set_result(msg)
        elif kind == jobpipe.SHUTDOWN:
            self.request_shutdown(str(msg.get("reason", "")))
        elif kind == jobpipe.DRAIN:
            self.draining = True
            if self.ctx is not None:
                self.ctx._start_drain()

    def request_shutdown(self, reason: str) -> None:
        if self.ctx is not None:
            self.ctx.shutdown(reason)
        elif not self.start_msg.done():
            self.start_msg.set_exception(_NotStarted(reason))
        else:  # started, but run() has not made the context yet
            self.stop_reason = reason

    async def run(self) -> bool:
        """Wait for start, run the job, return whether it succeeded."""
        try:
            start = await self.start_msg
        except _NotStarted as exc:
            log.info("shut down before the job started: %s", exc)
            return True
        from lkrun.context import JobContext, JobInfo  # already imported before READY

        self.ctx = JobContext(
            job=JobInfo.from_dict(start["job"]),
            url=start["url"],
            token=start["token"],
            identity=start["identity"],
            logger=logging.getLogger(f"lkrun.job.{start.get('agent', 'agent')}"),
            userdata=self.userdata,
        )
        if self.draining:
            self.ctx._start_drain()
        if self.stop_reason is not None:
            self.ctx.shutdown(self.stop_reason)
        return await self._run_job(self.ctx)

    async def _run_job(self, ctx: Any) -> bool:
        entry = asyncio.ensure_future(_call(self.entrypoint, ctx))
        self.pipe.send(jobpipe.RUNNING, ts=time.time())
        stop = asyncio.ensure_future(ctx.wait_for_shutdown())
        await asyncio.wait({entry, stop}, return_when=asyncio.FIRST_COMPLETED)
        error = ""
        if entry.done():
            if entry.exception() is not None:
                exc = entry.exception()
                log.error("entrypoint failed", exc_info=exc)
                error = describe(exc)
                ctx.shutdown(f"entrypoint failed: {error}")
            elif not ctx.room.isconnected():
                ctx.shutdown("entrypoint returned")
            await stop  # returns at once unless the room is still connected
        grace = ORPHAN_GRACE if self.orphaned else SHUTDOWN_CALLBACK_TIMEOUT
        await ctx._run_shutdown_callbacks(grace)
        if not entry.done():
            entry.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await entry
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ctx.room.disconnect(), grace)
        log.info("job ended: %s", ctx.shutdown_reason)
        self.pipe.send(jobpipe.DONE, ok=not error, error=error, reason=ctx.shutdown_reason)
        return not error


class _NotStarted(Exception):
    pass


async def _call(func: Callable[..., Any], *args: Any) -> Any:
    result = func(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=jobpipe.MAX_LINE)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0)
    )
    return reader


async def serve_job(
    pipe: Pipe, entrypoint: Callable[..., Any], prewarm: Callable[..., Any] | None
) -> int:
    run = JobRun(pipe, entrypoint, None)
    reader_task = asyncio.ensure_future(run.read_stdin(await _stdin_reader()))
    try:
        # Everything slow happens before READY, so a warm process starts its job at once.
        _preload_rtc()

        if prewarm is not None:
            try:
                run.userdata = await _call(prewarm)
            except Exception as exc:
                log.error("prewarm failed", exc_info=exc)
                pipe.send(jobpipe.DONE, ok=False, error=f"prewarm failed: {describe(exc)}")
                return 1
        pipe.send(jobpipe.READY, pid=os.getpid(), ts=time.time())
        ok = await run.run()
    finally:
        reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader_task
    return 0 if ok else 1


def _preload_rtc() -> None:
    """Import livekit.rtc and start its native library (~15 ms) ahead of the job."""
    import lkrun.context  # noqa: F401

    try:
        from livekit.rtc._ffi_client import FfiClient
    except ImportError:  # a private module: if it moves, the first connect pays instead
        return
    FfiClient.instance  # noqa: B018  the property starts the library


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(os.environ.get("LKRUN_JOB_LOG_LEVEL", "INFO").upper())
    # The rtc SDK logs every connection step at INFO; keep the job log about the job.
    logging.getLogger("livekit").setLevel(logging.WARNING)


def kill_group_on_sigterm() -> None:
    """SIGTERM (from the daemon, or the parent-death signal) ends the job's whole process group.

    The runner leads its own process group, so whatever user code started goes too.
    """

    def handler(signum: int, frame: Any) -> None:
        if os.getpgid(0) == os.getpid():  # only a group we lead, never the caller's
            os.killpg(os.getpid(), signal.SIGKILL)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def close_inherited_fds(*keep: int) -> None:
    """Close every fd above 2 but ``keep``: what the daemon's event loop let through.

    uvloop's spawn passes a few of its own fds on; a job must not hold them (a daemon-side
    pipe that never sees EOF), nor pass them to whatever it starts.
    """
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: the usual limit
        fds = list(range(3, min(os.sysconf("SC_OPEN_MAX"), 65536)))
    for fd in fds:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


class LoadError(Exception):
    """The entrypoint or prewarm function cannot be loaded; the text says which and why."""


def load_functions(
    entrypoint: str, prewarm: str | None
) -> tuple[Callable[..., Any], Callable[..., Any] | None]:
    """Import the agent's module(s); LoadError (traceback on stderr) if that fails."""
    loaded: list[Callable[..., Any] | None] = []
    for what, spec in (("entrypoint", entrypoint), ("prewarm", prewarm)):
        try:
            loaded.append(load_entrypoint(spec) if spec else None)
        except Exception as exc:
            traceback.print_exc()
            raise LoadError(f"cannot load {what} {spec}: {describe(exc)}") from exc
    entry, warm = loaded
    assert entry is not None
    return entry, warm


def become_job_process(parent: int | None) -> Pipe:
    """Set up this process to serve one job; returns the protocol pipe (the real stdout)."""
    pipe = Pipe(take_protocol_stdout())
    kill_group_on_sigterm()
    # Linux: SIGTERM when the parent dies, even by SIGKILL (stdin EOF is the portable path).
    pdeathsig.set_parent_death_signal(signal.SIGTERM, parent)
    setup_logging()
    return pipe


def run_job(pipe: Pipe, entrypoint: Callable[..., Any], prewarm: Callable[..., Any] | None) -> int:
    return _run_loop(serve_job(pipe, entrypoint, prewarm))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lkrun.runner")
    parser.add_argument("--entrypoint", required=True)
    parser.add_argument("--prewarm")
    parser.add_argument("--daemon-pid", type=int)
    args = parser.parse_args(argv)

    close_inherited_fds()
    pipe = become_job_process(args.daemon_pid)
    sys.path.insert(0, os.getcwd())
    try:
        entrypoint, prewarm = load_functions(args.entrypoint, args.prewarm)
    except LoadError as exc:
        pipe.send(jobpipe.DONE, ok=False, error=str(exc))
        return 1
    return run_job(pipe, entrypoint, prewarm)


def _run_loop(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
