"""Agents on an interpreter of their own (the manifest's ``python``).

Everything that runs an agent's code (the import check, the fork server, job processes,
the request process) runs under its interpreter: ``python -m lkrun.child.<module>``. For
that, lkrun's child side must be importable there. It is pure Python and needs only what an
agent env has anyway (``livekit``; ``livekit-agents`` for framework apps), so the daemon
delivers it as a copy: exactly the files of CHILD_SIDE, written once into a
content-addressed directory (``<cache>/child/<version>-<hash of the files>/lkrun/...``, else
under the daemon's state directory) and put first on the PYTHONPATH of that agent's
processes. Its code runs first in every job of such an agent, so a copy found in place is
used only if nobody else could have written it and its files are exactly the daemon's;
otherwise it is made again. Not the daemon's site-packages:
the agent's env must not see the daemon's packages, or its own versions would be shadowed.
An ``lkrun`` installed in the env itself is shadowed by the copy, which comes first.

The copy is made of the daemon's own files, so its version is the daemon's; the import
check (run under the same interpreter, with the same environment, at every start and
reload) reports the lkrun it imported, and the daemon refuses another version (an
interpreter that ignores PYTHONPATH, e.g. a wrapper running ``python -E``, would import
the env's own lkrun).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, MutableMapping
from pathlib import Path

import lkrun
from lkrun import __version__, paths
from lkrun.shared import CHILD_SIDE

PACKAGE = Path(lkrun.__file__).resolve().parent
# The daemon's own settings of its interpreter: never passed to another one.
DAEMON_ONLY_ENV = ("PYTHONPATH", "PYTHONHOME")


class ChildSideError(OSError):
    """The child side could not be written anywhere; the text says where it was tried."""


# A copy no process holds, made this long ago, is another build's leftover: removed when a
# new copy is made beside it. (Processes of this build hold theirs: see _hold.)
PRUNE_AFTER = 24 * 3600.0
# A temporary directory this old is a write that never finished (writing takes milliseconds).
STALE_TEMPORARY = 3600.0
COPY_NAME = re.compile(r"[^.].*-[0-9a-f]{16}")
TEMPORARY_NAME = re.compile(r"\..*-[0-9a-f]{16}\..+")
MISSING = "missing"  # _copy_problem: nothing there yet


def child_files(package: Path = PACKAGE) -> list[Path]:
    """The child side's source files, relative to ``package``, in a stable order."""
    found: list[Path] = []
    for entry in CHILD_SIDE:
        path = package / entry
        if path.is_dir():
            found += [p.relative_to(package) for p in path.rglob("*.py")]
        elif path.is_file():
            found.append(path.relative_to(package))
    return sorted(found, key=lambda p: p.as_posix())


@functools.cache
def _read(package: Path) -> tuple[str, dict[Path, bytes]]:
    """The child side's files and the name of their directory: version and content hash.

    Read once per process (configure() reads them when the daemon starts): the copy is of
    the files this daemon started with, so an lkrun upgraded on disk under a running daemon
    does not reach its agents' processes (the daemon's side would still be the old one)."""
    contents = {rel: (package / rel).read_bytes() for rel in child_files(package)}
    digest = hashlib.sha256()
    for rel, data in contents.items():
        digest.update(rel.as_posix().encode() + b"\0" + data + b"\0")
    return f"{__version__}-{digest.hexdigest()[:16]}", contents


_lock = threading.Lock()  # the import check runs groups in threads
_state_dir: list[Path] = []  # the daemon's state directory, once configure() has run
_verified: set[Path] = set()  # copies this process made or checked (no other user can change)
_held: dict[Path, int] = {}  # lock file -> descriptor: the copies this process uses


def configure(state_dir: Path) -> None:
    """Called where the daemon (or ``lkrun check``) starts: read the child side's files now,
    and use ``state_dir`` (the daemon's own, which it locks) when the cache directory cannot
    be written."""
    with _lock:
        _state_dir[:] = [state_dir]
        _read(PACKAGE)


def child_side_dir(package: Path = PACKAGE, roots: list[Path] | None = None) -> Path:
    """The directory to put first on an agent interpreter's PYTHONPATH (it holds ``lkrun/``
    with the child side only), written if missing (also when deleted since). Its name
    changes with any file, so a daemon never uses another version's copy.

    Written under the cache directory, else the daemon's state directory (the first that
    is safe and writable); ChildSideError if none is. A copy found there is used only if it
    holds exactly the child side's files and nobody else could have written any of it;
    otherwise it is made again.
    """
    with _lock:
        name, contents = _read(package)
        errors = []
        for root in roots if roots is not None else _roots():
            target = root / "child" / name
            try:
                return _materialize(target, contents)
            except OSError as exc:
                errors.append(f"{target.parent}: {exc.strerror or exc}")
        raise ChildSideError(f"cannot write lkrun's child side ({'; '.join(errors)})")


def _roots() -> list[Path]:
    # Not the runtime directory: without XDG_RUNTIME_DIR it is in /tmp, where another user
    # could have made it first.
    return list(dict.fromkeys([paths.cache_dir(), *_state_dir]))


def _materialize(target: Path, contents: Mapping[Path, bytes]) -> Path:
    """Make ``target/lkrun`` a trusted copy of ``contents`` and return ``target``.

    The copy is written into a temporary directory beside it and renamed into place, so no
    process ever sees half a copy and two daemons writing at once both end up with one whole
    copy. One that is there already is checked (once per process: after that no other user
    can change it) and replaced if it differs or others could have written to it.
    """
    home = target.parent
    _private_dir(home.parent)
    _private_dir(home)
    _hold(home / f"{target.name}.lock")
    if target in _verified and (target / "lkrun" / "__init__.py").is_file():
        return target
    for _attempt in range(3):
        problem = _copy_problem(target, contents)
        if not problem:
            _verified.add(target)
            return target
        if problem != MISSING:
            _move_aside(target, problem)
        if _write(target, contents):
            _verified.add(target)
            _prune(home, keep=target.name)
            return target
        # Another process renamed its copy into place first: check that one.
    raise OSError(f"cannot make {target} a copy of lkrun's child side: {problem}")


def _private_dir(directory: Path) -> None:
    """Make ``directory`` unless it exists; OSError unless it is safe to keep code in
    (lkrun.paths.unsafe_dir)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=0o755)
        directory.chmod(0o755)  # whatever the umask: nobody else writes here
    except FileExistsError:
        pass
    if problem := paths.unsafe_dir(directory):
        raise OSError(f"refusing {directory}: {problem}")


def _copy_problem(target: Path, contents: Mapping[Path, bytes]) -> str:
    """Why ``target`` is not a copy of ``contents`` to trust, "" if it is: every entry must
    be this user's, written by nobody else, no link, and its files exactly ``contents``
    (besides the ``__pycache__`` directories the agents' interpreters fill)."""
    files: set[Path] = set()
    try:
        for path, info in _tree(target):
            if problem := _entry_problem(path, info):
                return problem
            rel = path.relative_to(target)
            if stat.S_ISREG(info.st_mode) and "__pycache__" not in rel.parts:
                files.add(rel)
    except FileNotFoundError:
        return MISSING if not target.exists() else f"{target} changed while it was read"
    except OSError as exc:
        return f"cannot read {target}: {exc.strerror or exc}"
    expected = {Path("lkrun") / rel for rel in contents}
    if files != expected:
        extra, lacking = sorted(files - expected), sorted(expected - files)
        return f"its files differ (extra: {extra[:3]}, lacking: {lacking[:3]})"
    for rel, data in contents.items():
        if (target / "lkrun" / rel).read_bytes() != data:
            return f"lkrun/{rel} differs"
    return ""


def _entry_problem(path: Path, info: os.stat_result) -> str:
    if info.st_uid != os.getuid():
        return f"{path} belongs to uid {info.st_uid}"
    if info.st_mode & 0o022:
        return f"others may write to {path} (mode {stat.S_IMODE(info.st_mode):o})"
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        return f"{path} is not a regular file or directory"
    return ""


def _tree(top: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """``top`` and everything below it, with its lstat; links are not followed."""
    info = os.lstat(top)
    yield top, info
    if stat.S_ISDIR(info.st_mode):
        with os.scandir(top) as entries:
            children = sorted(Path(entry.path) for entry in entries)
        for child in children:
            yield from _tree(child)


def _write(target: Path, contents: Mapping[Path, bytes]) -> bool:
    """Write ``contents`` under ``target/lkrun``; False if another process made ``target``
    meanwhile."""
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for rel, data in contents.items():
            file = temporary / "lkrun" / rel
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(data)
        for directory in {temporary / "lkrun" / rel.parent for rel in contents}:
            # Made now, so that an interpreter run with a lax umask does not make it
            # writable by others (its .pyc files take the mode of their source).
            (directory / "__pycache__").mkdir(exist_ok=True)
        for path, info in _tree(temporary):
            # mkdtemp's 0700 would hide it from a job run as another user; the umask may
            # have let others write.
            path.chmod(0o755 if stat.S_ISDIR(info.st_mode) else 0o644)
        try:
            os.rename(temporary, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return False
            raise
        return True
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _move_aside(target: Path, problem: str) -> None:
    """Take a copy that cannot be trusted out of the way (then removed)."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        os.rename(target, aside)  # onto the empty directory: replaces it
    except FileNotFoundError:
        pass  # another process moved it first
    except OSError as exc:
        raise OSError(f"{target} cannot be used ({problem}) nor replaced: {exc.strerror}") from exc
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _hold(lock: Path) -> None:
    """Hold ``lock`` shared while this process lives: _prune() in other processes leaves the
    copy alone (it takes the lock exclusively before removing a copy and its lock file)."""
    if lock in _held:
        return
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False  # removed by a prune between our open and our lock
        if same:
            _held[lock] = fd
            return
        os.close(fd)


def _prune(home: Path, keep: str) -> None:
    """Remove what other builds left in ``home``: copies no process holds that were made
    more than PRUNE_AFTER ago, and temporary directories of writes that never finished."""
    now = time.time()
    with os.scandir(home) as entries:
        found = [(entry.name, entry.stat(follow_symlinks=False)) for entry in entries]
    for name, info in found:
        age = now - info.st_mtime
        if not stat.S_ISDIR(info.st_mode) or name == keep:
            continue
        if TEMPORARY_NAME.fullmatch(name) and age > STALE_TEMPORARY:
            shutil.rmtree(home / name, ignore_errors=True)
        elif COPY_NAME.fullmatch(name) and age > PRUNE_AFTER:
            _remove_unheld(home / name)


def _remove_unheld(copy: Path) -> None:
    lock = copy.parent / f"{copy.name}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:  # made by a build that held no locks
        shutil.rmtree(copy, ignore_errors=True)
        return
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # a process uses it
    try:
        shutil.rmtree(copy, ignore_errors=True)
        lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


def own_python_env(
    env: MutableMapping[str, str],
    *,
    workdir: Path,
    agent_env: Mapping[str, str],
    child_dir: Path | None = None,
) -> None:
    """Make ``env`` (a job environment, the agent's ``env`` applied) right for an agent on
    its own interpreter: the child side first on PYTHONPATH, then the manifest env's
    PYTHONPATH if it sets one, else the manifest's directory; the daemon's own PYTHONPATH
    and PYTHONHOME are left out (they are for the daemon's interpreter)."""
    for name in DAEMON_ONLY_ENV:
        if name not in agent_env:
            env.pop(name, None)
    rest = agent_env.get("PYTHONPATH", str(workdir))
    first = str(child_dir or child_side_dir())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (first, rest) if p)


def install_hint(python: str, package: str) -> str:
    """How to install ``package`` into the env of the interpreter ``python``."""
    return f"run {python} -m pip install {package}"


def in_python_env(path: Path, top: Path) -> bool:
    """Whether ``path`` lies in a Python environment below ``top``: a virtualenv (a
    directory holding pyvenv.cfg) or any site-packages. Its files change when packages are
    installed, which is not agent code changing: a reload in the middle of a pip install
    would load half of it. Not cached: a venv made later must count too. Only the part of
    the path below ``top`` counts (a manifest may itself live in a site-packages)."""
    try:
        below = path.relative_to(top).parts
    except ValueError:
        return False  # not below the manifest's directory: not watched
    if "site-packages" in below:
        return True
    for parent in path.parents:
        if parent == top or top not in parent.parents:
            return False
        if (parent / "pyvenv.cfg").is_file():
            return True
    return False
