"""What the daemon remembers across restarts: the SQLite job history and per-job log files."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

from lkrun.jobs.book import JobRecord
from lkrun.jobs.fields import timings
from lkrun.jobs.logfiles import JobLogs
from lkrun.jobs.store import JobQuery, JobStore
from lkrun.logs import loop_error
from lkrun.shared.text import describe

log = logging.getLogger("lkrun.history")

PRUNE_INTERVAL = 3600.0
PRUNE_RETRY = 60.0  # after a failed round; doubles up to PRUNE_INTERVAL


def lkrun_daemon_alive(pid: int) -> bool:
    """Whether pid is a running lkrun daemon other than this one (rows it owns are not lost)."""
    if pid == os.getpid():
        return False  # a previous daemon that had our pid is certainly gone
    try:
        return "lkrun" in " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


class History:
    def __init__(
        self, *, database: Path, log_dir: Path, retention: float, log_max_bytes: int
    ) -> None:
        self.store = JobStore(database)
        self.logs = JobLogs(log_dir, max_bytes=log_max_bytes)
        self.retention = retention

    def open(self) -> int:
        """Open both; return how many jobs a dead daemon left running (now marked lost)."""
        lost = self.store.open(daemon_alive=lkrun_daemon_alive)
        self.logs.open()
        return lost

    def close(self) -> None:
        self.store.close()

    def record(self, record: JobRecord) -> None:
        """Non-blocking: queued for the store's writer thread."""
        self.store.upsert({**record.to_dict(), "daemon_pid": os.getpid()})

    async def query(self, q: JobQuery, live: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """History rows, with this daemon's live view (memory, CPU) of jobs it still runs."""
        rows = await asyncio.to_thread(self._flushed, self.store.query, q)
        return [_merge(row, live.get(row["id"])) for row in rows]

    async def get(self, job_id: str, live: dict[str, Any] | None) -> dict[str, Any] | None:
        if live is not None:
            return live
        row = await asyncio.to_thread(self._flushed, self.store.get, job_id)
        return None if row is None else _merge(row, None)

    async def chain(self, job_id: str) -> list[dict[str, Any]]:
        """The job's recovery chain (JobStore.chain): the attempts at its call."""
        return await asyncio.to_thread(self._flushed, self.store.chain, job_id)

    def _flushed(self, read: Callable[[Any], Any], arg: Any) -> Any:
        self.store.flush(0.5)  # what just happened should show
        return read(arg)

    async def prune_forever(
        self,
        *,
        interval: float = PRUNE_INTERVAL,
        retry: float = PRUNE_RETRY,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Prune every `interval`. A failed round ("database is locked", a disk error) is
        logged and tried again after `retry`, doubling up to `interval`: one error must not
        end pruning for the daemon's life, or history and logs grow without bound."""
        failures = 0
        while True:
            try:
                await self.prune_once()
            except Exception as exc:
                failures += 1
                delay = min(interval, retry * 2 ** (failures - 1))
                log.error(
                    "pruning the job history failed (%d in a row); next try in %.0fs: %s",
                    failures,
                    delay,
                    describe(exc),
                    extra=loop_error("history pruning", exc, failures, delay),
                )
            else:
                failures, delay = 0, interval
            await sleep(delay)

    async def prune_once(self) -> None:
        cutoff = time.time() - self.retention
        # Which logs are still being written is read here, on the loop that changes it,
        # not in the thread that deletes.
        active = self.logs.active()
        jobs = await asyncio.to_thread(self.store.prune, cutoff)
        files = await asyncio.to_thread(self.logs.remove_older_than, cutoff, active)
        if jobs or files:
            log.info("pruned %d old job(s) and %d log file(s) from history", jobs, files)


def _merge(row: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    if live is not None:
        return live
    return {**row, **timings(row)}
