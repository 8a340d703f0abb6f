"""The daemon as a child subreaper that reaps the orphans it inherits.

A helper left behind when a job's process group is killed (ffmpeg, a detached `sleep`),
a job whose fork server died, a process the import check's user code started: each is
re-parented to the nearest subreaper, else to PID 1. Run as a container's command, the
daemon *is* PID 1; without reaping, each orphan stays a zombie until the pod's pid limit
stops every fork. So the daemon declares itself a subreaper (Linux, PR_SET_CHILD_SUBREAPER)
and waits for the zombies among its children that nobody else in it waits for.

Never waitpid(-1): asyncio's (or uvloop's) child watcher and subprocess.Popen wait for
their own pids, and an exit status taken from them is lost (asyncio then reports 255).
A zombie child is reaped only when

- its pid is not one the daemon tracks (job processes, fork servers, the dev server), and
- it was already a zombie at the previous scan: a watcher blocked in waitpid() on it
  takes it within microseconds, so one that stays a zombie for a whole interval has
  nobody waiting for it (this covers processes started since the last `tracked()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from lkrun.shared import pdeathsig

log = logging.getLogger("lkrun.reaper")

_PR_SET_CHILD_SUBREAPER = 36
SCAN_INTERVAL = 1.0


def become_subreaper() -> bool:
    """Make orphaned descendants this process's children (Linux); True if it took effect."""
    prctl = pdeathsig.libc_prctl()
    if prctl is None:
        return False
    return prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def own_children() -> set[int]:
    """This process's children, from every thread's /proc/self/task/<tid>/children (a child
    belongs to the thread that forked it, or the one the kernel re-parented it to); from a
    scan of every process where the kernel lacks those files."""
    found: set[int] = set()
    readable = False
    with contextlib.suppress(OSError):
        for task in Path("/proc/self/task").iterdir():
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                found.update(int(pid) for pid in (task / "children").read_text().split())
                readable = True
    if not readable:
        import psutil

        found = {p.pid for p in psutil.Process().children()}
    return found


def process_state(pid: int) -> str:
    """The one-letter state of /proc/<pid>/stat ("Z": zombie); "" if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name may hold spaces and parentheses: the state follows the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0] if fields else ""


def _reap(pid: int) -> int | None:
    """waitpid(pid, WNOHANG): its exit status, or None if it was not ours to take."""
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None  # someone else waited for it meanwhile
    return status if reaped == pid else None


class OrphanReaper:
    """Scans the daemon's children every `interval` and reaps its orphaned zombies.

    `tracked()` names the pids whose exit statuses someone in the daemon waits for; while
    `paused()`, nothing is reaped. The process listing, the state reader and waitpid are
    parameters, for tests."""

    def __init__(
        self,
        tracked: Callable[[], Iterable[int]],
        *,
        paused: Callable[[], bool] = lambda: False,
        interval: float = SCAN_INTERVAL,
        children: Callable[[], set[int]] = own_children,
        state: Callable[[int], str] = process_state,
        reap: Callable[[int], int | None] = _reap,
    ) -> None:
        self._tracked = tracked
        self._paused = paused
        self.interval = interval
        self._children = children
        self._state = state
        self._reap_one = reap
        self._seen: set[int] = set()  # untracked zombies at the last scan
        self.reaped = 0

    def scan(self) -> list[int]:
        """One round: reap the untracked zombies seen at the last round too; their pids.
        Paused (a Popen of the daemon's waits for a child it has not registered): none."""
        if self._paused():
            self._seen = set()
            return []
        zombies = {pid for pid in self._children() if self._state(pid) == "Z"}
        zombies -= set(self._tracked())
        ready = zombies & self._seen
        self._seen = zombies - ready
        reaped = []
        for pid in sorted(ready):
            status = self._reap_one(pid)
            if status is None:
                continue
            reaped.append(pid)
            log.debug("reaped orphaned process %d (%s)", pid, _describe_status(status))
        self.reaped += len(reaped)
        return reaped

    async def run(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        """Scan until cancelled. A failed scan is logged and the next one runs."""
        while True:
            try:
                self.scan()
            except Exception:  # e.g. /proc unreadable: reap later, never stop for good
                log.exception("scanning for orphaned processes failed")
            await sleep(self.interval)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
