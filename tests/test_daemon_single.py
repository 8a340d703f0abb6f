"""One daemon per control socket and per state directory (issue 17, item 1).

A daemon refused at start must leave the running one's socket and state alone.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lkrun.api import control
from lkrun.api.control import ControlServer
from lkrun.jobs.statelock import (
    LOCK_NAME,
    Holder,
    StateDirBusy,
    StateLock,
    last_holder,
    this_host,
)
from tests.conftest import DaemonProc, unique
from tests.helpers import agent_table


class _View:
    """A DaemonView that answers nothing; the tests here only bind and unbind."""

    def status(self) -> Any:
        return {"ready": True}


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    return sock


async def test_stop_leaves_a_socket_that_replaced_ours(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    server = ControlServer(path, _View())  # type: ignore[arg-type]
    await server.start()
    ours = os.lstat(path).st_ino
    # Someone else's socket at the same path now (e.g. ours was removed by hand and a
    # second daemon started): stopping must not remove it.
    path.unlink()
    other = _listen(path)
    theirs = os.lstat(path).st_ino
    try:
        assert theirs != ours
        await server.stop()
        assert os.lstat(path).st_ino == theirs
    finally:
        other.close()


async def test_stop_removes_our_own_socket(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    server = ControlServer(path, _View())  # type: ignore[arg-type]
    await server.start()
    await server.stop()
    assert not path.exists()


async def test_refused_start_leaves_the_listening_socket(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    first = ControlServer(path, _View())  # type: ignore[arg-type]
    await first.start()
    try:
        inode = os.lstat(path).st_ino
        second = ControlServer(path, _View())  # type: ignore[arg-type]
        with pytest.raises(control.ControlError, match="already listening"):
            await second.start()
        await second.stop()  # what the daemon's cleanup does
        assert os.lstat(path).st_ino == inode
        status = await control.get(path, "/v1/status")
        assert status == {"ready": True}
    finally:
        await first.stop()


async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir(mode=0o700)
    _listen(path).close()  # a dead daemon's file: nobody listens
    server = ControlServer(path, _View())  # type: ignore[arg-type]
    await server.start()
    try:
        assert await control.get(path, "/v1/status") == {"ready": True}
    finally:
        await server.stop()


def test_state_lock_is_exclusive_and_names_the_holder(tmp_path: Path) -> None:
    state = tmp_path / "state"
    held = StateLock.acquire(state)
    try:
        # Its pid and host: `lkrun recover` refuses a directory last held elsewhere.
        assert (state / LOCK_NAME).read_text().splitlines() == [str(os.getpid()), this_host()]
        assert last_holder(state) == Holder(os.getpid(), this_host())
        # A second open file description conflicts even within one process (flock).
        with pytest.raises(StateDirBusy) as refused:
            StateLock.acquire(state)
        message = str(refused.value)
        assert str(state) in message and f"pid {os.getpid()}" in message
        assert "\n" not in message
    finally:
        held.release()
    again = StateLock.acquire(state)  # free once released
    again.release()


@pytest.mark.e2e  # a child process
def test_state_lock_is_not_inherited_by_children(tmp_path: Path) -> None:
    """A child started while the lock is held (a job, a fork server) must not keep it."""
    state = tmp_path / "state"
    held = StateLock.acquire(state)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        held.release()
        StateLock.acquire(state).release()  # the child does not hold it
    finally:
        child.kill()
        child.wait()


def _serve(daemon: DaemonProc, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`lkrun serve` run to its end (a refused daemon exits at once)."""
    return subprocess.run(
        [sys.executable, "-m", "lkrun", "serve", str(daemon.manifest_path), *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=daemon.dir,
        check=False,
    )


@pytest.mark.e2e
async def test_second_daemon_leaves_the_first_one_reachable(
    start_daemon: Any, livekit_server: Any, tmp_path: Path
) -> None:
    name = unique("echo")
    first = await start_daemon(agent_table(name))
    socket_inode = os.lstat(first.socket).st_ino

    # B: the same control socket, its own state directory.
    same_socket = DaemonProc(tmp_path / "b", livekit_server, agent_table(name), [])
    same_socket.socket = first.socket
    refused = _serve(same_socket, "--http-addr", "127.0.0.1:0")
    assert refused.returncode != 0, refused.stderr
    assert "already listening" in refused.stderr
    assert os.lstat(first.socket).st_ino == socket_inode
    status = first.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["pid"] == first.pid

    # C: another socket, the first daemon's state directory.
    first_state = first.dir / "state" / "lkrun"  # XDG_STATE_HOME/lkrun
    lock_holder = (first_state / LOCK_NAME).read_text().splitlines()[0]
    assert lock_holder == str(first.pid)
    before = sorted(p.name for p in first_state.iterdir())
    same_state = DaemonProc(tmp_path / "c", livekit_server, agent_table(name), [])
    refused = _serve(same_state, "--state-dir", str(first_state), "--http-addr", "127.0.0.1:0")
    assert refused.returncode != 0, refused.stderr
    error_lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1, refused.stderr
    assert str(first_state) in error_lines[0] and f"pid {first.pid}" in error_lines[0]
    assert not same_state.socket.exists()  # it bound nothing
    assert sorted(p.name for p in first_state.iterdir()) == before
    assert (first_state / LOCK_NAME).read_text().splitlines()[0] == str(first.pid)

    # The first daemon still answers and is still ready.
    assert (await first.status())["ready"] is True
    assert os.lstat(first.socket).st_ino == socket_inode
