"""Agents on an interpreter of their own (the manifest's ``python``).

Everything that runs an agent's code (the import check, the fork server, job processes,
the request process) runs under its interpreter: ``python -m lkrun.child.<module>``. For
that, lkrun's child side must be importable there. It is pure Python and needs only what an
agent env has anyway (``livekit``; ``livekit-agents`` for framework apps), so the daemon
delivers it as a copy: exactly the files of CHILD_SIDE, written once into a
content-addressed directory (``<cache>/child/<version>-<hash of the files>/lkrun/...``)
and put first on the PYTHONPATH of that agent's processes. Not the daemon's site-packages:
the agent's env must not see the daemon's packages, or its own versions would be shadowed.
An ``lkrun`` installed in the env itself is shadowed by the copy, which comes first.

The copy is made of the daemon's own files, so its version is the daemon's; the import
check (run under the same interpreter, with the same environment, at every start and
reload) reports the lkrun it imported, and the daemon refuses another version (an
interpreter that ignores PYTHONPATH, e.g. a wrapper running ``python -E``, would import
the env's own lkrun).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, MutableMapping
from pathlib import Path

import lkrun
from lkrun import __version__, paths
from lkrun.shared import CHILD_SIDE

PACKAGE = Path(lkrun.__file__).resolve().parent
# The daemon's own settings of its interpreter: never passed to another one.
DAEMON_ONLY_ENV = ("PYTHONPATH", "PYTHONHOME")


class ChildSideError(OSError):
    """The child side could not be written anywhere; the text says where it was tried."""


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

    Read once per process: the copy is of the files this daemon started with, so an lkrun
    upgraded on disk under a running daemon does not reach its agents' processes (the
    daemon's side would still be the old one)."""
    contents = {rel: (package / rel).read_bytes() for rel in child_files(package)}
    digest = hashlib.sha256()
    for rel, data in contents.items():
        digest.update(rel.as_posix().encode() + b"\0" + data + b"\0")
    return f"{__version__}-{digest.hexdigest()[:16]}", contents


_lock = threading.Lock()  # the import check runs groups in threads


def child_side_dir(package: Path = PACKAGE, roots: list[Path] | None = None) -> Path:
    """The directory to put first on an agent interpreter's PYTHONPATH (it holds ``lkrun/``
    with the child side only), written if missing (also when deleted since). Its name
    changes with any file, so a daemon never uses another version's copy.

    Written under the cache directory, else the state directory, else the runtime
    directory (the first writable); ChildSideError if none is.
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
    return list(dict.fromkeys([paths.cache_dir(), paths.state_dir(), paths.runtime_dir()]))


def _materialize(target: Path, contents: Mapping[Path, bytes]) -> Path:
    """Write ``contents`` under ``target/lkrun`` unless it is there: into a temporary
    directory beside it, renamed into place, so no process ever sees half a copy and two
    daemons writing at once both end up with one whole copy."""
    if (target / "lkrun" / "__init__.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for rel, data in contents.items():
            file = temporary / "lkrun" / rel
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(data)
        temporary.chmod(0o755)  # mkdtemp's 0700 would hide it from a job run as another user
        try:
            os.rename(temporary, target)
        except OSError:
            if not (target / "lkrun" / "__init__.py").is_file():
                raise
            # Another daemon (or check) renamed its copy first: same name, same files.
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return target


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
    would load half of it. Not cached: a venv made later must count too."""
    if "site-packages" in path.parts:
        return True
    for parent in path.parents:
        if parent == top or top not in parent.parents:
            return False
        if (parent / "pyvenv.cfg").is_file():
            return True
    return False
