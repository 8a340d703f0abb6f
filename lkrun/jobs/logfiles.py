"""Each job's own log on disk: <dir>/<job_id>.log plus one rotated <job_id>.log.1.

The daemon writes a job's stderr lines here from its event loop (JobLogWriter), and the
CLI reads them back (JobLogs.tail) or watches them grow (JobLogs.follow). Files are
size-capped per job, so a chatty job can't fill the disk: at most ~2 * max_bytes each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

from lkrun import paths

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 5 * 1024 * 1024
FLUSH_BYTES = 64 * 1024  # write the buffer out once it holds this much
FLUSH_DELAY = 0.5  # ...or this long after its first unwritten line
READ_BLOCK = 64 * 1024

_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LOG_FILE = re.compile(r"(?P<job>[A-Za-z0-9_-]{1,64})\.log(\.1)?")


def default_log_dir() -> Path:
    """$XDG_STATE_HOME/lkrun/logs, else ~/.local/state/lkrun/logs."""
    return paths.state_dir() / "logs"


def _timestamp(now: float) -> str:
    """UTC with milliseconds, e.g. 2026-11-24T08:09:23.270Z."""
    millis = int(now * 1000) % 1000
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(now))}.{millis:03d}Z"


def _rotated(path: Path) -> Path:
    return path.with_name(path.name + ".1")


class JobLogs:
    """One file per job under a directory: <dir>/<job_id>.log (+ one rotated <job_id>.log.1)."""

    def __init__(self, directory: Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self._writers: dict[str, JobLogWriter] = {}

    def open(self) -> None:
        """Create the directory (mode 0700: job logs may hold secrets). Idempotent."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        """The current log file of a job; ValueError for ids that could escape the directory."""
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise ValueError(f"invalid job id: {job_id!r}")
        return self.directory / f"{job_id}.log"

    def writer(self, job_id: str) -> JobLogWriter:
        """The job's writer; the open one if there is one, so two never rotate one file."""
        current = self._writers.get(job_id)
        if current is not None and not current.closed:
            return current
        path = self.path(job_id)
        self.open()
        writer = JobLogWriter(path, self.max_bytes, on_close=self._forget)
        self._writers[job_id] = writer
        return writer

    def _forget(self, writer: JobLogWriter) -> None:
        job_id = writer.path.name.removesuffix(".log")
        if self._writers.get(job_id) is writer:
            del self._writers[job_id]

    def tail(self, job_id: str, lines: int = 100) -> list[str]:
        """The last `lines` lines across the rotated file and the current one; [] if none."""
        path = self.path(job_id)
        if lines <= 0:
            return []
        try:
            with path.open("rb") as f:
                result = _tail_lines(f.fileno(), os.fstat(f.fileno()).st_size, lines)
        except FileNotFoundError:
            result = []
        # A rotation between the two reads may duplicate or skip a file's worth; it's a
        # snapshot of a live log, so that's acceptable.
        if len(result) < lines:
            result = _tail_path(_rotated(path), lines - len(result)) + result
        return result

    async def follow(
        self,
        job_id: str,
        *,
        from_lines: int = 10,
        poll: float = 0.2,
        until: Callable[[], bool] | None = None,
    ) -> AsyncIterator[str]:
        """Yield the last `from_lines` lines, then each line appended after them.

        Polls the file size every `poll` seconds and follows rotation (a shrunk or replaced
        file is read from its start). Ends once `until()` is true and nothing is left to
        read; a writer should be closed before `until()` turns true, or its last buffered
        lines may be missed. Cancelling the consumer ends it too.
        """
        follower = _Follower(self.path(job_id))
        try:
            for line in follower.start(from_lines):
                yield line
            while True:
                done = until is not None and until()  # checked before reading: no lost tail
                lines, moved = follower.read_new()
                for line in lines:
                    yield line
                if moved:
                    await asyncio.sleep(0)  # more may be waiting, but let the loop breathe
                    continue
                if done:
                    for line in follower.finish():
                        yield line
                    return
                await asyncio.sleep(poll)
        finally:
            follower.close()

    def prune(self, keep: Iterable[str]) -> int:
        """Delete the log files of jobs not in `keep` (nor still being written); count files."""
        kept = set(keep) | self.active()
        return self._delete(lambda job, _path: job not in kept)

    def remove_older_than(self, cutoff: float, active: set[str] | None = None) -> int:
        """Delete log files last modified before `cutoff` (epoch seconds); count files.

        Files of jobs still being written (`active`, default: active()) are kept: a quiet
        job's log is still wanted. From another thread, pass active() read on the loop.
        """
        keep = self.active() if active is None else active

        def old(job: str, path: Path) -> bool:
            return job not in keep and path.stat().st_mtime < cutoff

        return self._delete(old)

    def active(self) -> set[str]:
        """Jobs whose log is open for writing. Call it on the thread that writes (the
        loop): the writers change there."""
        return {job for job, w in list(self._writers.items()) if not w.closed}

    def _delete(self, should_delete: Callable[[str, Path], bool]) -> int:
        """Delete our log files (and nothing else in the directory) that match; count them."""
        try:
            entries = list(self.directory.iterdir())
        except FileNotFoundError:
            return 0
        count = 0
        for path in entries:
            match = _LOG_FILE.fullmatch(path.name)
            if match is None:
                continue
            # Another cleanup may race us to the same file; it's gone either way.
            with contextlib.suppress(FileNotFoundError):
                if should_delete(match["job"], path):
                    path.unlink()
                    count += 1
        return count


class JobLogWriter:
    """Appends lines for one job. Cheap to call from the event loop: buffered, flushed on a
    small interval or when the buffer grows, and on close.

    Lines are kept in memory and written with one os.write() once FLUSH_BYTES accumulate or
    FLUSH_DELAY after the first unwritten line (a loop timer), so a chatty job costs few
    syscalls yet a follower sees its lines within half a second. Outside an event loop
    each line is written at once. Not thread-safe: use it from one thread (the loop).
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        *,
        on_close: Callable[[JobLogWriter], None] | None = None,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._on_close = on_close
        self._fd: int | None = None
        self._size = 0  # bytes in the current file
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._failing = False  # whether the last write failed (warn once per outage)

    @property
    def closed(self) -> bool:
        return self._closed

    def write_line(self, line: str) -> None:
        """Append `line` with a UTC timestamp prefix; dropped once the writer is closed."""
        if self._closed:
            return
        stamp = _timestamp(time.time())
        # An embedded newline would forge a line of its own; give each part its own stamp.
        for part in line.rstrip("\r\n").split("\n"):
            text = part.rstrip("\r")
            data = f"{stamp} {text}\n".encode(errors="replace")
            self._pending.append(data)
            self._pending_bytes += len(data)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to defer to: write through
            self.flush()
            return
        self._timer = loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        """Write buffered lines out. Disk errors are logged, not raised: a full disk must
        not break the job's supervision, only lose its log lines."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        try:
            self._write_lines(lines)
        except OSError as e:
            if not self._failing:
                logger.warning("cannot write job log %s: %s", self.path, e)
            self._failing = True
            self._close_fd()  # reopen next time, in case the file or directory went away
        else:
            self._failing = False

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True
        self._close_fd()
        if self._on_close is not None:
            self._on_close(self)

    def _write_lines(self, lines: list[bytes]) -> None:
        """Append lines, rotating before any line that would take the file past max_bytes."""
        if self._fd is None:
            self._open()
        chunk: list[bytes] = []
        chunk_bytes = 0
        for data in lines:
            # A lone line longer than max_bytes still gets written, to a file of its own.
            if self._size + chunk_bytes + len(data) > self.max_bytes and self._size + chunk_bytes:
                self._append(b"".join(chunk))
                chunk, chunk_bytes = [], 0
                self._rotate()
            chunk.append(data)
            chunk_bytes += len(data)
        self._append(b"".join(chunk))

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fd = os.open(self.path, flags, 0o600)
        self._size = os.fstat(self._fd).st_size  # a rerun of the job appends to its log

    def _append(self, data: bytes) -> None:
        assert self._fd is not None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self._size += written
            view = view[written:]

    def _rotate(self) -> None:
        self._close_fd()
        # Pruned while open: nothing to keep, just start the new file.
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, _rotated(self.path))
        self._open()  # at once, so followers find the new file

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


class _Follower:
    """Reads one job's log as it grows, across rotations; the state behind JobLogs.follow."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: int | None = None
        self._pos = 0
        self._partial = b""  # the start of a line not yet terminated

    def start(self, from_lines: int) -> list[str]:
        """Open the current file, positioned at its end; return the last `from_lines` lines."""
        if not self._try_open():
            return _tail_path(_rotated(self.path), from_lines)
        assert self._file is not None
        self._pos = os.fstat(self._file).st_size
        lines = _tail_lines(self._file, self._pos, from_lines)
        if len(lines) < from_lines:
            lines = _tail_path(_rotated(self.path), from_lines - len(lines)) + lines
        return lines

    def read_new(self) -> tuple[list[str], bool]:
        """Complete lines appended since the last call, and whether anything moved (read
        data, or switched files): if so there may be more, so call again before sleeping."""
        if self._file is None:
            return [], self._try_open()
        if self._read_block():
            return self._split(), True
        return self._check_replaced()

    def finish(self) -> list[str]:
        """The unterminated last line, if any (the writer may have died mid-line)."""
        partial, self._partial = self._partial, b""
        return [_decode(partial)] if partial else []

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def _try_open(self) -> bool:
        try:
            self._file = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        self._pos = 0
        return True

    def _read_block(self) -> bool:
        assert self._file is not None
        data = os.pread(self._file, READ_BLOCK, self._pos)
        self._pos += len(data)
        self._partial += data
        return bool(data)

    def _check_replaced(self) -> tuple[list[str], bool]:
        """At the end of our file: start over if the path now names another file, or if
        ours shrank."""
        assert self._file is not None
        try:
            current = os.stat(self.path)
        except FileNotFoundError:
            return [], False  # mid-rotation or pruned: keep our file and look again later
        ours = os.fstat(self._file)
        if (current.st_dev, current.st_ino) == (ours.st_dev, ours.st_ino):
            if ours.st_size >= self._pos:
                return [], False
            self._pos = 0  # truncated in place
            return self.finish(), True
        # Rotated: the writer may have appended to our file just before renaming it.
        while self._read_block():
            pass
        lines = self._split() + self.finish()
        self.close()
        self._try_open()
        return lines, True

    def _split(self) -> list[str]:
        """Take the complete lines off the partial buffer."""
        if b"\n" not in self._partial:
            return []
        *complete, self._partial = self._partial.split(b"\n")
        return [_decode(raw) for raw in complete]


def _decode(raw: bytes) -> str:
    return raw.decode(errors="replace")


def _tail_path(path: Path, lines: int) -> list[str]:
    try:
        with path.open("rb") as f:
            return _tail_lines(f.fileno(), os.fstat(f.fileno()).st_size, lines)
    except FileNotFoundError:
        return []


def _tail_lines(fd: int, end: int, lines: int) -> list[str]:
    """The last `lines` lines of the file's first `end` bytes, reading backwards by blocks
    so a big file costs only what the answer needs."""
    if lines <= 0 or end <= 0:
        return []
    data = b""
    pos = end
    # One more newline than lines wanted marks the start of the first one we keep.
    while pos > 0 and data.count(b"\n") <= lines:
        step = min(READ_BLOCK, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
    if data.endswith(b"\n"):
        data = data[:-1]
    return [_decode(raw) for raw in data.split(b"\n")[-lines:]]
