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
        seen: set[int] = set()
        result = {}
        for pid, tree in roots:
            usage = self._sample_tree(pid, seen, tree)
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

    def _sample_tree(self, pid: int, seen: set[int], tree: bool) -> Usage | None:
        try:
            root = self._process(pid)
            members = [root, *root.children(recursive=True)] if tree else [root]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        rss = 0
        cpu = 0.0
        for member in members:
            try:
                proc = self._process(member.pid)
                rss += proc.memory_info().rss
                cpu += proc.cpu_percent(None)
                seen.add(member.pid)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # exited between listing and reading
        return Usage(rss_bytes=rss, cpu_percent=cpu, processes=len(members))


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
