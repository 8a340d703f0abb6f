"""Where lkrun keeps its files by default, per the XDG base directory spec.

Relative values of the XDG variables are ignored, as the spec says.
"""

from __future__ import annotations

import os
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
