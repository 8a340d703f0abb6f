"""One agent's fork server: ``python -m lkrun.child.zygote --entrypoint mod:fn --control-fd N``.

It imports the runner, livekit.rtc and the agent's module once, then forks a child per job
on the daemon's request. The children share those pages copy-on-write instead of each
importing them again, which is most of a fresh interpreter's memory, and start in
milliseconds. Each child is still a new process with its own pipes to the daemon, its own
process group, and nothing run in it before: the zygote never starts the rtc runtime, an
event loop or a thread of its own, since none of those survive a fork.

The control channel is a SOCK_SEQPACKET socket, one message per packet, in jobpipe's
encoding:

daemon -> zygote: ``fork`` {id, role} with the child's stdin, stdout and stderr (SCM_RIGHTS);
                  role is the runner's ("job", or "requests" for the request process);
                  ``retire``: fork no more, exit once every child has.
zygote -> daemon: ``ready`` {pid}; ``failed`` {error} (the module did not load; it exits);
                  ``forked`` {id, pid}; ``fork_failed`` {id, error} (retired, or fork()
                  failed); ``exited`` {pid, code} (negative: killed by signal).

The daemon is not its children's parent, so the zygote reaps them and reports how each
ended. It dies with the daemon (parent-death signal), and its children die with it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import select
import signal
import socket
import sys
import traceback
from typing import Any

from lkrun.child import appkind, runner
from lkrun.shared import jobpipe, pdeathsig
from lkrun.shared.forkwire import (
    EXITED,
    FAILED,
    FDS_PER_CHILD,
    FORK,
    FORK_FAILED,
    FORKED,
    PACKET,
    READY,
    RETIRE,
)
from lkrun.shared.text import describe


def thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0  # not Linux: unknown


class Zygote:
    def __init__(self, control: socket.socket, app: appkind.App) -> None:
        self.control = control
        self.app = app
        self.children: set[int] = set()
        self.retired = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)

    def send(self, kind: str, **fields: Any) -> None:
        self.control.send(jobpipe.encode(kind, **fields))

    def serve(self) -> int:
        # SIGCHLD only wakes the poll; the loop reaps.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        signal.set_wakeup_fd(self._wake_w)
        # poll(), not select(): select() cannot watch a descriptor numbered 1024 or more,
        # which the control socket gets in a daemon that holds hundreds of job pipes. Nor
        # epoll: its own descriptor would be one more thing every child must close.
        poller = select.poll()
        control = self.control.fileno()
        for fd in (control, self._wake_r):
            poller.register(fd, select.POLLIN)
        self.send(READY, pid=os.getpid())
        while not (self.retired and not self.children):
            ready = {fd: events for fd, events in poller.poll()}
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 512)
                self.reap()
            if control in ready and not self.on_request():
                return 0  # the daemon is gone; our children get SIGTERM as we exit
        return 0

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.send(EXITED, pid=pid, code=os.waitstatus_to_exitcode(status))

    def on_request(self) -> bool:
        """Handle one packet; False when the daemon closed the channel."""
        data, fds, _, _ = socket.recv_fds(self.control, PACKET, FDS_PER_CHILD)
        if not data:
            return False
        try:
            msg = jobpipe.decode(data)
        except jobpipe.PipeError as exc:
            print(f"lkrun zygote: ignoring a bad request: {exc}", file=sys.stderr)
            msg = {"type": ""}
        kind = msg["type"]
        if kind == FORK and len(fds) == FDS_PER_CHILD:
            if self.retired:
                self.send(FORK_FAILED, id=msg.get("id"), error="the fork server is retired")
            else:
                role = msg.get("role", runner.JOB)
                try:
                    self.fork(msg.get("id"), fds, role if role in runner.ROLES else runner.JOB)
                except OSError as exc:  # e.g. EAGAIN at a pids limit: this job fails, not all
                    self.send(FORK_FAILED, id=msg.get("id"), error=f"fork failed: {exc}")
        elif kind == RETIRE:
            self.retired = True
        for fd in fds:
            os.close(fd)
        return True

    def fork(self, request: Any, fds: list[int], role: str) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        zygote = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = self.child(fds, zygote, role)
            except SystemExit as exc:  # sys.exit() in user code: the same code as spawned
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:  # nothing may unwind into the zygote's loop
                traceback.print_exc()
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        # Both sides set the group, so the daemon can signal it as soon as it learns the pid.
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)
        self.children.add(pid)
        self.send(FORKED, id=request, pid=pid)

    def child(self, fds: list[int], zygote: int, role: str) -> int:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.control.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        fds.clear()
        gc.enable()
        pipe = runner.become_job_process(zygote)
        return runner.run_job(pipe, self.app, role)


def preload() -> None:
    """What every job needs, imported once here; the rtc runtime starts in each child."""
    import livekit.rtc  # noqa: F401

    import lkrun.context  # noqa: F401

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401


def _preload_app(app: appkind.App) -> None:
    """What the app's own framework shares between its jobs (livekit-agents' preloads)."""
    try:
        app.preload()
    except Exception as exc:  # e.g. a preload_modules entry that does not import
        traceback.print_exc()
        raise runner.LoadError(f"cannot preload for the agent: {describe(exc)}") from exc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lkrun.child.zygote")
    runner.add_app_arguments(parser)
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args(argv)

    runner.close_inherited_fds(args.control_fd)  # else every job would inherit them too
    control = socket.socket(fileno=args.control_fd)
    pdeathsig.set_parent_death_signal(signal.SIGTERM, args.daemon_pid)
    os.dup2(2, 1)  # a print() at import time lands in the daemon's log, not nowhere
    sys.path.insert(0, os.getcwd())
    gc.disable()  # no collection may dirty the shared pages before the fork
    preload()
    threads = thread_count()
    try:
        app = runner.load(args.entrypoint, args.prewarm, args.framework)
        _preload_app(app)
    except runner.LoadError as exc:
        control.send(jobpipe.encode(FAILED, error=str(exc)))
        return 1
    if thread_count() > threads:
        print(
            f"lkrun zygote: importing {args.entrypoint} started a thread; threads do not "
            'survive fork, so if jobs hang set start_method = "spawn" for this agent',
            file=sys.stderr,
        )
    # No gc.collect() first: the holes it frees would be filled by each child, copying the
    # pages (measured: +0.7 MB USS per job). Frozen, the children's collector skips them.
    gc.freeze()
    return Zygote(control, app).serve()


if __name__ == "__main__":
    sys.exit(main())
