"""Samples every job's process tree (memory, CPU) and enforces memory limits."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil

log = logging.getLogger("lkrun.monitor")

SAMPLE_INTERVAL = 1.0
MB = 1024 * 1024


@dataclass(frozen=True)
class Usage:
    rss_bytes: int  # the whole tree: the runner and everything it started
    cpu_percent: float  # of one core, summed over the tree
    processes: int


@dataclass(frozen=True)
class Target:
    """A job to sample: its id, its runner's pid, and what to do with the sample."""

    job_id: str
    pid: int
    on_sample: Callable[[Usage], None]
    tree: bool = True  # False: the process alone (a fork server, whose children are jobs)


class TreeSampler:
    """Reads process trees with psutil, keeping Process objects so CPU deltas work."""

    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}

    def sample(self, roots: Iterable[tuple[int, bool]]) -> dict[int, Usage]:
        """Usage of each (pid, with its descendants?) root."""
        roots = list(roots)
        # One pass over the process table for every tree: asking each root for its
        # children scans all of /proc once per job, which at 50 jobs was most of the
        # daemon's CPU.
        children = _children_map() if any(tree for _, tree in roots) else {}
        seen: set[int] = set()
        result = {}
        for pid, tree in roots:
            usage = self._sample_tree(pid, seen, children if tree else None)
            if usage is not None:
                result[pid] = usage
        for gone in set(self._procs) - seen:
            del self._procs[gone]
        return result

    def _process(self, pid: int) -> psutil.Process:
        proc = self._procs.get(pid)
        if proc is None:
            proc = self._procs[pid] = psutil.Process(pid)
            proc.cpu_percent(None)  # the first call only sets the baseline
        return proc

    def _sample_tree(
        self, pid: int, seen: set[int], children: dict[int, list[int]] | None
    ) -> Usage | None:
        try:
            self._process(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        members = _descendants(pid, children) if children is not None else [pid]
        rss = 0
        cpu = 0.0
        for member in members:
            try:
                proc = self._process(member)
                rss += proc.memory_info().rss
                cpu += proc.cpu_percent(None)
                seen.add(member)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # exited between listing and reading
        return Usage(rss_bytes=rss, cpu_percent=cpu, processes=len(members))


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid"]):
        ppid = proc.info.get("ppid")
        if ppid is not None:
            children.setdefault(ppid, []).append(proc.pid)
    return children


def _descendants(pid: int, children: dict[int, list[int]]) -> list[int]:
    """``pid`` and every process below it."""
    found, queue = {pid}, [pid]
    while queue:
        for child in children.get(queue.pop(), ()):
            if child not in found:  # a pid reused mid-scan must not loop
                found.add(child)
                queue.append(child)
    return [pid, *(found - {pid})]


class JobMonitor:
    """One background task for all jobs; sampling runs in a thread, off the event loop."""

    def __init__(self, targets: Callable[[], list[Target]], interval: float = SAMPLE_INTERVAL):
        self.targets = targets
        self.interval = interval
        self._sampler = TreeSampler()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.sample_once()

    async def sample_once(self) -> None:
        targets = self.targets()
        if not targets:
            return
        roots = [(t.pid, t.tree) for t in targets]
        usages = await asyncio.to_thread(self._sampler.sample, roots)
        for target in targets:
            usage = usages.get(target.pid)
            if usage is not None:
                try:
                    target.on_sample(usage)
                except Exception:
                    log.exception("handling a sample of job %s failed", target.job_id)
