"""Where lkrun keeps its files by default, per the XDG base directory spec.

Relative values of the XDG variables are ignored, as the spec says.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def _xdg(variable: str) -> Path | None:
    value = os.environ.get(variable, "")
    return Path(value) if value and os.path.isabs(value) else None


def state_dir() -> Path:
    """$XDG_STATE_HOME/lkrun, else ~/.local/state/lkrun: the job history and job logs."""
    return (_xdg("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "lkrun"


def cache_dir() -> Path:
    """$LKRUN_CACHE_DIR, else $XDG_CACHE_HOME/lkrun, else ~/.cache/lkrun: built binaries."""
    if explicit := os.environ.get("LKRUN_CACHE_DIR"):
        return Path(explicit).expanduser()
    return (_xdg("XDG_CACHE_HOME") or Path.home() / ".cache") / "lkrun"


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/lkrun, else a directory of this user's in the temp directory."""
    runtime = _xdg("XDG_RUNTIME_DIR")
    if runtime is not None:
        return runtime / "lkrun"
    return Path(tempfile.gettempdir()) / f"lkrun-{os.getuid()}"


def unsafe_dir(directory: Path) -> str:
    """Why ``directory`` is no place for what lkrun must trust (its control socket, the
    code its agents import): "" if it is a real directory of this user's (or root's) that
    nobody else can write to. In a shared place (/tmp, a cache others can write), another
    user could have made it, or a symlink, first, to answer or run code in lkrun's place.
    A sticky directory (/tmp) is fine: nobody else can remove or replace what is ours in it.
    OSError if it cannot be read (e.g. it does not exist)."""
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory (a symlink?)"
    if info.st_uid not in (os.getuid(), 0):  # root's own (/tmp, /run) cannot be a trap
        return f"it belongs to uid {info.st_uid}, not to this user (uid {os.getuid()})"
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        return f"others may write to it (mode {stat.S_IMODE(info.st_mode):o})"
    return ""
