"""The daemon's side of an agent's fork server (lkrun.child.zygote): start it, ask it for jobs.

A ``ForkServer`` is a job process Launcher: each call creates the job's three pipes, hands
the child's ends to the zygote over its control socket, and returns the daemon's ends once
the zygote reports the new pid. The zygote reaps the children, so their exit codes arrive
on the same socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lkrun.logs import agent_logger
from lkrun.shared import forkwire, jobpipe, pdeathsig
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe
from lkrun.supervision.job_process import AppSpec, Launched, LaunchError, python_command
from lkrun.supervision.stderr import relay_lines

log = logging.getLogger("lkrun.forkserver")

KILL_GRACE = 2.0


class ForkServer:
    """One zygote process for one agent's code; replaced (retired) when that code changes."""

    def __init__(
        self,
        *,
        label: str,
        app: AppSpec,
        cwd: Path,
        env: Mapping[str, str],
        load_timeout: float,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.log = agent_logger(log, label)
        self.on_change = on_change  # it loaded, failed to, or exited: readiness may differ
        self.loaded = False  # the running zygote has imported the module and forks at once
        self.app = app
        self.cwd = cwd
        self.env = dict(env)
        self.load_timeout = load_timeout
        self.retired = False
        self.error = ""  # why the last zygote could not load the agent's module
        self._last_line = ""  # of its stderr
        self._proc: asyncio.subprocess.Process | None = None
        self._sock: socket.socket | None = None
        self._starting = asyncio.Lock()
        self._next_id = 0
        # fork request -> (pid, its exit code to come)
        self._requests: dict[int, asyncio.Future[tuple[int, asyncio.Future[int | None]]]] = {}
        self._exits: dict[int, asyncio.Future[int | None]] = {}  # child pid -> exit code
        self._tasks = BackgroundTasks()
        self._ended = asyncio.Event()  # no zygote process is running
        self._ended.set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def loading(self) -> bool:
        """A zygote runs and is still importing the module: a fork now waits for that."""
        return self._proc is not None and not self.loaded and not self.error

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def start(self) -> None:
        """Start the zygote unless it runs; it loads the module while the daemon goes on."""
        async with self._starting:
            if self._proc is not None or self.retired:
                return
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *python_command(
                        "lkrun.child.zygote", self.app, "--control-fd", str(theirs.fileno())
                    ),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    cwd=self.cwd,
                    env=self.env,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                )
            except OSError:
                ours.close()
                raise
            finally:
                theirs.close()
            ours.setblocking(False)
            self._proc, self._sock, self.error, self.loaded = proc, ours, "", False
            self._ended.clear()
            asyncio.get_running_loop().add_reader(ours.fileno(), self._on_readable)
            self._tasks.spawn(self._supervise(proc))
            self.log.debug("fork server %s started for %s", proc.pid, self.app.entrypoint)
            if self.retired:  # retired while it was starting
                self._send_retire()

    async def __call__(self, role: str = "job") -> Launched:
        """Fork a job process; LaunchError if the zygote cannot (e.g. the module is broken)."""
        if self.retired:
            raise LaunchError("the agent's fork server was retired")
        if self._proc is not None and self._sock is None:
            # It is exiting (its socket closed): let it go, then start a new one.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._ended.wait(), 2 * KILL_GRACE)
        try:
            await self.start()
        except OSError as exc:
            raise LaunchError(f"cannot start the fork server: {exc}") from exc
        except Exception as exc:  # e.g. ValueError: a NUL byte in the environment
            raise LaunchError(f"cannot start the fork server: {describe(exc)}") from exc
        pipes: list[tuple[int, int]] = []
        try:
            for _ in range(3):
                pipes.append(os.pipe())
        except OSError as exc:  # out of fds
            for fd in (fd for pair in pipes for fd in pair):
                os.close(fd)
            raise LaunchError(f"cannot create the job's pipes: {exc}") from exc
        child_ends = [pipes[0][0], pipes[1][1], pipes[2][1]]  # stdin, stdout, stderr
        stdin, stdout, stderr = pipes[0][1], pipes[1][0], pipes[2][0]
        try:
            pid, exit_code = await self._fork(child_ends, role)
        except BaseException:
            for fd in (stdin, stdout, stderr):
                os.close(fd)
            raise
        finally:
            for fd in child_ends:
                os.close(fd)
        return await self._attach_or_kill(pid, exit_code, stdin, stdout, stderr)

    async def _attach_or_kill(
        self, pid: int, exit_code: asyncio.Future[int | None], *fds: int
    ) -> Launched:
        try:
            return await self._attach(pid, exit_code, *fds)
        except BaseException as exc:  # cancelled too: nobody else knows of this process
            pdeathsig.signal_group(pid, signal.SIGKILL)
            if isinstance(exc, OSError):
                raise LaunchError(f"cannot attach to forked job process {pid}: {exc}") from exc
            raise

    async def _fork(self, fds: list[int], role: str) -> tuple[int, asyncio.Future[int | None]]:
        if self._sock is None:  # it died since start()
            raise LaunchError(self.error or "the fork server exited")
        if self.retired:  # retired while it was starting
            raise LaunchError("the agent's fork server was retired")
        self._next_id += 1
        request = self._next_id
        answer: asyncio.Future[tuple[int, asyncio.Future[int | None]]]
        answer = asyncio.get_running_loop().create_future()
        self._requests[request] = answer
        try:
            try:
                packet = jobpipe.encode(forkwire.FORK, id=request, role=role)
                socket.send_fds(self._sock, [packet], fds)
            except OSError as exc:
                raise LaunchError(f"cannot reach the fork server: {exc}") from exc
            try:
                return await asyncio.wait_for(asyncio.shield(answer), self.load_timeout)
            except asyncio.TimeoutError:
                raise LaunchError(
                    f"the fork server did not load {self.app.entrypoint} within "
                    f"prewarm_timeout={self.load_timeout:g}s"
                ) from None
        finally:
            self._requests.pop(request, None)

    async def _attach(
        self,
        pid: int,
        exit_code: asyncio.Future[int | None],
        stdin: int,
        stdout: int,
        stderr: int,
    ) -> Launched:
        loop = asyncio.get_running_loop()
        readers = []
        transports: list[asyncio.BaseTransport] = []
        files = [os.fdopen(stdin, "wb", buffering=0)]
        files += [os.fdopen(fd, "rb", buffering=0) for fd in (stdout, stderr)]
        try:
            writer, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, files[0])
            transports.append(writer)
            for file in files[1:]:
                reader = asyncio.StreamReader(limit=jobpipe.MAX_LINE)
                transport, _ = await loop.connect_read_pipe(
                    lambda r=reader: asyncio.StreamReaderProtocol(r), file
                )
                transports.append(transport)
                readers.append(reader)
        except BaseException:
            for t in transports:
                t.close()
            for f in files[len(transports) :]:
                f.close()
            raise

        async def wait() -> int | None:
            return await asyncio.shield(exit_code)

        def close() -> None:
            for t in transports:
                t.close()

        return Launched(pid, writer, readers[0], readers[1], wait, close)  # type: ignore[arg-type]

    def retire(self) -> None:
        """Fork no more; the zygote exits once the jobs it forked have ended."""
        if self.retired:
            return
        self.retired = True
        self._send_retire()

    def _send_retire(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.send(jobpipe.encode(forkwire.RETIRE))

    async def close(self, timeout: float | None = None) -> None:
        """Retire, wait up to ``timeout`` for the jobs to end, then kill what is left."""
        self.retire()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._ended.wait(), timeout)
        proc = self._proc
        if proc is not None:
            # Its children die with it (parent-death signal), the way they die with the daemon.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await self._tasks.join()

    # -- the zygote's messages ---------------------------------------------------------------

    def _on_readable(self) -> None:
        sock = self._sock
        while sock is not None and sock is self._sock:
            try:
                data = sock.recv(forkwire.PACKET)
            except BlockingIOError:
                return
            except ConnectionResetError:
                # It exited with our fork request unread; Linux reports that once, before
                # the packets it sent (why it failed) that are still queued for us.
                continue
            except OSError:
                data = b""
            if not data:  # the zygote is exiting: no more forks from it
                self._close_socket()
                return
            try:
                self._on_message(jobpipe.decode(data))
            except (ValueError, KeyError, TypeError) as exc:  # PipeError is a ValueError
                self.log.warning("fork server sent a bad message %r: %s", data[:80], exc)

    def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg["type"]
        if kind == forkwire.FORKED:
            pid = int(msg["pid"])
            # Its exit may be in the same read: the answer carries the future, not a lookup.
            exit_code = self._exits[pid] = asyncio.get_running_loop().create_future()
            answer = self._requests.get(msg["id"])
            if answer is not None and not answer.done():
                answer.set_result((pid, exit_code))
            else:  # its launch was cancelled or timed out: nobody will run or end it
                self.log.debug("killing process %s: nobody waits for it any more", pid)
                pdeathsig.signal_group(pid, signal.SIGKILL)
        elif kind == forkwire.FORK_FAILED:
            answer = self._requests.get(msg["id"])
            if answer is not None and not answer.done():
                answer.set_exception(LaunchError(str(msg["error"])))
        elif kind == forkwire.EXITED:
            exit_code = self._exits.pop(int(msg["pid"]), None)
            if exit_code is not None and not exit_code.done():
                exit_code.set_result(int(msg["code"]))
        elif kind == forkwire.FAILED:
            self.error = str(msg["error"])
            self.log.error("fork server cannot load the agent: %s", self.error)
            self._changed()
        elif kind == forkwire.READY:
            self.log.debug("fork server %s ready", msg.get("pid"))
            self.loaded = True
            self._changed()

    async def _supervise(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        lines = self._tasks.spawn(self._log_stderr(proc.stderr))
        code = await proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(lines), KILL_GRACE)
        self._on_readable()  # what it said before exiting (e.g. why it failed) comes first
        self._close_socket()
        self._proc, self.loaded = None, False
        why = self.error or f"the fork server exited with code {code}"
        if not self.error and self._last_line:
            why += f" (last log line: {self._last_line[:200]})"
        for answer in self._requests.values():
            if not answer.done():
                answer.set_exception(LaunchError(why))
        for exit_code in self._exits.values():
            if not exit_code.done():
                exit_code.set_result(None)  # they got SIGTERM as it died; how they ended is lost
        self._exits.clear()
        if not self.retired and not self.error:
            self.log.warning(
                "fork server %s exited with code %s; the next job starts a new one", proc.pid, code
            )
        self._ended.set()
        self._changed()

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()

    async def _log_stderr(self, stream: asyncio.StreamReader) -> None:
        def on_line(text: str) -> None:
            self._last_line = text
            self.log.info("fork server: %s", text)

        await relay_lines(stream, on_line)
