"""The small helpers both sides share: one-line texts, background tasks, default paths,
process-group signals."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from lkrun import paths
from lkrun.shared import pdeathsig
from lkrun.shared.tasks import BackgroundTasks
from lkrun.shared.text import describe, last_lines, one_line, printable

# --- one-line texts ------------------------------------------------------------------------


def test_one_line_collapses_whitespace_and_cuts() -> None:
    assert one_line("a\n  b\tc\r\n") == "a b c"
    assert one_line("x" * 10, limit=8) == "xxxxx..."
    assert one_line("short", limit=8) == "short"
    assert one_line(ValueError("bad\nvalue")) == "bad value"
    assert one_line(TimeoutError()) == "TimeoutError"  # no message: its type


def test_describe_puts_the_type_first() -> None:
    assert describe(ValueError("bad\n value")) == "ValueError: bad value"
    assert describe(TimeoutError()) == "TimeoutError"


def test_last_lines_of_output() -> None:
    output = "one\n\n\x1b[31mtwo\x1b[0m  \nthree\n   \n"
    assert last_lines(output) == "three"
    assert last_lines(output, 2) == "two | three"
    assert last_lines(output, 5) == "one | two | three"
    assert last_lines(output, 5, limit=9) == "...o | three"
    assert last_lines("") == ""


def test_printable_shows_control_characters_escaped() -> None:
    assert printable("room\x1b[31m red\x9b\x00\x7f") == "room\\x1b[31m red\\x9b\\x00\\x7f"
    assert printable("a\nb\r\u202ec\u2028") == "a\\x0ab\\x0d\\u202ec\\u2028"
    assert printable("tab\tand ünïcode [b]x[/b]") == "tab\tand ünïcode [b]x[/b]"
    assert printable(42) == "42"


# --- background tasks ---------------------------------------------------------------------


async def test_background_tasks_are_held_until_done_and_joined() -> None:
    tasks = BackgroundTasks()
    done: list[int] = []

    async def work(n: int) -> None:
        await asyncio.sleep(0.01 * n)
        done.append(n)
        if n == 1:
            tasks.spawn(work(3))  # spawned meanwhile: join waits for it too

    tasks.spawn(work(1), name="one")
    tasks.spawn(work(2))
    assert len(tasks) == 2
    await tasks.join()
    assert sorted(done) == [1, 2, 3]
    assert len(tasks) == 0


async def test_background_tasks_close_gives_grace_then_cancels() -> None:
    tasks = BackgroundTasks()
    finished: list[str] = []

    async def quick() -> None:
        await asyncio.sleep(0.01)
        finished.append("quick")

    hung = tasks.spawn(asyncio.sleep(60))
    tasks.spawn(quick())
    await tasks.close(grace=0.5)
    assert finished == ["quick"]
    assert hung.cancelled()
    assert len(tasks) == 0


async def test_background_tasks_report_failures() -> None:
    failures: list[tuple[str, str]] = []

    def on_error(task: Any, exc: BaseException) -> None:
        failures.append((task.get_name(), str(exc)))

    async def fail() -> None:
        raise RuntimeError("boom")

    tasks = BackgroundTasks(on_error=on_error)
    tasks.spawn(fail(), name="failing")
    tasks.spawn(asyncio.sleep(60))  # cancelled by close: not a failure
    await asyncio.sleep(0.01)
    await tasks.close()
    assert failures == [("failing", "boom")]


# --- default paths ------------------------------------------------------------------------


def test_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert paths.state_dir() == tmp_path / "state" / "lkrun"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # ignored, per the XDG spec
    assert paths.state_dir() == tmp_path / "home" / ".local" / "state" / "lkrun"


def test_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LKRUN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert paths.cache_dir() == tmp_path / "home" / ".cache" / "lkrun"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "lkrun"
    monkeypatch.setenv("LKRUN_CACHE_DIR", str(tmp_path / "explicit"))
    assert paths.cache_dir() == tmp_path / "explicit"


def test_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert paths.runtime_dir() == tmp_path / "lkrun"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert paths.runtime_dir() == Path(tempfile.gettempdir()) / f"lkrun-{os.getuid()}"


# --- process groups -----------------------------------------------------------------------


@pytest.mark.e2e  # a process group of two
def test_signal_group_reaches_the_whole_group() -> None:
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        assert pdeathsig.signal_group(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
    # The group (the leader and its child) is gone now, or going: nothing left to signal.
    for _ in range(100):
        if not pdeathsig.signal_group(proc.pid, signal.SIGKILL):
            break
        time.sleep(0.05)
    assert not pdeathsig.signal_group(proc.pid, signal.SIGKILL)
