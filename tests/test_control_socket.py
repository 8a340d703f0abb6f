"""The control socket's directory and peer are checked: another local user cannot stand in."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from lkrun.api import control


def test_our_own_directory_is_used(tmp_path: Path) -> None:
    socket_dir = tmp_path / "lkrun"
    control._prepare_socket_path(socket_dir / "control.sock")
    assert socket_dir.is_dir() and (socket_dir.stat().st_mode & 0o777) == 0o700


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    socket_dir = tmp_path / "lkrun-taken"
    socket_dir.mkdir(mode=0o700)
    os.chown(socket_dir, 12345, 12345)
    with pytest.raises(control.ControlError, match="belongs to uid 12345, not to this user"):
        control._prepare_socket_path(socket_dir / "control.sock")


def test_a_symlink_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "lkrun-link").symlink_to(elsewhere)
    with pytest.raises(control.ControlError, match="not a directory"):
        control._prepare_socket_path(tmp_path / "lkrun-link" / "control.sock")


def test_a_directory_others_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(control.ControlError, match="others may write to it"):
        control._prepare_socket_path(shared / "control.sock")
    # With the sticky bit, as /tmp has, nobody else may remove or replace what is ours.
    shared.chmod(0o1777)
    control._prepare_socket_path(shared / "control.sock")


IMPOSTOR = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
sock.listen()
print("listening", flush=True)
while True:
    conn, _ = sock.accept()
    conn.close()
"""


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.e2e  # a daemon stand-in run as another user
@pytest.mark.skipif(os.getuid() != 0, reason="needs root to listen as another user")
@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="another user needs a python it may run")
def test_the_cli_trusts_no_daemon_of_another_user() -> None:
    assert SYSTEM_PYTHON is not None
    shared = Path(tempfile.mkdtemp(prefix="lkrun-impostor-", dir="/tmp"))
    shared.chmod(0o755)
    os.chown(shared, 65534, 65534)  # the impostor's own directory
    path = shared / "impostor.sock"
    proc = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", textwrap.dedent(IMPOSTOR), str(path)],
        user=65534,
        cwd=shared,
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        with pytest.raises(control.ControlError, match="of uid 65534, not from an lkrun"):
            control.request(path, "/v1/status")
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(shared, ignore_errors=True)


def test_no_daemon_is_reported_as_such(tmp_path: Path) -> None:
    with pytest.raises(control.ControlError, match="cannot reach the lkrun daemon"):
        control.request(tmp_path / "nobody.sock", "/v1/status")


@pytest.mark.e2e  # a python subprocess
def test_the_daemon_can_be_made_non_dumpable() -> None:
    # What keeps same-user job code out of the daemon's /proc/PID/environ and memory.
    probe = (
        "import ctypes; from lkrun.shared import pdeathsig; assert pdeathsig.make_undumpable(); "
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=30, check=True
    )
    assert out.stdout.strip() == "0"


def test_jobs_all_0_means_the_running_jobs() -> None:
    from lkrun.api.control import parse_query
    from lkrun.jobs.store import JobQuery

    assert parse_query({}) is None
    assert parse_query({"all": "0"}) is None  # `dispatch --wait` asks this way
    assert parse_query({"all": "1"}) == JobQuery()  # the whole history, newest 100
    # A filter searches the history even with all=0, and keeps what it filters on.
    assert parse_query({"all": "0", "agent": "echo"}) == JobQuery(agent="echo")
    query = {"agent": "echo", "room": "r", "status": "failed,lost", "since": "5", "limit": "3"}
    assert parse_query(query) == JobQuery(
        statuses=("failed", "lost"), agent="echo", room="r", since=5.0, limit=3
    )
