"""JobLogs: per-job log files, size-capped, tailed and followed."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import os
import re
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lkrun.jobs.logfiles import JobLogs, JobLogWriter, default_log_dir
from tests.conftest import wait_for

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
JOB = "AJ_aAWP8JH2Vi8R"


def bodies(lines: list[str]) -> list[str]:
    """The lines without their timestamp prefix (checked to be there)."""
    for line in lines:
        assert STAMP.match(line), line
    return [STAMP.sub("", line, count=1) for line in lines]


def write(writer: JobLogWriter, *lines: str) -> None:
    for line in lines:
        writer.write_line(line)
    writer.flush()


@pytest.fixture
def logs(tmp_path: Path) -> JobLogs:
    logs = JobLogs(tmp_path / "logs", max_bytes=4096)
    logs.open()
    return logs


class Collector:
    """Runs follow() in a task and keeps what it yields, for tests to wait on."""

    def __init__(self, stream: AsyncIterator[str]) -> None:
        self.lines: list[str] = []
        self.task = asyncio.create_task(self._run(stream))

    async def _run(self, stream: AsyncIterator[str]) -> None:
        async for line in stream:
            self.lines.append(line)

    def bodies(self) -> list[str]:
        return bodies(self.lines)

    async def has(self, count: int) -> None:
        await wait_for(
            lambda: len(self.lines) >= count, timeout=5, interval=0.01, what=f"{count} lines"
        )

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def test_default_log_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_log_dir() == tmp_path / "lkrun" / "logs"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # ignored, per the XDG spec
    assert default_log_dir() == Path.home() / ".local" / "state" / "lkrun" / "logs"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_log_dir() == Path.home() / ".local" / "state" / "lkrun" / "logs"


def test_open_makes_private_directory(tmp_path: Path) -> None:
    logs = JobLogs(tmp_path / "a" / "logs")
    logs.open()
    logs.open()  # idempotent
    assert stat.S_IMODE((tmp_path / "a" / "logs").stat().st_mode) == 0o700


def test_write_then_tail_with_timestamps(logs: JobLogs) -> None:
    writer = logs.writer(JOB)
    before = time.time()
    write(writer, "hello", "world\n", "two\nparts")
    assert bodies(logs.tail(JOB)) == ["hello", "world", "two", "parts"]
    assert bodies(logs.tail(JOB, 2)) == ["two", "parts"]
    stamp = logs.tail(JOB, 1)[0].split(" ", 1)[0]
    written = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    assert before - 1 <= written <= time.time() + 1  # UTC, not local time
    assert stat.S_IMODE(logs.path(JOB).stat().st_mode) == 0o600
    writer.close()


def test_tail_of_unknown_job_is_empty(logs: JobLogs) -> None:
    assert logs.tail("AJ_nothing") == []
    assert logs.tail(JOB, 0) == []


async def test_lines_wait_in_memory_until_flushed_or_closed(logs: JobLogs) -> None:
    writer = logs.writer(JOB)
    writer.write_line("buffered")
    assert logs.tail(JOB) == []  # in a loop: deferred to a timer
    await wait_for(lambda: logs.tail(JOB), timeout=5, what="the timer flush")
    writer.write_line("closing")
    writer.close()
    assert bodies(logs.tail(JOB)) == ["buffered", "closing"]
    writer.write_line("after close")  # dropped, not raised
    assert len(logs.tail(JOB)) == 2


def test_writes_through_without_a_loop(logs: JobLogs) -> None:
    writer = logs.writer(JOB)
    writer.write_line("direct")
    assert bodies(logs.tail(JOB)) == ["direct"]
    writer.close()


def test_writer_is_shared_while_open(logs: JobLogs) -> None:
    first = logs.writer(JOB)
    assert logs.writer(JOB) is first
    first.close()
    second = logs.writer(JOB)
    assert second is not first
    write(second, "again")
    second.close()


def test_tail_across_rotation(logs: JobLogs) -> None:
    writer = logs.writer(JOB)
    lines = [f"line {i:04d} " + "x" * 50 for i in range(150)]  # ~12 KiB: rotates twice
    write(writer, *lines)
    writer.close()
    rotated = logs.path(JOB).with_name(f"{JOB}.log.1")
    assert rotated.exists()
    current = len(logs.path(JOB).read_text().splitlines())
    assert bodies(logs.tail(JOB, current + 5)) == lines[-(current + 5) :]
    # Everything still on disk, in order, when asking for more than there is.
    everything = bodies(logs.tail(JOB, 10_000))
    assert everything == lines[-len(everything) :]


def test_size_cap(tmp_path: Path) -> None:
    max_bytes = 64 * 1024
    logs = JobLogs(tmp_path, max_bytes=max_bytes)
    writer = logs.writer(JOB)
    line = "y" * 100
    written = 0
    while written < 3 * max_bytes:
        writer.write_line(line)
        written += len(line)
    writer.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{JOB}.log", f"{JOB}.log.1"]
    sizes = [(tmp_path / name).stat().st_size for name in files]
    assert all(size <= max_bytes for size in sizes)
    longest = len(logs.tail(JOB, 1)[0]) + 1
    assert sum(sizes) <= 2 * max_bytes + longest
    assert sizes[1] > max_bytes - longest  # rotated only when full


def test_line_longer_than_cap_gets_a_file_of_its_own(logs: JobLogs) -> None:
    writer = logs.writer(JOB)
    write(writer, "small", "z" * 10_000, "after")
    writer.close()
    assert bodies(logs.tail(JOB, 3)) == ["small", "z" * 10_000, "after"][-2:]


@pytest.mark.parametrize(
    "job_id", ["", "../etc/passwd", "a/b", "..", "AJ x", "AJ_1\n", "x" * 65, "é", "a.log"]
)
def test_bad_job_ids_rejected(logs: JobLogs, job_id: str) -> None:
    with pytest.raises(ValueError):
        logs.path(job_id)
    with pytest.raises(ValueError):
        logs.writer(job_id)
    with pytest.raises(ValueError):
        logs.tail(job_id)


def test_good_job_ids_accepted(logs: JobLogs) -> None:
    for job_id in ["AJ_aAWP8JH2Vi8R", "a", "x" * 64, "job-1_B"]:
        assert logs.path(job_id) == logs.directory / f"{job_id}.log"


async def test_follow_yields_tail_then_new_lines_until_done(logs: JobLogs) -> None:
    writer = logs.writer(JOB)
    write(writer, *(f"old {i}" for i in range(20)))
    ended = False
    follower = Collector(logs.follow(JOB, from_lines=3, poll=0.02, until=lambda: ended))
    await follower.has(3)
    assert follower.bodies() == ["old 17", "old 18", "old 19"]

    async def produce() -> None:
        for i in range(5):
            write(writer, f"new {i}")
            await asyncio.sleep(0)

    await asyncio.wait_for(produce(), timeout=5)
    await follower.has(8)
    writer.write_line("last words")
    writer.close()  # the job ended: its writer closes, then until() turns true
    ended = True
    await asyncio.wait_for(follower.task, timeout=5)
    assert follower.bodies()[3:] == [*(f"new {i}" for i in range(5)), "last words"]


async def test_follow_waits_for_the_file_to_appear(logs: JobLogs) -> None:
    follower = Collector(logs.follow(JOB, poll=0.02))
    writer = logs.writer(JOB)
    write(writer, "first")
    await follower.has(1)
    assert follower.bodies() == ["first"]
    writer.close()
    await follower.stop()


async def test_follow_with_nothing_ends_when_done(logs: JobLogs) -> None:
    lines = [line async for line in logs.follow(JOB, poll=0.01, until=lambda: True)]
    assert lines == []


async def test_follow_survives_rotation(logs: JobLogs) -> None:
    writer = logs.writer(JOB)
    write(writer, "before")
    follower = Collector(logs.follow(JOB, from_lines=1, poll=0.02))
    await follower.has(1)
    rotated = logs.path(JOB).with_name(f"{JOB}.log.1")
    expected = ["before"]
    # One line at a time, the follower catching up each time, until the file has rotated
    # and a few lines have landed in the new one.
    extra = 5
    while extra:
        if rotated.exists():
            extra -= 1
        line = f"line {len(expected):03d} " + "w" * 100
        write(writer, line)
        expected.append(line)
        await follower.has(len(expected))
        assert len(expected) < 1000
    assert follower.bodies() == expected
    writer.close()
    await follower.stop()


async def test_follow_catches_lines_written_just_before_rotation(logs: JobLogs) -> None:
    writer = logs.writer(JOB)
    write(writer, "start")
    follower = Collector(logs.follow(JOB, from_lines=1, poll=0.05))
    await follower.has(1)
    # Many lines in one flush: the file rotates between the follower's polls.
    lines = [f"burst {i:03d} " + "b" * 20 for i in range(120)]
    write(writer, *lines)
    await follower.has(1 + len(lines))
    assert follower.bodies() == ["start", *lines]
    writer.close()
    await follower.stop()


async def test_follow_ends_after_reading_pending_data(logs: JobLogs) -> None:
    writer = logs.writer(JOB)
    write(writer, "a")
    # A long poll: the end comes while the lines below are still unread.
    follower = Collector(logs.follow(JOB, from_lines=1, poll=0.5, until=lambda: writer.closed))
    await follower.has(1)
    write(writer, *(f"b{i}" for i in range(50)))
    writer.close()
    await asyncio.wait_for(follower.task, timeout=5)
    assert follower.bodies() == ["a", *(f"b{i}" for i in range(50))]


def _touch(path: Path, mtime: float) -> None:
    path.write_text("x\n")
    os.utime(path, (mtime, mtime))


def test_prune(logs: JobLogs) -> None:
    d = logs.directory
    for job in ["AJ_keep", "AJ_drop1", "AJ_drop2"]:
        (d / f"{job}.log").write_text("x\n")
    (d / "AJ_drop1.log.1").write_text("x\n")
    (d / "notes.txt").write_text("not ours\n")
    active = logs.writer("AJ_running")
    write(active, "still going")
    assert logs.prune(["AJ_keep"]) == 3
    names = sorted(p.name for p in d.iterdir())
    assert names == ["AJ_keep.log", "AJ_running.log", "notes.txt"]
    active.close()
    assert logs.prune([]) == 2
    assert logs.prune([]) == 0
    assert JobLogs(d / "missing").prune([]) == 0


def test_remove_older_than(logs: JobLogs) -> None:
    d = logs.directory
    now = time.time()
    _touch(d / "AJ_old.log", now - 7200)
    _touch(d / "AJ_old.log.1", now - 7200)
    _touch(d / "AJ_mixed.log.1", now - 7200)
    _touch(d / "AJ_mixed.log", now)
    _touch(d / "AJ_new.log", now)
    _touch(d / "other.txt", now - 7200)
    quiet = logs.writer("AJ_quiet")
    write(quiet, "started long ago")
    os.utime(d / "AJ_quiet.log", (now - 7200, now - 7200))
    assert logs.remove_older_than(now - 3600) == 3
    names = sorted(p.name for p in d.iterdir())
    assert names == ["AJ_mixed.log", "AJ_new.log", "AJ_quiet.log", "other.txt"]
    quiet.close()
    assert logs.remove_older_than(now - 3600) == 1


def test_write_errors_do_not_raise(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    logs = JobLogs(tmp_path / "logs")
    writer = logs.writer(JOB)
    os.rmdir(tmp_path / "logs")  # the directory vanished under the daemon
    writer.write_line("lost")
    writer.write_line("lost too")
    assert caplog.text.count("cannot write job log") == 1
    (tmp_path / "logs").mkdir()
    writer.write_line("back")
    writer.close()
    assert bodies(logs.tail(JOB)) == ["back"]
