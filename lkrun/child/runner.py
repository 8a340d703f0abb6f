"""Child side of a job: ``python -m lkrun.child.runner --entrypoint pkg.module:function``.

The daemon starts one of these per job (``start_method = "spawn"``), or the agent's fork
server (lkrun.child.zygote) forks one and calls ``become_job_process`` and ``run_job``. Either way
the job process has the entrypoint's module loaded, says ``ready``, waits for ``start`` on
stdin, runs the entrypoint, and reports ``running`` and ``done`` on the real stdout. User
code's ``print()`` goes to stderr, the job's log. EOF on stdin means the daemon is gone:
the job ends.

With ``--role requests`` the process runs no job: it answers ``request`` messages with the
agent's request function (a livekit-agents ``on_request``) until shut down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, BinaryIO

from lkrun.child import appkind, apps, kinds
from lkrun.shared import jobpipe, pdeathsig
from lkrun.shared.text import describe

log = logging.getLogger("lkrun.child.runner")

# What a process started for an agent does: run one job, or answer the agent's job requests.
JOB = "job"
REQUESTS = "requests"
ROLES = (JOB, REQUESTS)
ORPHAN_GRACE = 1.0  # how long an orphaned job may take to wrap up before it exits


class Pipe:
    """The protocol channel: private copies of the stdout and stdin the daemon gave us."""

    def __init__(self, out: BinaryIO, in_fd: int = 0) -> None:
        self._out = out
        self.in_fd = in_fd

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


def take_protocol_stdin() -> int:
    """Keep the daemon's pipe on a private descriptor; fd 0 becomes /dev/null.

    Whatever user code starts inherits fd 0 (ffmpeg reads it by default): on the daemon's
    pipe it could swallow a shutdown or drain message. The private copy is not inherited.
    """
    proto_fd = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return proto_fd


class JobRun:
    """Drives one job: reads the daemon's messages and runs the app's job."""

    def __init__(self, pipe: Pipe, app: appkind.App) -> None:
        self.pipe = pipe
        self.app = app
        self.job: appkind.Job | None = None
        self.start_msg: asyncio.Future[dict[str, Any]] = asyncio.Future()
        self.orphaned = False
        self.draining = False  # a drain may be announced before the job starts
        self.stop_reason: str | None = None  # a shutdown that came before the job did
        self.requests: appkind.Requests | None = None  # in the agent's request process
        # The agent's shutdown_timeout, from the start message: the daemon kills the job
        # after that long, so no cleanup step may wait longer.
        self.cleanup_timeout = appkind.SHUTDOWN_CALLBACK_TIMEOUT

    async def read_stdin(self, reader: asyncio.StreamReader) -> None:
        await jobpipe.read_messages(reader, self.handle, lambda why: log.warning("daemon: %s", why))
        self.orphaned = True
        self.request_shutdown("daemon went away")

    def handle(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == jobpipe.START and not self.start_msg.done():
            self.start_msg.set_result(msg)
        elif kind == jobpipe.SHUTDOWN:
            self.request_shutdown(str(msg.get("reason", "")))
        elif kind == jobpipe.DRAIN:
            self.draining = True
            if self.job is not None:
                self.job.drain()
        elif kind == jobpipe.REQUEST and self.requests is not None:
            self.requests.handle(msg)

    def request_shutdown(self, reason: str) -> None:
        if self.job is not None:
            self.job.shutdown(reason)
        elif not self.start_msg.done():
            self.start_msg.set_exception(_NotStarted(reason))
        else:  # started, but run() has not made the job yet
            self.stop_reason = reason

    async def run(self) -> bool:
        """Wait for start, run the job, return whether it succeeded."""
        try:
            start = await self.start_msg
        except _NotStarted as exc:
            log.info("shut down before the job started: %s", exc)
            return True
        if not jobpipe.speaks_ours(start):  # it would mean something else by what it sent
            version = start.get("protocol")
            error = f"the daemon speaks job protocol {version!r}; this runner {jobpipe.PROTOCOL}"
            self.pipe.send(jobpipe.DONE, ok=False, error=error, reason="")
            return False
        logger = logging.getLogger(f"lkrun.job.{start.get('agent', 'agent')}")
        timeout = start.get("shutdown_timeout")
        if isinstance(timeout, (int, float)) and timeout > 0:
            self.cleanup_timeout = float(timeout)
        try:
            self.job = job = self.app.new_job(start, logger)
        except Exception as exc:
            log.error("cannot set up the job", exc_info=exc)
            error = f"cannot set up the job: {describe(exc)}"
            self.pipe.send(jobpipe.DONE, ok=False, error=error, reason="")
            return False
        if self.draining:
            job.drain()
        if self.stop_reason is not None:
            job.shutdown(self.stop_reason)
        self.pipe.send(jobpipe.RUNNING, ts=time.time())
        result = await job.run(self.grace)
        log.info("job ended: %s", result.reason)
        error, reason = with_credentials_hint(result.error), jobpipe.cap(result.reason)
        # The room the join made anew, as data: the daemon may delete it (lkrun.rooms).
        gone = {"room_gone": result.room_gone.fields()} if result.room_gone else {}
        cause = {"cause": result.cause} if result.cause else {}  # e.g. room_empty
        self.pipe.send(jobpipe.DONE, ok=result.ok, error=error, reason=reason, **gone, **cause)
        return result.ok

    def grace(self) -> float:
        """How long the job's cleanup may take: short once the daemon is gone."""
        return ORPHAN_GRACE if self.orphaned else self.cleanup_timeout


class _NotStarted(Exception):
    pass


CREDENTIALS = ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
CREDENTIALS_HINT = (
    " (the job has no LiveKit credentials: set pass_credentials = true in the agent's "
    "manifest entry)"
)
# LiveKit's texts name the parameter (api_key) or the variable; "Deepgram API key" is not ours.
_API_KEY_WORDS = re.compile(r"\bapi_(key|secret)\b|\bLIVEKIT_API_(KEY|SECRET)\b")
_OTHER_KEY = re.compile(r"\b(?!LIVEKIT_)[A-Z][A-Z0-9]*_API_(KEY|SECRET)\b")


def with_credentials_hint(error: str, env: Mapping[str, str] = os.environ) -> str:
    """``error`` (capped), saying how to fix it in lkrun's terms when it is about LiveKit's
    API key and the job was given none: the framework's own text tells the user to set an
    environment variable, which the daemon has but passes on only with pass_credentials.
    An error naming another service's key (OPENAI_API_KEY...) is left as it is."""
    about_ours = _API_KEY_WORDS.search(error) and not _OTHER_KEY.search(error)
    if not about_ours or all(env.get(name) for name in CREDENTIALS):
        return jobpipe.cap(error)
    return jobpipe.cap(error, jobpipe.MAX_TEXT - len(CREDENTIALS_HINT)) + CREDENTIALS_HINT


async def _protocol_reader(fd: int) -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=jobpipe.MAX_LINE)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
    )
    return reader


async def serve_job(pipe: Pipe, app: appkind.App, role: str = JOB) -> int:
    run = JobRun(pipe, app)
    reader_task = asyncio.ensure_future(run.read_stdin(await _protocol_reader(pipe.in_fd)))
    try:
        if role == REQUESTS:
            return await _serve_requests(run)
        # Everything slow happens before READY, so a warm process starts its job at once.
        _preload_rtc()
        try:
            await app.prepare()
        except Exception as exc:
            log.error("prewarm failed", exc_info=exc)
            error = with_credentials_hint(f"prewarm failed: {describe(exc)}")
            pipe.send(jobpipe.DONE, ok=False, error=error)
            return 1
        # warm: this process waits for its start for as long as it takes (docs/protocol.md).
        ready = {"protocol": jobpipe.PROTOCOL, "pid": os.getpid(), "ts": time.time()}
        pipe.send(jobpipe.READY, **ready, warm=True)
        ok = await run.run()
    finally:
        reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader_task
    return 0 if ok else 1


async def _serve_requests(run: JobRun) -> int:
    """The agent's request process: answer job requests until the daemon says stop."""
    try:
        server = run.app.request_server(run.pipe)
    except appkind.AppError as exc:  # an app kind without a request function
        run.pipe.send(jobpipe.DONE, ok=False, error=str(exc))
        return 1
    run.requests = server
    run.pipe.send(jobpipe.READY, protocol=jobpipe.PROTOCOL, pid=os.getpid(), ts=time.time())
    with contextlib.suppress(_NotStarted):
        await run.start_msg  # a shutdown (or stdin EOF) ends this process
    await server.close(run.grace())
    return 0


def _preload_rtc() -> None:
    """Start the rtc native library (~15 ms) ahead of the job."""
    try:
        from livekit.rtc._ffi_client import FfiClient
    except ImportError:  # a private module: if it moves, the first connect pays instead
        return
    FfiClient.instance  # noqa: B018  the property starts the library


class QuietRtc(logging.Filter):
    """Drops what livekit-rtc logs below WARNING through the root logger.

    Some of its messages bypass the "livekit" logger: a job in a room with an AgentSession
    would log "ignoring byte stream with topic 'lk.agent.session'" ten times a second.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        rtc = record.name == "root" and f"{os.sep}livekit{os.sep}rtc{os.sep}" in record.pathname
        return not rtc or record.levelno >= logging.WARNING


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(QuietRtc())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(os.environ.get("LKRUN_JOB_LOG_LEVEL", "INFO").upper())
    # The rtc SDK logs every connection step at INFO; keep the job log about the job. The
    # framework and its plugins log what their users expect to see: at the job's level.
    logging.getLogger("livekit").setLevel(logging.WARNING)
    for name in ("livekit.agents", "livekit.plugins"):
        logging.getLogger(name).setLevel(root.level)


def kill_group_on_sigterm() -> None:
    """SIGTERM (from the daemon, or the parent-death signal) ends the job's whole process group.

    The runner leads its own process group, so whatever user code started goes too.
    """

    def handler(signum: int, frame: Any) -> None:
        if os.getpgid(0) == os.getpid():  # only a group we lead, never the caller's
            pdeathsig.signal_group(os.getpid(), signal.SIGKILL)
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
    """The agent's app cannot be loaded; the text says which part and why."""


def load(entrypoint: str, prewarm: str | None, framework: str) -> appkind.App:
    """Import the agent's module(s); LoadError (traceback on stderr) if that fails."""
    loaded: dict[str, Any] = {}
    for what, spec in (("entrypoint", entrypoint), ("prewarm", prewarm)):
        try:
            loaded[what] = apps.load_target(spec) if spec else None
        except Exception as exc:
            traceback.print_exc()
            raise LoadError(f"cannot load {what} {spec}: {describe(exc)}") from exc
    try:
        return kinds.make_app(entrypoint, loaded["entrypoint"], loaded["prewarm"], framework)
    except appkind.AppError as exc:
        raise LoadError(str(exc)) from exc


def become_job_process(parent: int | None) -> Pipe:
    """Set up this process to serve one job; returns the protocol pipe (the real stdout)."""
    pipe = Pipe(take_protocol_stdout(), take_protocol_stdin())
    kill_group_on_sigterm()
    # Linux: SIGTERM when the parent dies, even by SIGKILL (stdin EOF is the portable path).
    pdeathsig.set_parent_death_signal(signal.SIGTERM, parent)
    setup_logging()
    return pipe


def run_job(pipe: Pipe, app: appkind.App, role: str = JOB) -> int:
    return _run_loop(serve_job(pipe, app, role))


def add_app_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments the runner and the fork server share (see job_process.python_command)."""
    parser.add_argument("--entrypoint", required=True)
    parser.add_argument("--prewarm")
    parser.add_argument(
        "--framework", choices=(appkind.AUTO, *appkind.FRAMEWORKS), default=appkind.AUTO
    )
    parser.add_argument("--daemon-pid", type=int)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lkrun.child.runner")
    add_app_arguments(parser)
    parser.add_argument("--role", choices=ROLES, default=JOB)
    args = parser.parse_args(argv)

    close_inherited_fds()
    pipe = become_job_process(args.daemon_pid)
    sys.path.insert(0, os.getcwd())
    try:
        app = load(args.entrypoint, args.prewarm, args.framework)
    except LoadError as exc:
        pipe.send(jobpipe.DONE, ok=False, error=str(exc))
        return 1
    return run_job(pipe, app, args.role)


def _run_loop(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
