"""lkrun.devserver: the binary cache, the go build (with a fake `go`), and a real dev server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lkrun import devserver, paths
from lkrun.devserver import DevServer, DevServerError

pytestmark = pytest.mark.e2e  # livekit-server processes


REPO = Path(__file__).resolve().parent.parent
VERSION = devserver.LIVEKIT_SERVER_VERSION

# A stand-in for `go`: records how it was called, then builds (or fails) as told by env.
FAKE_GO = """\
import os, sys
from pathlib import Path
with open(os.environ["FAKE_GO_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
    log.write("GOBIN=" + os.environ.get("GOBIN", "") + "\\n")
    log.write("GOPATH=" + os.environ.get("GOPATH", "<unset>") + "\\n")
if os.environ.get("FAKE_GO_FAIL"):
    for i in range(20):
        print(f"go: error line {i}")
    sys.exit(2)
built = Path(os.environ["GOBIN"]) / "server"
built.write_text("#!/bin/sh\\necho fake livekit-server\\n")
built.chmod(0o755)
"""

# Fault injection: servers the real livekit-server cannot be made to imitate.
FAKE_SERVER_EXITS = """\
import os, sys
print("fatal: cannot start", "keys=" + str(os.environ.get("LIVEKIT_KEYS")))
print("redis=" + str(os.environ.get("REDIS_HOST")))
sys.exit(3)
"""
FAKE_SERVER_NEVER_ANSWERS = """\
import os, signal, sys
from pathlib import Path
Path(os.environ["FAKE_PID_FILE"]).write_text(str(os.getpid()))
signal.pause()
"""
FAKE_SERVER_IGNORES_SIGTERM = """\
import http.server, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
port = int(sys.argv[sys.argv.index("--port") + 1])
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"OK")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), Ok).serve_forever()
"""


def write_script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def pid_gone(pid: int) -> bool:
    """True if no such process, or only an unreaped zombie is left."""
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def http_status(url: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=5) as response:
        return int(response.status)


def free_ports() -> dict[str, int]:
    return {
        "port": devserver.free_tcp_port(),
        "rtc_tcp_port": devserver.free_tcp_port(),
        "udp_port": devserver.free_udp_port(),
    }


# --- cache directory and binary lookup ---------------------------------------------------


def test_binary_lives_in_the_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Where the cache dir is: tests/test_shared_helpers.py.
    monkeypatch.setenv("LKRUN_CACHE_DIR", str(tmp_path / "explicit"))
    assert devserver.server_binary_path("v9.9.9") == (
        tmp_path / "explicit" / "livekit-server-v9.9.9" / "server"
    )


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache, a PATH holding only a fake `go`, and no fallback go."""
    monkeypatch.setenv("LKRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LKRUN_LIVEKIT_SERVER", raising=False)
    monkeypatch.delenv("FAKE_GO_FAIL", raising=False)
    monkeypatch.setenv("FAKE_GO_LOG", str(tmp_path / "go.log"))
    write_script(tmp_path / "bin" / "go", FAKE_GO)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(devserver, "_GO_FALLBACK", tmp_path / "no-such-go")
    return tmp_path


def go_calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "go.log"
    return log.read_text().splitlines() if log.exists() else []


def test_env_override_wins(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = write_script(isolated / "custom" / "livekit-server", "print('hi')\n")
    monkeypatch.setenv("LKRUN_LIVEKIT_SERVER", str(binary))
    assert devserver.ensure_server_binary() == binary
    assert go_calls(isolated) == []


def test_env_override_must_be_executable(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LKRUN_LIVEKIT_SERVER", str(isolated / "missing"))
    with pytest.raises(DevServerError, match=r"LKRUN_LIVEKIT_SERVER=.*not an executable"):
        devserver.ensure_server_binary()


def test_cached_binary_is_used_without_go(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = write_script(devserver.server_binary_path(), "print('cached')\n")
    monkeypatch.setenv("PATH", str(isolated / "empty"))
    assert devserver.ensure_server_binary(on_build=pytest.fail) == cached


def test_missing_go_is_reported(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(isolated / "empty"))
    with pytest.raises(DevServerError) as info:
        devserver.ensure_server_binary()
    assert str(info.value) == (
        "livekit-server is not installed and `go` was not found; "
        "install Go >= 1.22 or set LIVEKIT_URL to an existing server"
    )


# --- building with (a fake) go -------------------------------------------------------------


def test_build_installs_binary_once(isolated: Path) -> None:
    messages: list[str] = []
    binary = devserver.ensure_server_binary(on_build=messages.append)

    assert binary == devserver.server_binary_path()
    assert os.access(binary, os.X_OK)
    assert messages == [
        f"building livekit-server {VERSION} with go install (first run only, takes a few minutes)"
    ]
    args, gobin, gopath = go_calls(isolated)
    assert args == f"install github.com/livekit/livekit-server/cmd/server@{VERSION}"
    assert Path(gobin.removeprefix("GOBIN=")).parent == binary.parent
    assert gopath == "GOPATH=" + os.environ.get("GOPATH", "<unset>")  # go's defaults are kept
    assert sorted(p.name for p in binary.parent.iterdir()) == ["server"]  # temp GOBIN removed

    assert devserver.ensure_server_binary(on_build=messages.append) == binary
    assert len(go_calls(isolated)) == 3 and len(messages) == 1


def test_failed_build_reports_last_lines(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_GO_FAIL", "1")
    with pytest.raises(DevServerError) as info:
        devserver.ensure_server_binary()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"building livekit-server {VERSION} with go install failed (exit 2)")
    assert "go: error line 19" in message and "go: error line 0 " not in message
    target = devserver.server_binary_path()
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # temp GOBIN removed


def lock_waiters_in_this_process() -> int:
    """Blocked flock requests in /proc/locks owned by this process."""
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and line.split()[5] == str(os.getpid()))


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs /proc/locks")
def test_build_waits_for_lock_and_rechecks(isolated: Path) -> None:
    """A second builder blocks on the lock, then finds the binary the first one built."""
    import fcntl

    cache = paths.cache_dir()
    cache.mkdir(parents=True)
    result: list[Path | BaseException] = []

    def build() -> None:
        try:
            result.append(devserver.ensure_server_binary(on_build=pytest.fail))
        except BaseException as exc:
            result.append(exc)

    with open(cache / f"livekit-server-{VERSION}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # we play the process that is building
        thread = threading.Thread(target=build, daemon=True)
        thread.start()
        wait_until(
            lambda: lock_waiters_in_this_process() > 0, 10, "the builder to wait on the lock"
        )
        built = write_script(devserver.server_binary_path(), "print('built elsewhere')\n")
    thread.join(timeout=10)

    assert result == [built]
    assert go_calls(isolated) == []


# --- DevServer -----------------------------------------------------------------------------


def test_urls_keys_and_command() -> None:
    server = DevServer(Path("/x/server"), port=1, rtc_tcp_port=2, udp_port=3, redis_host="r:6379")
    assert (server.url, server.http_url) == ("ws://127.0.0.1:1", "http://127.0.0.1:1")
    assert (server.api_key, server.api_secret) == ("devkey", "secret")
    command = server._command()
    for flag, value in [
        ("--bind", "127.0.0.1"),
        ("--node-ip", "127.0.0.1"),
        ("--port", "1"),
        ("--rtc.tcp_port", "2"),
        ("--udp-port", "3"),
        ("--redis-host", "r:6379"),
    ]:
        assert command[command.index(flag) + 1] == value
    assert "--dev" in command
    assert "--redis-host" not in DevServer(Path("/x/server"))._command()
    assert not server.running() and server.pid is None
    server.stop()  # never started: a no-op


@pytest.fixture(scope="module")
def server_binary() -> Path:
    return devserver.ensure_server_binary(on_build=lambda m: print(m, file=sys.stderr))


@pytest.fixture
def started() -> Iterator[list[DevServer]]:
    """Servers a test started; stopped afterwards even if the test fails."""
    servers: list[DevServer] = []
    yield servers
    for server in servers:
        server.stop()


def test_real_server_answers_and_stops_cleanly(
    server_binary: Path, tmp_path: Path, started: list[DevServer]
) -> None:
    log = tmp_path / "server.log"
    server = DevServer(server_binary, log_path=log, **free_ports())
    started.append(server)
    with server:
        assert server.running()
        assert http_status(server.http_url) == 200
        pid = server.pid
        assert pid is not None and os.getpgid(pid) == pid  # its own process group

        twin = DevServer(server_binary, port=server.port, log_path=log)
        with pytest.raises(DevServerError, match=f"port {server.port} on 127.0.0.1 is already"):
            twin.start()
        assert not twin.running()

    assert not server.running() and server.pid is None
    assert pid_gone(pid)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # nothing left in its process group
    assert "starting LiveKit server" in log.read_text()
    server.stop()  # idempotent


def test_stop_right_after_start_is_graceful(
    server_binary: Path, tmp_path: Path, started: list[DevServer]
) -> None:
    """livekit-server ignores an early SIGTERM; stop() must still end it without SIGKILL."""
    server = DevServer(server_binary, log_path=tmp_path / "log", **free_ports())
    started.append(server)
    server.start()
    pid = server.pid
    assert pid is not None
    began = time.monotonic()
    server.stop(timeout=30)
    assert time.monotonic() - began < 10  # SIGKILL would only come after 30 s
    assert pid_gone(pid)


def test_port_in_use_is_refused(server_binary: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = DevServer(
            server_binary, log_path=tmp_path / "log", **{**free_ports(), "port": port}
        )
        with pytest.raises(DevServerError) as info:
            server.start()
    assert str(info.value) == (
        f"port {port} on 127.0.0.1 is already in use; stop the other server or set LIVEKIT_URL"
    )
    assert not server.running()


def test_udp_port_in_use_is_refused(server_binary: Path, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        server = DevServer(
            server_binary, log_path=tmp_path / "log", **{**free_ports(), "udp_port": port}
        )
        with pytest.raises(DevServerError, match=f"UDP port {port} on 127.0.0.1 is already"):
            server.start()
    assert not server.running()


def test_server_exit_reports_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIVEKIT_KEYS", "prod: key")  # must not reach the dev server
    monkeypatch.setenv("REDIS_HOST", "prod-redis:6379")
    fake = write_script(tmp_path / "fake-server-exits", FAKE_SERVER_EXITS)
    log = tmp_path / "log"
    log.write_text("old run output\n")
    server = DevServer(fake, log_path=log, **free_ports())
    with pytest.raises(DevServerError) as info:
        server.start()
    message = str(info.value)
    assert message.startswith("livekit-server exited with code 3 before it was ready")
    assert "fatal: cannot start keys=None | redis=None" in message
    assert "old run output" not in message and "\n" not in message
    assert not server.running()


def test_server_that_never_answers_times_out_and_is_killed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pid_file = tmp_path / "pid"
    monkeypatch.setenv("FAKE_PID_FILE", str(pid_file))
    fake = write_script(tmp_path / "fake-server-silent", FAKE_SERVER_NEVER_ANSWERS)
    server = DevServer(fake, log_path=tmp_path / "log", **free_ports())
    with pytest.raises(DevServerError, match=r"did not answer on http://127\.0\.0\.1:\d+ within"):
        server.start(timeout=1.0)
    assert pid_file.exists()
    assert pid_gone(int(pid_file.read_text()))
    assert not server.running()


def test_stop_escalates_to_sigkill(tmp_path: Path, started: list[DevServer]) -> None:
    fake = write_script(tmp_path / "fake-server-ignores-sigterm", FAKE_SERVER_IGNORES_SIGTERM)
    server = DevServer(fake, log_path=tmp_path / "log", **free_ports())
    started.append(server)
    server.start(timeout=10)
    pid = server.pid
    assert pid is not None
    server.stop(timeout=0.5)
    assert pid_gone(pid)


CHILD = """\
import sys
from pathlib import Path
from lkrun import devserver
server = devserver.DevServer(
    Path(sys.argv[1]),
    port=devserver.free_tcp_port(),
    rtc_tcp_port=devserver.free_tcp_port(),
    udp_port=devserver.free_udp_port(),
    log_path=Path(sys.argv[2]),
)
server.start()
print(server.pid, flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_server_dies_with_sigkilled_parent(server_binary: Path, tmp_path: Path) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(server_binary), str(tmp_path / "log")],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    server_pid = 0
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        assert not pid_gone(server_pid)
        parent.kill()
        parent.wait(timeout=10)
        wait_until(lambda: pid_gone(server_pid), 10, "the orphaned server to exit")
    finally:
        parent.kill()
        parent.wait(timeout=10)
        if server_pid and not pid_gone(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
