"""The separate virtual environment of the official worker (never the project's .venv).

``~/.cache/lkrun/bench-venv-livekit-agents-<version>`` (``$LKRUN_CACHE_DIR`` and
``$XDG_CACHE_HOME`` are honoured), made with ``python3 -m venv`` and pip, holding the
pinned ``livekit-agents`` (no plugins), psutil and matplotlib (for the chart).
Reused while its stamp file matches the requirements.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

from lkrun import paths

AGENTS_VERSION = "1.8.9"
REQUIREMENTS = (f"livekit-agents=={AGENTS_VERSION}", "psutil", "matplotlib")
_STAMP = ".lkrun-bench-installed"


class BenchVenvError(Exception):
    pass


def venv_dir() -> Path:
    return paths.cache_dir() / f"bench-venv-livekit-agents-{AGENTS_VERSION}"


def venv_python(directory: Path | None = None) -> Path:
    return (directory or venv_dir()) / "bin" / "python"


def ensure(base_python: str = "python3", *, log: Path | None = None) -> Path:
    """Return the bench venv's python, creating or completing the venv if needed."""
    directory = venv_dir()
    python = venv_python(directory)
    wanted = "\n".join(REQUIREMENTS) + "\n"
    stamp = directory / _STAMP
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f"{directory.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if python.exists() and stamp.exists() and stamp.read_text() == wanted:
            return python
        print(f"bench: installing {', '.join(REQUIREMENTS)} into {directory}", flush=True)
        if not python.exists():
            base = shutil.which(base_python) or base_python
            _run([base, "-m", "venv", str(directory)], log)
        _run([str(python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], log)
        _run(
            [
                str(python),
                "-c",
                "import livekit.agents, matplotlib, psutil; "
                f"assert livekit.agents.__version__ == {AGENTS_VERSION!r}, "
                "livekit.agents.__version__",
            ],
            log,
        )
        stamp.write_text(wanted)
    return python


def _run(command: list[str], log: Path | None) -> None:
    result = subprocess.run(
        command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
    )
    if log is not None:
        with open(log, "a") as out:
            out.write(f"$ {' '.join(command)}\n{result.stdout}{result.stderr}\n")
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise BenchVenvError(f"{' '.join(command[:4])} ... failed ({result.returncode}): {tail}")


if __name__ == "__main__":
    print(ensure(sys.argv[1] if len(sys.argv) > 1 else "python3"))
