"""A local LiveKit cluster on loopback: Redis, livekit-server nodes sharing it, and one lkrun
daemon per node, each with its own name, state directory, control socket and HTTP port.

`make cluster` runs it on the example manifest (`python -m lkrun.devcluster MANIFEST`); the
cluster tests build on the same pieces. It shows LiveKit's own multi-node engine spreading
jobs over several daemons, as it would over several hosts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lkrun import devserver
from lkrun.shared import pdeathsig

REDIS_HINT = (
    "redis-server was not found on PATH; install it (Debian/Ubuntu: "
    "`apt-get install redis-server`, macOS: `brew install redis`) or set LKRUN_REDIS_SERVER"
)


def find_redis_server() -> str:
    """The redis-server binary: $LKRUN_REDIS_SERVER, else the one on PATH."""
    override = os.environ.get("LKRUN_REDIS_SERVER")
    if override:
        if not (Path(override).is_file() and os.access(override, os.X_OK)):
            raise devserver.DevServerError(f"LKRUN_REDIS_SERVER={override} is not an executable")
        return override
    found = shutil.which("redis-server")
    if found is None:
        raise devserver.DevServerError(REDIS_HINT)
    return found


@dataclass
class Redis:
    """A throwaway redis-server on loopback: no persistence, its own directory."""

    directory: Path
    port: int = field(default_factory=devserver.free_tcp_port)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def address(self) -> str:
        return f"{devserver.LOOPBACK}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            find_redis_server(),
            "--bind", devserver.LOOPBACK,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=pdeathsig.preexec(),
        )
        deadline = time.monotonic() + timeout
        while not _answers_ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise devserver.DevServerError(
                    f"redis-server did not start on {self.address} (log: "
                    f"{self.directory / 'redis.log'})"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            pdeathsig.signal_group(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                pdeathsig.signal_group(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None


def _answers_ping(port: int) -> bool:
    import socket

    try:
        with socket.create_connection((devserver.LOOPBACK, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def node(binary: Path, redis: Redis, log_path: Path) -> devserver.DevServer:
    """A livekit-server node of the cluster: dev keys, its own ports, the shared Redis."""
    server = devserver.DevServer.on_free_ports(binary, log_path)
    server.redis_host = redis.address
    return server


@dataclass
class Daemon:
    """One `lkrun serve` of the cluster, registered with one node."""

    name: str
    manifest: Path
    server: devserver.DevServer
    directory: Path
    http_port: int = field(default_factory=devserver.free_tcp_port)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def socket(self) -> Path:
        return self.directory / "control.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "daemon.log"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "lkrun", "serve", str(self.manifest),
            "--url", self.server.url,
            "--name", self.name,
            "--state-dir", str(self.directory / "state"),
            "--control-socket", str(self.socket),
            "--http-addr", f"{devserver.LOOPBACK}:{self.http_port}",
            "--log-format", "json",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LIVEKIT_API_KEY"] = self.server.api_key
        env["LIVEKIT_API_SECRET"] = self.server.api_secret
        env.pop("LIVEKIT_URL", None)
        return env

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)  # the control socket's directory must be private
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                preexec_fn=pdeathsig.preexec(),
            )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (a drain, then the jobs stop), then SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode


@dataclass
class Cluster:
    redis: Redis
    nodes: list[devserver.DevServer]
    daemons: list[Daemon]

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        for server in self.nodes:
            server.stop()
        self.redis.stop()


@contextlib.contextmanager
def running_cluster(manifest: Path, directory: Path, nodes: int = 2) -> Iterator[Cluster]:
    """Redis, ``nodes`` livekit-server nodes and a daemon per node, stopped on exit."""
    binary = devserver.ensure_server_binary(on_build=lambda m: print(m, file=sys.stderr))
    redis = Redis(directory / "redis")
    cluster = Cluster(redis, [], [])
    try:
        redis.start()
        for index in range(nodes):
            server = node(binary, redis, directory / f"node{index + 1}.log")
            cluster.nodes.append(server)
            server.start()
        for index, server in enumerate(cluster.nodes):
            name = f"daemon{index + 1}"
            daemon = Daemon(name, manifest.resolve(), server, directory / name)
            cluster.daemons.append(daemon)
            daemon.start()
        yield cluster
    finally:
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lkrun.devcluster", description=__doc__)
    parser.add_argument("manifest", type=Path, help="the agents manifest every daemon runs")
    parser.add_argument("--nodes", type=int, default=2, help="livekit-server nodes (and daemons)")
    parser.add_argument("--dir", type=Path, default=None, help="where logs and state go")
    args = parser.parse_args(argv)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="lkrun-cluster-"))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with running_cluster(args.manifest, directory, args.nodes) as cluster:
            _describe(cluster, directory)
            while not stop.wait(1.0):
                if dead := [d.name for d in cluster.daemons if not d.running()]:
                    print(f"error: {', '.join(dead)} exited (see its daemon.log)", file=sys.stderr)
                    return 1
            print("stopping the cluster (daemons drain their jobs first) ...", file=sys.stderr)
    except devserver.DevServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _describe(cluster: Cluster, directory: Path) -> None:
    key = f"--api-key {devserver.DEV_API_KEY}"
    lines = [f"Redis at {cluster.redis.address}; logs and state under {directory}"]
    for daemon in cluster.daemons:
        lines.append(
            f"  {daemon.name}: registered with {daemon.server.url}; look at it with "
            f"`lkrun status --control-socket {daemon.socket}`, "
            f"`lkrun jobs ls --control-socket {daemon.socket}`, "
            f"http://127.0.0.1:{daemon.http_port}/metrics"
        )
    first = cluster.nodes[0]
    lines += [
        "Dispatch through any node (LiveKit picks a daemon), e.g.:",
        f"  LIVEKIT_API_SECRET={devserver.DEV_API_SECRET} lkrun dispatch --url {first.http_url} "
        f"{key} --room demo --agent echo --wait",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
