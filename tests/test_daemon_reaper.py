"""The daemon reaps the orphans it inherits, and only those (issue 17, item 4).

As a container's PID 1 (here: the first process of a PID namespace, `unshare -fp`) the
daemon is the parent of every orphan of its jobs; each one it does not reap stays a zombie.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lkrun.reaper import OrphanReaper, own_children, process_state
from tests.conftest import DaemonProc, unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room

# -- the rules, with fakes -------------------------------------------------------------------


class FakeProcs:
    """Children and their states, and the pids waitpid() was called for."""

    def __init__(self, states: dict[int, str]) -> None:
        self.states = states
        self.waited: list[int] = []

    def children(self) -> set[int]:
        return set(self.states)

    def state(self, pid: int) -> str:
        return self.states.get(pid, "")

    def reap(self, pid: int) -> int | None:
        self.waited.append(pid)
        self.states.pop(pid, None)
        return 0


def test_untracked_zombie_is_reaped_at_its_second_scan() -> None:
    procs = FakeProcs({10: "Z", 11: "S"})
    reaper = OrphanReaper(lambda: (), children=procs.children, state=procs.state, reap=procs.reap)
    assert reaper.scan() == []  # a watcher may be about to take it
    assert reaper.scan() == [10]
    assert procs.waited == [10]  # never the running one
    assert reaper.reaped == 1


def test_tracked_zombies_are_never_waited_for() -> None:
    procs = FakeProcs({10: "Z", 20: "Z"})
    tracked = {20}
    reaper = OrphanReaper(
        lambda: tracked, children=procs.children, state=procs.state, reap=procs.reap
    )
    for _ in range(5):
        reaper.scan()
    assert procs.waited == [10]
    assert procs.states == {20: "Z"}  # left to whoever waits for it


def test_a_zombie_gone_between_scans_is_not_waited_for() -> None:
    procs = FakeProcs({10: "Z"})
    reaper = OrphanReaper(lambda: (), children=procs.children, state=procs.state, reap=procs.reap)
    reaper.scan()
    del procs.states[10]  # its own waiter took it
    procs.states[11] = "Z"  # a new one, seen once
    assert reaper.scan() == []
    assert procs.waited == []


def test_nothing_is_reaped_while_paused() -> None:
    procs = FakeProcs({10: "Z"})
    paused = True
    reaper = OrphanReaper(
        lambda: (),
        paused=lambda: paused,
        children=procs.children,
        state=procs.state,
        reap=procs.reap,
    )
    reaper.scan()
    reaper.scan()
    assert procs.waited == []
    paused = False
    assert reaper.scan() == []  # seen afresh after the pause
    assert reaper.scan() == [10]


async def test_a_failed_scan_does_not_end_the_loop() -> None:
    calls = 0

    def children() -> set[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise PermissionError("/proc is not readable")
        return set()

    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        if len(sleeps) == 3:
            raise asyncio.CancelledError

    reaper = OrphanReaper(lambda: (), children=children, interval=0.25)
    with pytest.raises(asyncio.CancelledError):
        await reaper.run(sleep)
    assert calls == 3 and sleeps == [0.25, 0.25, 0.25]


# -- with real processes ---------------------------------------------------------------------


@pytest.mark.e2e
def test_reaper_takes_no_status_from_a_tracked_child() -> None:
    """A child the daemon's code waits for (late, as the dev server's Popen does) keeps its
    exit status; an untracked zombie child is reaped."""
    tracked_child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(7)"])
    stray = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for proc in (tracked_child, stray):  # until it exits, leaving it a zombie
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        assert process_state(tracked_child.pid) == process_state(stray.pid) == "Z"
        assert {tracked_child.pid, stray.pid} <= own_children()
        reaper = OrphanReaper(lambda: {tracked_child.pid})
        reaped: list[int] = []
        for _ in range(3):
            reaped += reaper.scan()
        assert reaped == [stray.pid]
        assert process_state(stray.pid) == ""  # gone, not a zombie
        assert tracked_child.wait(5) == 7  # its status is still there for its owner
    finally:
        for proc in (tracked_child, stray):
            with contextlib.suppress(ChildProcessError):
                proc.wait(5)


@pytest.mark.e2e
async def test_reaper_leaves_asyncio_children_to_their_watcher() -> None:
    """Children started with asyncio, scanned while they come and go: each exit status
    reaches its awaiting code (asyncio reports 255 for one taken from it)."""
    reaper = OrphanReaper(lambda: ())
    stop = asyncio.Event()

    async def scan_all_along() -> None:
        while not stop.is_set():
            reaper.scan()
            await asyncio.sleep(0.001)

    scanning = asyncio.create_task(scan_all_along())
    try:
        for code in range(1, 21):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", f"raise SystemExit({code})"
            )
            assert await proc.wait() == code
    finally:
        stop.set()
        await scanning
    assert reaper.reaped == 0


# -- as PID 1 of a PID namespace, against the real server --------------------------------------

ORPHANER = '''
import subprocess

from lkrun.context import JobContext


async def entrypoint(ctx: JobContext) -> None:
    """Leaves a helper behind in a session of its own, as a forced kill of a job's group
    leaves an ffmpeg: it outlives the job and is re-parented to the daemon."""
    helper = subprocess.Popen(["sleep", "2"], start_new_session=True)
    print(f"helper pid {helper.pid}")
'''


class NamespacedDaemon(DaemonProc):
    """`lkrun serve` as PID 1 of a new PID namespace (with its own /proc)."""

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            serve = [sys.executable, "-m", "lkrun", "serve", str(self.manifest_path)]
            options = ["--log-level", "debug", "--log-format", "json"]
            options += ["--http-addr", "127.0.0.1:0", *self.extra_args]
            self.proc = subprocess.Popen(
                ["unshare", "-fp", "--mount-proc", *serve, *options],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.dir,
            )

    def daemon_pid(self) -> int | None:
        """The daemon's pid as this (the host's) namespace sees it: unshare's child."""
        assert self.proc is not None
        children = _children_of(self.proc.pid)
        return min(children) if children else None


def _children_of(pid: int) -> set[int]:
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ns_pid(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return []


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -p needs root")
async def test_pid_1_daemon_leaves_no_zombies(livekit_server: Any, tmp_path: Path) -> None:
    name, room = unique("orphaner"), unique("room")
    daemon = NamespacedDaemon(
        tmp_path / "ns", livekit_server, agent_table(name, "orphaner:entrypoint"), []
    )
    (daemon.dir / "orphaner.py").write_text(ORPHANER)
    daemon.start()
    try:
        await daemon.wait_registered()
        pid = await wait_for(daemon.daemon_pid, 10, what="the daemon's host pid")
        assert _ns_pid(pid)[-1] == 1  # PID 1 in its namespace
        await dispatch(livekit_server, room, name)
        await job_in_room(daemon, room, "success")

        def adopted_helpers() -> list[tuple[int, str]]:
            return [(c, process_state(c)) for c in _children_of(pid) if _comm(c) == "sleep"]

        # The helper outlived its job and is now the daemon's child...
        await wait_for(adopted_helpers, 10, what="the job's helper to be re-parented")
        # ...and once it exits, the daemon reaps it: no zombie stays.
        await wait_for(lambda: not adopted_helpers(), 15, what="the exited helper reaped")
        zombies = [c for c in _children_of(pid) if process_state(c) == "Z"]
        assert zombies == [], [(c, _comm(c)) for c in zombies]
        assert (await daemon.status())["ready"] is True
    finally:
        pid_now = daemon.daemon_pid()
        assert daemon.proc is not None
        if pid_now is not None:
            # Twice: the first starts a drain.
            with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
                os.kill(pid_now, signal.SIGTERM)
                daemon.proc.wait(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid_now, signal.SIGTERM)
        try:
            daemon.proc.wait(30)
        except subprocess.TimeoutExpired:
            if pid_now is not None:
                os.kill(pid_now, signal.SIGKILL)  # the namespace goes with its PID 1
            daemon.proc.wait(10)
