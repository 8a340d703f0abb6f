"""One daemon per state directory: a lock held for the daemon's life.

The job history marks rows `lost` when their daemon is gone and each daemon prunes what it
deems old; two daemons on one directory would judge each other's jobs. So a daemon takes
`<state_dir>/lkrun.lock` (flock, exclusive, non-blocking) before it touches the history,
the job logs or any socket, and holds it until it exits. The kernel drops the lock when
the process dies, however it dies, so a stale lock cannot block a restart.

The file names its last holder, ``<pid>\n<host name>\n``, and keeps it after the holder
is gone: `lkrun recover` reads whose directory it is. A lock and a pid are only proof on
the host that holds them (flock may not reach across a network file system, a pid means
nothing on another machine), so `lkrun recover` refuses a directory last held on another
host unless told that daemon is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = "lkrun.lock"


class StateDirBusy(Exception):
    """Another process holds the state directory's lock; ``holder`` is its pid if known."""

    def __init__(self, message: str, holder: int | None = None) -> None:
        super().__init__(message)
        self.holder = holder


class StateLock:
    """The held lock on one state directory; release() (or process exit) frees it."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory: Path) -> StateLock:
        """Take the lock; StateDirBusy (naming the holder's pid) if another process has it,
        OSError if the directory or the file cannot be made."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / LOCK_NAME
        # Not inherited (Python's default): a job or fork server must not hold it on.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise StateDirBusy(
                f"the state directory {directory} is in use by another lkrun daemon ({who}); "
                "give each daemon its own --state-dir",
                holder,
            ) from None
        except OSError:
            os.close(fd)
            raise
        # Ours now: say who holds it, for the next one that is refused.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{this_host()}\n".encode(), 0)
        return cls(directory, fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlock. The file stays: removing it would let a waiting daemon lock a file that
        a third one then recreates and locks too."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the only descriptor drops the flock


@dataclass(frozen=True)
class Holder:
    """Who last took a state directory's lock (it may be gone): "" and None when unknown
    (no lock file yet, or one an older lkrun wrote without its host)."""

    pid: int | None
    host: str


def this_host() -> str:
    return socket.gethostname()


def last_holder(directory: Path) -> Holder:
    """The lock file's holder, read without taking the lock."""
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return Holder(None, "")
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _read_holder(fd: int) -> Holder:
    try:
        lines = os.pread(fd, 512, 0).decode(errors="replace").splitlines()
    except OSError:
        return Holder(None, "")
    pid = lines[0].strip() if lines else ""
    host = lines[1].strip() if len(lines) > 1 else ""
    return Holder(int(pid) if pid.isdigit() else None, host)


def _read_pid(fd: int) -> int | None:
    return _read_holder(fd).pid
