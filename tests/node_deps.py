"""The Node examples' npm dependencies: installed once per package-lock.json, then reused.

``npm ci`` runs into ``<cache>/node/<hash of package.json and package-lock.json>/`` (the cache
is lkrun.paths.cache_dir(), ~/.cache/lkrun by default, as for livekit-server), and the
example gets a ``node_modules`` symlink to it: Node resolves an ES module's imports from the
importing file's directory, so the link is what makes ``node echo.mjs`` find its packages.
A second run finds the finished install and only checks the link.

    python -m tests.node_deps examples/node/echo     # what `make test` runs
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lkrun import paths

REPO = Path(__file__).resolve().parent.parent
NODE_ECHO = REPO / "examples" / "node" / "echo"
INSTALL_TIMEOUT = 600.0
_COMPLETE = ".lkrun-complete"  # written last: an install without it was interrupted


class NodeDepsError(RuntimeError):
    """The npm install failed; the text says which step and why."""


def node_missing() -> str:
    """Why the Node examples cannot run here ("" when they can)."""
    if shutil.which("node") is None:
        return "node is not installed (the Node example needs Node >= 20 and npm)"
    if shutil.which("npm") is None:
        return "npm is not installed (it installs the Node example's dependencies)"
    return ""


def install_dir(project: Path) -> Path:
    """Where ``project``'s dependencies go: one directory per exact dependency set."""
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((project / name).read_bytes())
    return paths.cache_dir() / "node" / digest.hexdigest()[:16]


def ensure_node_modules(project: Path = NODE_ECHO) -> Path:
    """Install ``project``'s locked dependencies unless they are, and link them into it;
    returns the installed node_modules."""
    target = install_dir(project)
    if not (target / _COMPLETE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with _lock(target.with_suffix(".lock")):
            if not (target / _COMPLETE).is_file():  # another process may have finished it
                _install(project, target)
    modules = target / "node_modules"
    _link(project / "node_modules", modules)
    return modules


def _install(project: Path, target: Path) -> None:
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=target.parent))
    try:
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(project / name, staging / name)
        command = ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"]
        try:
            done = subprocess.run(
                command,
                cwd=staging,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise NodeDepsError(f"npm ci in {project} took over {INSTALL_TIMEOUT:g}s") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise NodeDepsError(f"npm ci for {project} failed: {' / '.join(tail)}")
        (staging / _COMPLETE).write_text("")
        if target.exists():  # a leftover without the marker: an interrupted install
            shutil.rmtree(target)
        staging.rename(target)  # whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link(link: Path, modules: Path) -> None:
    """``link`` -> ``modules``; a real node_modules directory (the user's own npm install)
    is left alone."""
    if link.is_symlink():
        if Path(os.readlink(link)) == modules:
            return
        link.unlink()
    elif link.exists():
        return
    # Made beside it and renamed over: a concurrent run never sees a missing link.
    temp = link.with_name(f".node_modules-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temp.unlink()
    temp.symlink_to(modules, target_is_directory=True)
    temp.rename(link)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def main(argv: list[str]) -> int:
    if why := node_missing():
        print(f"skipping the Node example's dependencies: {why}", file=sys.stderr)
        return 0
    for project in argv or [str(NODE_ECHO)]:
        try:
            print(ensure_node_modules(Path(project).resolve()))
        except NodeDepsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
