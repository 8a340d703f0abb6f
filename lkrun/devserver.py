"""Install and run a local livekit-server in dev mode, on loopback only.

Used by `lkrun serve` when no LiveKit URL is configured, and by the test suite.
The server is built once with `go install` into a per-version cache directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from lkrun import paths
from lkrun.shared import pdeathsig
from lkrun.shared.text import last_lines

LIVEKIT_SERVER_VERSION = "v1.13.5"
DEV_API_KEY = "devkey"
DEV_API_SECRET = "secret"

LOOPBACK = "127.0.0.1"
_MODULE = "github.com/livekit/livekit-server/cmd/server"
_GO_FALLBACK = Path("/usr/local/go/bin/go")
_TAIL_LINES = 5
_TAIL_CHARS = 800

# --bind only covers HTTP/WS; without these the UDP mux binds every non-loopback
# interface address (and would advertise 127.0.0.1 while listening elsewhere).
_LOOPBACK_RTC_CONFIG = (
    "rtc:\n  enable_loopback_candidate: true\n  ips:\n    includes: [127.0.0.1/32]\n"
)
# The server reads these from the environment; a user's production settings
# (LIVEKIT_KEYS, REDIS_HOST, ...) must not leak into a dev server.
_SERVER_ENV_NAMES = frozenset({"REDIS_HOST", "REDIS_PASSWORD", "NODE_IP", "UDP_PORT"})


class DevServerError(Exception):
    """The dev server could not be installed or started; the message is one line."""


def server_binary_path(version: str = LIVEKIT_SERVER_VERSION) -> Path:
    return paths.cache_dir() / f"livekit-server-{version}" / "server"


def ensure_server_binary(
    version: str = LIVEKIT_SERVER_VERSION, *, on_build: Callable[[str], None] | None = None
) -> Path:
    """Return a livekit-server binary, building it with `go install` on first use."""
    override = os.environ.get("LKRUN_LIVEKIT_SERVER")
    if override:
        return _checked_override(Path(override).expanduser())
    target = server_binary_path(version)
    if _is_executable(target):
        return target
    with _build_lock(version):
        # Another process may have finished the build while we waited for the lock.
        if _is_executable(target):
            return target
        go = _find_go()
        if on_build is not None:
            on_build(
                f"building livekit-server {version} with go install "
                "(first run only, takes a few minutes)"
            )
        _go_install(go, version, target)
    return target


def free_tcp_port() -> int:
    return _free_port(socket.SOCK_STREAM)


def free_udp_port() -> int:
    return _free_port(socket.SOCK_DGRAM)


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _checked_override(path: Path) -> Path:
    if not _is_executable(path):
        raise DevServerError(f"LKRUN_LIVEKIT_SERVER={path} is not an executable file")
    return path


def _find_go() -> str:
    found = shutil.which("go")
    if found:
        return found
    if _is_executable(_GO_FALLBACK):
        return str(_GO_FALLBACK)
    raise DevServerError(
        "livekit-server is not installed and `go` was not found; "
        "install Go >= 1.22 or set LIVEKIT_URL to an existing server"
    )


@contextlib.contextmanager
def _build_lock(version: str) -> Iterator[None]:
    """Exclusive flock so parallel processes (CI, two terminals) build only once."""
    directory = paths.cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f"livekit-server-{version}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _go_install(go: str, version: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private GOBIN next to the target makes the final rename atomic (same filesystem).
    gobin = Path(tempfile.mkdtemp(prefix=".gobin-", dir=target.parent))
    try:
        # GOPATH/GOCACHE keep go's defaults so a rebuild reuses the module and build caches.
        result = subprocess.run(
            [go, "install", f"{_MODULE}@{version}"],
            env={**os.environ, "GOBIN": str(gobin)},
            cwd=target.parent,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            check=False,
        )
        built = gobin / "server"
        if result.returncode != 0 or not built.is_file():
            raise DevServerError(
                f"building livekit-server {version} with go install failed "
                f"(exit {result.returncode}): {_tail(result.stdout) or 'no output'}"
            )
        os.replace(built, target)
    finally:
        shutil.rmtree(gobin, ignore_errors=True)


def _tail(output: str) -> str:
    """The end of a process's output, for a one-line error message."""
    return last_lines(output, _TAIL_LINES, _TAIL_CHARS)


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def _tcp_port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        if probe.connect_ex((LOOPBACK, port)) == 0:
            return True
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Match Go's listeners, which set SO_REUSEADDR: TIME_WAIT leftovers are not "in use".
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return _bind_fails(sock, port)


def _udp_port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return _bind_fails(sock, port)


def _bind_fails(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind((LOOPBACK, port))
    except OSError:
        return True
    return False


def _server_env() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("LIVEKIT_") and name not in _SERVER_ENV_NAMES
    }


def _death_signal_preexec() -> Callable[[], None] | None:
    """SIGKILL rather than SIGTERM: livekit-server ignores a SIGTERM that arrives just after
    it starts, and on SIGTERM it waits for connected participants to leave."""
    return pdeathsig.preexec(signal.SIGKILL)


def _wait_until(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Wait for proc to exit by deadline; True if it did."""
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    # livekit-server ignores a SIGTERM in the ~100 ms after it starts answering, and
    # waits for participants on the first one; its second signal means "stop now".
    for grace in (min(1.0, timeout / 2), timeout):
        pdeathsig.signal_group(proc.pid, signal.SIGTERM)
        if _wait_until(proc, min(time.monotonic() + grace, deadline)):
            return
    pdeathsig.signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class DevServer:
    """A livekit-server in --dev mode on loopback; a context manager that starts and stops it."""

    binary: Path
    port: int = 7880
    rtc_tcp_port: int = 7881
    udp_port: int = 7882
    redis_host: str | None = None
    log_path: Path | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @classmethod
    def on_free_ports(cls, binary: Path, log_path: Path | None = None) -> DevServer:
        """A server on ports nobody uses now: for tests and benchmarks beside other servers."""
        return cls(
            binary,
            port=free_tcp_port(),
            rtc_tcp_port=free_tcp_port(),
            udp_port=free_udp_port(),
            log_path=log_path,
        )

    @property
    def url(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def api_key(self) -> str:
        return DEV_API_KEY

    @property
    def api_secret(self) -> str:
        return DEV_API_SECRET

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start the server and wait until GET / answers 200; no-op if already running."""
        if self.running():
            return
        self._check_ports_free()
        log_path = self.log_path or paths.cache_dir() / "livekit-server.log"
        offset = self._open_log(log_path)
        self._proc = self._spawn(log_path)
        try:
            self._wait_ready(self._proc, timeout, log_path, offset)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process group (twice), then SIGKILL after timeout; safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _terminate(proc, timeout)
        self._proc = None

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _command(self) -> list[str]:
        command = [
            str(self.binary),
            "--dev",
            "--bind", LOOPBACK,
            "--node-ip", LOOPBACK,
            "--port", str(self.port),
            "--rtc.tcp_port", str(self.rtc_tcp_port),
            "--udp-port", str(self.udp_port),
            "--config-body", _LOOPBACK_RTC_CONFIG,
        ]  # fmt: skip
        if self.redis_host:
            command += ["--redis-host", self.redis_host]
        return command

    def _check_ports_free(self) -> None:
        for port in (self.port, self.rtc_tcp_port):
            if _tcp_port_busy(port):
                raise DevServerError(
                    f"port {port} on {LOOPBACK} is already in use; "
                    "stop the other server or set LIVEKIT_URL"
                )
        if _udp_port_busy(self.udp_port):
            raise DevServerError(
                f"UDP port {self.udp_port} on {LOOPBACK} is already in use; "
                "stop the other server or set LIVEKIT_URL"
            )

    def _open_log(self, log_path: Path) -> int:
        """Append a start marker and return the offset where this run's output begins."""
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(log_path, "ab") as log:
                log.write(f"--- lkrun: starting livekit-server at {self.url}\n".encode())
                return log.tell()
        except OSError as exc:
            raise DevServerError(f"cannot write log {log_path}: {exc.strerror}") from exc

    def _spawn(self, log_path: Path) -> subprocess.Popen[bytes]:
        try:
            with open(log_path, "ab") as log:
                return subprocess.Popen(
                    self._command(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_server_env(),
                    start_new_session=True,  # its own group, so stop() reaches every child
                    preexec_fn=_death_signal_preexec(),
                )
        except OSError as exc:
            raise DevServerError(f"cannot run {self.binary}: {exc.strerror or exc}") from exc

    def _wait_ready(
        self, proc: subprocess.Popen[bytes], timeout: float, log_path: Path, offset: int
    ) -> None:
        reason = self._poll_ready(proc, timeout)
        if reason is not None:
            tail = _tail(_read_from(log_path, offset)) or "no output"
            raise DevServerError(f"livekit-server {reason} (log: {log_path}): {tail}")

    def _poll_ready(self, proc: subprocess.Popen[bytes], timeout: float) -> str | None:
        """None once GET / answers 200, else why the server never became ready."""
        # No proxies: a user's http_proxy must not intercept a loopback health check.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while True:
            # Re-check the process: another server may own the port we failed to bind.
            if _answers_ok(opener, self.http_url) and proc.poll() is None:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"did not answer on {self.http_url} within {timeout:g}s"
            try:
                code = proc.wait(timeout=min(0.1, remaining))
            except subprocess.TimeoutExpired:
                continue
            return f"exited with code {code} before it was ready"


def _answers_ok(opener: urllib.request.OpenerDirector, url: str) -> bool:
    try:
        with opener.open(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):
        return False
