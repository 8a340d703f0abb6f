"""Supervisor side of one job subprocess: start it, speak the pipe protocol, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lkrun.manifest import find_program
from lkrun.shared import jobpipe, pdeathsig
from lkrun.supervision.lifecycle import Asked, Cause, Done, Facts

TERM_GRACE = 2.0  # after SIGTERM to the group, before SIGKILL
LOG_CHUNK = 65536


class LaunchError(OSError):
    """No job process could be started; the text is the job's error as it stands."""


class Writer(Protocol):
    def write(self, data: bytes) -> None: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...


@dataclass
class Launched:
    """A started job process, as its supervisor sees it."""

    pid: int
    stdin: Writer
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader
    wait: Callable[[], Awaitable[int | None]]  # exit code; None if it cannot be known
    close: Callable[[], None]  # release the daemon's ends of the pipes, once it has exited


class Launcher(Protocol):
    """Starts one job process: a fresh interpreter, or a fork of the agent's zygote.

    ``role`` is the runner's: "job", or "requests" for the agent's request process.
    """

    async def __call__(self, role: str = "job") -> Launched: ...


@dataclass(frozen=True)
class AppSpec:
    """What a job process loads: the agent's entrypoint, prewarm and the API they use."""

    entrypoint: str
    prewarm: str = ""
    framework: str = "auto"  # lkrun.child.apps: lkrun | livekit-agents | auto
    python: str = ""  # the agent's interpreter (manifest ``python``); "": the daemon's


def python_command(module: str, app: AppSpec, *extra: str) -> list[str]:
    """``python -m module`` for one agent: a runner (one job) or a zygote (its fork server),
    under the agent's interpreter."""
    command = [app.python or sys.executable, "-m", module, "--entrypoint", app.entrypoint]
    command += ["--framework", app.framework, "--daemon-pid", str(os.getpid()), *extra]
    return command + (["--prewarm", app.prewarm] if app.prewarm else [])


class SpawnLauncher:
    """``python -m lkrun.child.runner`` in a new interpreter (``start_method = "spawn"``)."""

    def __init__(self, *, app: AppSpec, cwd: Path, env: Mapping[str, str]):
        self.app = app
        self.cwd = cwd
        self.env = dict(env)

    async def __call__(self, role: str = "job") -> Launched:
        proc = await asyncio.create_subprocess_exec(
            *python_command("lkrun.child.runner", self.app, "--role", role),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,  # its own group, so stop() reaches what user code started
            limit=jobpipe.MAX_LINE,
        )
        assert proc.stdin and proc.stdout and proc.stderr
        return Launched(proc.pid, proc.stdin, proc.stdout, proc.stderr, proc.wait, proc.stdin.close)


class CommandLauncher:
    """An agent's own program (manifest ``command``) that speaks the job pipe protocol.

    As a runner is: in its own session and process group, given the job's environment,
    in the manifest's directory, and sent SIGTERM when the daemon dies (Linux; stdin EOF
    tells it everywhere), so no job outlives its daemon.
    """

    def __init__(self, *, command: Sequence[str], cwd: Path, env: Mapping[str, str]):
        self.command = tuple(command)
        self.cwd = cwd
        self.env = dict(env)

    async def __call__(self, role: str = "job") -> Launched:
        if role != "job":  # only a livekit-agents app answers job requests
            raise LaunchError(f"a command agent has no {role} process")
        program, problem = find_program(self.command[0], self.env.get("PATH"))
        if problem:
            raise LaunchError(f"cannot start {self.command[0]}: {problem}")
        proc = await asyncio.create_subprocess_exec(
            program,
            *self.command[1:],
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,  # its own group, so stop() reaches what it started
            preexec_fn=pdeathsig.preexec(signal.SIGTERM),
            limit=jobpipe.MAX_LINE,
        )
        assert proc.stdin and proc.stdout and proc.stderr
        return Launched(proc.pid, proc.stdin, proc.stdout, proc.stderr, proc.wait, proc.stdin.close)


class JobProcess:
    """One job's process (see lkrun.child.runner), in its own process group."""

    def __init__(
        self,
        *,
        launcher: Launcher,
        log: logging.LoggerAdapter[Any],
        on_running: Callable[[], None] | None = None,
    ) -> None:
        self.launcher = launcher
        self.running_at: float | None = None  # wall clock when the entrypoint was called
        self.log = log
        self.on_running = on_running
        self.sink: Callable[[str], None] | None = None  # the job's own log file
        # Messages beyond the job protocol (a request process's answers).
        self.on_message: Callable[[dict[str, Any]], None] | None = None
        # Told why each line the protocol drops was dropped (lkrun.conformance lists them).
        self.on_violation: Callable[[str], None] | None = None
        self.ready_message: dict[str, Any] | None = None  # as received: its version, warm
        self.pid: int | None = None
        self.ready = asyncio.Event()
        self.start_sent = False
        self.load_timed_out = False  # wait_ready killed it: not ready within its timeout
        self.started_running = False
        self._proc: Launched | None = None
        self._waiter: asyncio.Task[Facts] | None = None
        self._done: dict[str, Any] | None = None
        # What was asked of it to end it, in order (lifecycle.conclude judges them).
        self._asked: list[Asked] = []
        self._killing = False  # a kill is under way
        self._last_log_line = ""
        self._exited = asyncio.Event()  # exited, and its pipes read to their end
        self._exit_known = False  # its exit code is known (its pipes may still be open)
        # Killing a process the daemon will not talk to; _supervise awaits it.
        self._refusal: asyncio.Task[None] | None = None
        self._running_timer: asyncio.TimerHandle | None = None  # start -> running

    async def spawn(self) -> None:
        """Start the process; OSError (LaunchError with the job's error) if it cannot be."""
        self._proc = proc = await self.launcher()
        self.pid = proc.pid
        self._waiter = asyncio.create_task(
            self._supervise(self._read_protocol(proc.stdout), self._read_log(proc.stderr))
        )

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    @property
    def being_killed(self) -> bool:
        return self._killing

    @property
    def asked(self) -> tuple[Asked, ...]:
        """What was asked of it to end it so far."""
        return tuple(self._asked)

    @property
    def done_message(self) -> dict[str, Any] | None:
        """The job's ``done`` as received, if it sent one."""
        return self._done

    def bind(
        self,
        log: logging.LoggerAdapter[Any],
        on_running: Callable[[], None] | None,
        sink: Callable[[str], None] | None = None,
    ) -> None:
        """Give a (maybe prewarmed) process its job's logger, log file and callbacks."""
        self.log = log
        self.on_running = on_running
        self.sink = sink

    def start(self, *, running_timeout: float = 0.0, **payload: Any) -> None:
        """Send the job. A start the protocol cannot carry (over ``jobpipe.MAX_LINE``: the
        room's or the participant's metadata and attributes are not capped) fails the job
        and ends the process, which would otherwise wait for it, holding the job's slot.
        With ``running_timeout``, a process that has not reported ``running`` that long
        after its start is killed and the job fails."""
        line = jobpipe.encode(jobpipe.START, protocol=jobpipe.PROTOCOL, **payload)
        if len(line) > jobpipe.MAX_LINE:
            self._refuse(
                f"the job's start message is {len(line)} bytes, over the job protocol's limit "
                f"of {jobpipe.MAX_LINE} (docs/protocol.md): the room's, the dispatch's or the "
                "participant's metadata or attributes are too large"
            )
            return
        self.start_sent = True
        self._write(line)
        if running_timeout > 0:
            self._running_timer = asyncio.get_running_loop().call_later(
                running_timeout, self._not_running, running_timeout
            )

    def _not_running(self, timeout: float) -> None:
        if not (self.started_running or self.exited or self._asked):  # a stop has its own
            self._refuse(f"job process did not report running within {timeout:g}s of its start")

    def drain(self) -> None:
        self._send(jobpipe.DRAIN)

    def send(self, kind: str, **fields: Any) -> bool:
        """Send a message; False if the process is not there to read it."""
        if self._proc is None or self._proc.stdin.is_closing():
            return False
        self._send(kind, **fields)
        return True

    async def wait(self) -> Facts:
        """Wait for the process to exit and its pipes to drain; never raises for job faults.
        What it says of the job's end, lifecycle.conclude judges."""
        assert self._waiter is not None
        return await asyncio.shield(self._waiter)

    async def _supervise(self, *readers: Any) -> Facts:
        assert self._proc is not None
        tasks = [asyncio.create_task(r) for r in readers]
        try:
            returncode = await self._proc.wait()
            self._exit_known = True
            # The job is over with its leader: what it started goes too (it would hold the
            # job's pipes and memory, unseen). The group keeps the leader's id while any
            # member is left, and the leader's pid is free again only after this check.
            self._signal_group(signal.SIGKILL)
            # A grandchild that left the group may hold the pipes open: don't wait for it.
            await asyncio.wait(tasks, timeout=TERM_GRACE)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._proc.close()
            self._exited.set()
            if self._running_timer is not None:
                self._running_timer.cancel()
            if self._refusal is not None:  # it ends now that _exited is set; its errors surface
                await self._refusal
        return self._facts(returncode)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until the runner has loaded the entrypoint; False if it exited or timed out."""
        ready = asyncio.ensure_future(self.ready.wait())
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait(
                {ready, exited}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            exited.cancel()
        if self.ready.is_set():
            return True
        if not self.exited:
            self.load_timed_out = True
            why = f"job process did not load its entrypoint within {timeout:g}s"
            await self.kill(why, cause=Cause.START_FAILED)
        return False

    def ask(self, asked: Asked, timeout: float) -> Coroutine[Any, Any, None]:
        """Take ``asked`` now, and return what carries it out: a stop (the kill after
        ``timeout``) or, with ``asked.force``, the kill.

        The ask counts from this call, not from when the returned coroutine runs: by then
        the process may have died on its own (a segfault), and an ask taken after its exit
        would pass for the cause of its end.
        """
        assert self._proc is not None, "ask() before spawn()"
        self._ask(asked)
        if asked.force:
            return self._kill_now(asked.reason)
        return self._stop(asked.reason, timeout, asked.cause)

    async def stop(self, reason: str, timeout: float, *, cause: Cause = Cause.DRAIN) -> None:
        """Ask the job to end; after ``timeout`` seconds end its process group by force.

        ``cause`` says why, for the job's verdict (a process with no job leaves the
        default: the daemon retiring it). Only for a spawned process: a stop before that
        is the supervisor's to keep.
        """
        assert self._proc is not None, "stop() before spawn()"
        await self.ask(Asked(cause, reason), timeout)

    async def kill(self, why: str, *, cause: Cause = Cause.DRAIN) -> None:
        """SIGTERM the group, then SIGKILL it if anything is left (``cause`` as for stop)."""
        assert self._proc is not None, "kill() before spawn()"
        await self.ask(Asked(cause, why, force=True), 0.0)

    async def _stop(self, reason: str, timeout: float, cause: Cause) -> None:
        if self.exited:
            return
        self._send(jobpipe.SHUTDOWN, reason=reason)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exited.wait(), timeout)
            return
        why = f"did not stop within {timeout:g}s of a shutdown request ({reason})"
        await self.kill(why, cause=cause)

    def _ask(self, asked: Asked) -> None:
        # Once the job has reported its end, an ask is not why it ended (LiveKit terminates
        # a job that just left its room; a stop may cross the job's done on the pipe). Nor
        # once its exit code is known: its pipes may take TERM_GRACE more to close (a
        # grandchild holding them), and a stop then must not pass for why it died.
        if self._done is None and not self._exit_known:
            self._asked.append(asked)

    async def _kill_now(self, why: str) -> None:
        if self.exited:  # its pid may be another process's by now
            return
        self._killing = True
        self.log.warning("killing job process %s: %s", self.pid, why)
        self._signal_group(signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exited.wait(), TERM_GRACE)
            return
        self._signal_group(signal.SIGKILL)
        await self._exited.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.pid is not None
        pdeathsig.signal_group(self.pid, sig)

    def _send(self, kind: str, **fields: Any) -> None:
        self._write(jobpipe.encode(kind, **fields))

    def _write(self, line: bytes) -> None:
        if self._proc is None or self._proc.stdin.is_closing():
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._proc.stdin.write(line)

    def _facts(self, returncode: int | None) -> Facts:
        return Facts(
            asked=tuple(self._asked),
            exit_code=returncode,
            running=self.started_running,
            done=Done.parse(self._done) if self._done is not None else None,
            last_log_line=self._last_log_line,
        )

    async def _read_protocol(self, stream: asyncio.StreamReader) -> None:
        def warn(why: str) -> None:
            self.log.warning("job process broke the pipe protocol: %s", why)
            if self.on_violation is not None:
                self.on_violation(why)

        await jobpipe.read_messages(stream, self._on_message, warn)

    def _on_message(self, msg: dict[str, Any]) -> None:
        """Each kind once, in the protocol's order: ready, then running, then done."""
        kind = msg["type"]
        if kind == jobpipe.READY:
            if self.ready_message is not None:
                raise jobpipe.PipeError("ready came twice")
            self.ready_message = msg
            if not jobpipe.speaks_ours(msg):  # it would misread what we send: no job for it
                self._refuse(
                    f"job process speaks job protocol {msg.get('protocol')!r}; this lkrun "
                    f"speaks {jobpipe.PROTOCOL} (docs/protocol.md)"
                )
                return
            self.ready.set()
        elif kind == jobpipe.RUNNING:
            if not (self.ready.is_set() and self.start_sent) or self.started_running:
                raise jobpipe.PipeError("running came before its start, or twice")
            ts = msg.get("ts")
            self.running_at = float(ts) if isinstance(ts, (int, float)) else None
            self.started_running = True
            if self.on_running is not None:
                self.on_running()
        elif kind == jobpipe.DONE:
            if self._done is not None:
                raise jobpipe.PipeError("done came twice")
            self._done = msg
        elif self.on_message is not None:
            self.on_message(msg)

    def _refuse(self, why: str) -> None:
        """End a process the daemon cannot talk to; its job fails with ``why``."""
        if self._refusal is None and not self.exited:
            # Asked now, not when the task runs: the process may exit before that.
            self._asked.append(Asked(Cause.START_FAILED, why, force=True))
            self._refusal = asyncio.create_task(self._kill_now(why), name=f"kill {self.pid}")

    async def _read_log(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        while chunk := await stream.read(LOG_CHUNK):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > LOG_CHUNK:  # a line with no end in sight: log it in pieces
                lines.append(pending)
                pending = b""
            for raw in lines:
                self._log_line(raw)
        if pending:
            self._log_line(pending)

    def _log_line(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        if line:
            self._last_log_line = line
            self.log.info("%s", line)
            if self.sink is not None:
                self.sink(line)
