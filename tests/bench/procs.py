"""Processes the bench starts, and how it stops them (always, even on Ctrl-C).

Every long-lived process (lkrun daemons, official workers) starts in its own session,
so a terminal's Ctrl-C reaches only the bench, which then stops them in order. Each
also gets a parent-death signal (Linux), so they die if the bench itself is killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from lkrun.shared import pdeathsig


def _death_signal_preexec() -> Callable[[], None] | None:
    """A preexec_fn that SIGKILLs the child when the bench (its parent thread) dies."""
    return pdeathsig.preexec(signal.SIGKILL)


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


class Spawned:
    """One long-lived child process with its log file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, *, signals: int = 1, timeout: float = 20.0) -> None:
        """SIGTERM (``signals`` times), wait, then SIGKILL the process and its descendants."""
        tree = descendants(self.pid)  # remember them: they may be reparented once we exit
        if self.alive():
            for _ in range(signals):
                with contextlib.suppress(ProcessLookupError):
                    self.proc.send_signal(signal.SIGTERM)
                time.sleep(0.2)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        tree += [p for p in descendants(self.pid) if p not in tree]
        _kill_leftovers(tree)


def _kill_leftovers(tree: list[psutil.Process]) -> None:
    for child in tree:
        with contextlib.suppress(psutil.Error):
            if child.is_running():
                child.kill()
    psutil.wait_procs(tree, timeout=5)


class Registry:
    """Every process the bench started, so that one call stops them all."""

    def __init__(self) -> None:
        self._spawned: list[Spawned] = []

    def spawn(
        self,
        name: str,
        command: list[str],
        *,
        env: dict[str, str],
        log_path: Path,
        cwd: Path | None = None,
    ) -> Spawned:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_death_signal_preexec(),
            )
        spawned = Spawned(name, proc, log_path)
        self._spawned.append(spawned)
        return spawned

    def forget(self, spawned: Spawned) -> None:
        if spawned in self._spawned:
            self._spawned.remove(spawned)

    def stop_all(self) -> None:
        while self._spawned:
            spawned = self._spawned.pop()
            with contextlib.suppress(Exception):
                spawned.stop(signals=2, timeout=10)
