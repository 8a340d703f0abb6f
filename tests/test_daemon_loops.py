"""Background loops go on after an error (issue 17, item 8): history pruning, the job logs'
active set read off the loop, and the manifest watcher. Fakes, no real sleeps."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from lkrun.credentials import Credentials
from lkrun.daemon import Changes, Daemon, DaemonConfig
from lkrun.jobs.history import History
from lkrun.logs import JsonFormatter
from lkrun.manifest import load_manifest
from tests.helpers import agent_table


def make_daemon(tmp_path: Path, manifest_text: str | None = None) -> Daemon:
    """A Daemon that is not serving: enough to drive its reload and watch logic."""
    path = tmp_path / "agents.toml"
    path.write_text(manifest_text or agent_table("echo"))
    manifest = load_manifest(path)
    settings = dataclasses.replace(manifest.daemon, state_dir=tmp_path / "state")
    config = DaemonConfig(
        manifest=manifest,
        credentials=Credentials("ws://127.0.0.1:1", "key", "secret"),
        control_socket=tmp_path / "control.sock",
        settings=settings,
    )
    return Daemon(config)


def loop_fields(records: list[logging.LogRecord], loop: str) -> list[dict[str, Any]]:
    """The structured fields of the error lines a loop logged, as the JSON format has them."""
    import json

    formatter = JsonFormatter()
    entries = [json.loads(formatter.format(r)) for r in records]
    return [e for e in entries if e.get("loop") == loop]


class Sleeps:
    """A fake sleep: records the delays and ends the loop (CancelledError) at the n-th."""

    def __init__(self, stop_at: int) -> None:
        self.delays: list[float] = []
        self.stop_at = stop_at

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) >= self.stop_at:
            raise asyncio.CancelledError


# -- history pruning -----------------------------------------------------------------------


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    h = History(
        database=tmp_path / "jobs.db",
        log_dir=tmp_path / "logs",
        retention=60.0,
        log_max_bytes=1024 * 1024,
    )
    h.open()
    try:
        yield h
    finally:
        h.close()


async def test_pruning_goes_on_after_a_failed_round(
    history: History, caplog: pytest.LogCaptureFixture
) -> None:
    old_log = history.logs.directory / "oldjob.log"
    old_log.write_text("x\n")
    an_hour_ago = time.time() - 3600
    os.utime(old_log, (an_hour_ago, an_hour_ago))
    rounds: list[float] = []
    real_prune = history.store.prune

    def prune(cutoff: float) -> int:
        rounds.append(cutoff)
        if len(rounds) == 1:
            raise sqlite3.OperationalError("database is locked")
        return real_prune(cutoff)

    history.store.prune = prune  # type: ignore[method-assign]
    sleeps = Sleeps(stop_at=3)
    with caplog.at_level(logging.ERROR), pytest.raises(asyncio.CancelledError):
        await history.prune_forever(interval=100.0, retry=5.0, sleep=sleeps)

    assert len(rounds) == 3  # the failed round, then two that ran
    assert sleeps.delays == [5.0, 100.0, 100.0]  # retried sooner, then the normal interval
    assert not old_log.exists()  # the round after the failure pruned
    [error] = loop_fields(caplog.records, "history pruning")
    assert error["failures"] == 1 and error["retry_in"] == 5.0
    assert error["error"] == "OperationalError: database is locked"


async def test_pruning_backs_off_while_it_keeps_failing(history: History) -> None:
    def locked(cutoff: float) -> int:
        raise sqlite3.OperationalError("database is locked")

    history.store.prune = locked  # type: ignore[method-assign]
    sleeps = Sleeps(stop_at=5)
    with pytest.raises(asyncio.CancelledError):
        await history.prune_forever(interval=30.0, retry=5.0, sleep=sleeps)
    assert sleeps.delays == [5.0, 10.0, 20.0, 30.0, 30.0]


class _LoopOnlyDict(dict):  # type: ignore[type-arg]
    """A dict that notes every thread that reads it whole."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: set[int] = set()

    def items(self) -> Any:
        self.readers.add(threading.get_ident())
        return super().items()

    def values(self) -> Any:
        self.readers.add(threading.get_ident())
        return super().values()

    def __iter__(self) -> Any:
        self.readers.add(threading.get_ident())
        return super().__iter__()


async def test_log_pruning_reads_the_open_writers_on_the_loop(history: History) -> None:
    """The loop adds and removes writers; a pruning thread iterating them could die of
    "dictionary changed size during iteration"."""
    writers = _LoopOnlyDict()
    history.logs._writers = writers
    history.logs.writer("running").write_line("still going")
    await history.prune_once()
    assert writers.readers == {threading.get_ident()}  # only this (the loop's) thread
    assert "running" in history.logs.active()


# -- the manifest watcher -------------------------------------------------------------------


async def test_manifest_watcher_goes_on_after_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = make_daemon(tmp_path)
    daemon.phase = "serving"
    manifest = daemon.manifest.path.resolve()
    reloads: list[int] = []

    async def reload() -> bool:
        reloads.append(len(reloads))
        if len(reloads) == 1:
            raise OSError(5, "Input/output error")  # not a ManifestError
        return True

    daemon.reload = reload  # type: ignore[method-assign]
    watches = 0

    async def watch(directory: Path, relevant: Any) -> AsyncIterator[Changes]:
        nonlocal watches
        watches += 1
        assert directory == manifest.parent
        yield {(2, str(manifest))}
        yield {(2, str(manifest))}
        raise RuntimeError("inotify watch limit reached")

    sleeps = Sleeps(stop_at=2)
    with caplog.at_level(logging.ERROR), pytest.raises(asyncio.CancelledError):
        await daemon._watch_manifest(watch, retry=0.5, sleep=sleeps)

    assert reloads == [0, 1, 2, 3]  # the failed reload did not end the watch
    assert watches == 2  # the failed watch was started again...
    assert sleeps.delays == [0.5, 0.5]  # ...after a backoff (a batch came between: reset)
    errors = loop_fields(caplog.records, "manifest watcher")
    assert [e["error"] for e in errors] == [
        "OSError: [Errno 5] Input/output error",
        "RuntimeError: inotify watch limit reached",
        "RuntimeError: inotify watch limit reached",
    ]


async def test_manifest_watcher_backs_off_when_the_watch_keeps_failing(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)

    async def broken(directory: Path, relevant: Any) -> AsyncIterator[Changes]:
        raise FileNotFoundError(2, "No such file or directory")
        yield set()  # an async generator

    sleeps = Sleeps(stop_at=4)
    with pytest.raises(asyncio.CancelledError):
        await daemon._watch_manifest(broken, retry=1.0, sleep=sleeps)
    assert sleeps.delays == [1.0, 2.0, 4.0, 8.0]


async def test_manifest_watcher_filters_like_before(tmp_path: Path) -> None:
    """The relevance filter the real watch gets: the manifest and .py files only."""
    daemon = make_daemon(tmp_path)
    seen: list[Any] = []

    async def watch(directory: Path, relevant: Any) -> AsyncIterator[Changes]:
        seen.append(relevant)
        raise asyncio.CancelledError
        yield set()

    with pytest.raises(asyncio.CancelledError):
        await daemon._watch_manifest(watch)
    relevant = seen[0]
    manifest = str(daemon.manifest.path.resolve())
    assert relevant(2, manifest)
    assert relevant(2, str(tmp_path / "agent.py"))
    assert not relevant(2, str(tmp_path / "notes.txt"))
    assert not relevant(2, str(tmp_path / "__pycache__" / "agent.cpython-311.py"))
