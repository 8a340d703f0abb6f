"""The README's console samples, from a real run: `.venv/bin/python -m tests.readme_samples`.

Starts a dev livekit-server (on 7880 when free, as `make serve` does, else on free ports)
and `lkrun serve agents.toml.example` with its control socket, history and job logs in a
temporary directory, runs the commands the README shows in the order it shows them, and
prints each as a console block (`$ command`, then what it printed) to paste into the README.
Takes a minute or two; everything it starts is stopped on exit.

`check` reads the repository's agents.toml.example. The daemon serves a copy of it in the
temporary directory with `[daemon] load_threshold = "off"` added: on a busy machine (tests
running beside it) the CPU would otherwise make agents full and the samples would show
dropped dispatches; and the copy's directory, unlike the repository, has no .py file that
someone edits meanwhile (a change would hot-reload the agents).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lkrun import devserver

REPO = Path(__file__).resolve().parent.parent
MANIFEST = "agents.toml.example"
METRICS = re.compile(r"^lkrun_(jobs_started|jobs_ended|offers)_total")


class Session:
    """Runs `lkrun` against one daemon and prints what the README quotes."""

    def __init__(self, env: dict[str, str], http_port: int, log: Path) -> None:
        self.env = env
        self.http_port = http_port
        self.log = log

    def run(self, *args: str, comment: str = "", show: bool = True) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "lkrun", *args],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if show:
            self.show(shlex.join(["lkrun", *args]), result.stdout + result.stderr, comment)
        return result.stdout

    @staticmethod
    def show(command: str, output: str, comment: str = "") -> None:
        note = f"      # {comment}" if comment else ""
        # Tables pad their last column; a README keeps no trailing blanks.
        text = "\n".join(line.rstrip() for line in output.rstrip().splitlines())
        print(f"$ {command}{note}\n{text}\n", flush=True)

    def jobs(self, everything: bool = False) -> list[dict[str, Any]]:
        args = ["jobs", "ls", "--json"] + (["--all"] if everything else [])
        out = self.run(*args, show=False)
        return json.loads(out) if out.strip() else []

    def running(self, agent: str, room: str | None = None) -> list[dict[str, Any]]:
        return [
            job
            for job in self.jobs()
            if job["agent"] == agent
            and job["status"] == "running"
            and (room is None or job["room"] == room)
        ]

    def metrics(self) -> None:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        lines = [line for line in text.splitlines() if METRICS.match(line)]
        pattern = "'^lkrun_(jobs_started|jobs_ended|offers)_total'"
        self.show(
            f"curl -s 127.0.0.1:{self.http_port}/metrics | grep -E {pattern}", "\n".join(lines)
        )


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise SystemExit(f"readme_samples: timed out waiting for {what}")


def start_server(folder: Path) -> devserver.DevServer:
    binary = devserver.ensure_server_binary(on_build=lambda msg: print(msg, file=sys.stderr))
    server = devserver.DevServer(binary, log_path=folder / "livekit-server.log")
    try:
        server.start()
    except devserver.DevServerError:  # 7880 taken: free ports, the URL in status differs
        server = devserver.DevServer.on_free_ports(binary, folder / "livekit-server.log")
        server.start()
    return server


def http_port() -> int:
    """8081 as in the README when nobody uses it, else a free port."""
    with contextlib.suppress(OSError), socket.create_server(("127.0.0.1", 8081)):
        return 8081
    return devserver.free_tcp_port()


def manifest_copy(folder: Path) -> None:
    lines = (REPO / MANIFEST).read_text().splitlines()
    setting = 'load_threshold = "off"'
    if "[daemon]" in (line.strip() for line in lines):  # a [daemon] table: add to it
        at = [line.strip() for line in lines].index("[daemon]") + 1
        lines[at:at] = [setting]
    else:
        lines += ["", "[daemon]", setting]
    (folder / MANIFEST).write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def daemon(env: dict[str, str], folder: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    manifest_copy(folder)
    with (folder / "daemon.log").open("ab") as log:
        # pretty: the README quotes one of its lines (Daemon logs)
        serve = ["serve", MANIFEST, "--http-addr", f"127.0.0.1:{port}", "--log-format", "pretty"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "lkrun", *serve, "--state-dir", str(folder / "state")],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM twice (the second skips the drain), SIGKILL if that did not do."""
    for grace in (1.0, 30.0):
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def ready(session: Session, proc: subprocess.Popen[bytes]) -> bool:
    if proc.poll() is not None:
        raise SystemExit(f"readme_samples: the daemon exited with {proc.returncode}")
    out = session.run("status", "--json", show=False)
    return bool(out.strip()) and json.loads(out).get("ready") is True


def quick_start(s: Session) -> None:
    print("## Quick start\n", flush=True)
    s.run("dispatch", "--room", "demo", "--agent", "echo")
    wait_for(lambda: s.running("echo", "demo"), 30, "the echo job in demo")
    wait_for(lambda: s.running("greeter", "demo"), 15, "the greeter in demo")
    s.run("jobs", "ls")


def cli_session(s: Session) -> None:
    print("## CLI\n", flush=True)
    s.run("status")
    s.run("dispatch", "--room", "demo2", "--agent", "echo", "--wait")
    s.run("dispatch", "--room", "x", "--agent", "nobody", "--wait", "--timeout", "3s")
    s.run("jobs", "ls")
    job = s.running("echo", "demo")[0]["id"]
    s.run("jobs", "show", job, "--lines", "3")
    s.run("jobs", "logs", job, "--tail", "3")
    daemon_log_line(s, job)
    s.run("jobs", "kill", job)
    wait_for(lambda: not s.running("echo", "demo"), 30, "the killed job to end")
    s.run("jobs", "ls", "--all")
    print("## Metrics\n", flush=True)
    s.metrics()


def daemon_log_line(s: Session, job: str) -> None:
    """The daemon's pretty log line for the job's own 'ready' line (Daemon logs)."""
    lines = s.log.read_text(errors="replace").splitlines()
    found = [line for line in lines if job in line and "echo ready" in line]
    print("## Daemon log (--log-format pretty)\n", flush=True)
    print((found[0] if found else "(no line of the job found)") + "\n", flush=True)


def retry_at_max_jobs(s: Session) -> None:
    """A dispatch while echo is at max_jobs: dropped by the server, re-created by --wait."""
    print("## dispatch --wait while echo is at max_jobs\n", flush=True)
    status = json.loads(s.run("status", "--json", show=False))
    echo = next(a for a in status["agents"] if a["agent"] == "echo")
    missing = echo["max_jobs"] - len(s.running("echo"))
    for n in range(missing):  # --wait: a busy machine's CPU can make the server drop one
        s.run("dispatch", "--room", f"fill-{n}", "--agent", "echo", "--wait", show=False)
    wait_for(lambda: len(s.running("echo")) >= echo["max_jobs"], 60, "echo at max_jobs")
    args = ["dispatch", "--room", "demo3", "--agent", "echo", "--wait"]
    waiting = subprocess.Popen(
        [sys.executable, "-m", "lkrun", *args],
        cwd=REPO,
        env=s.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(4)  # the server drops it meanwhile; a slot is free before the 8 s retry
    s.run("jobs", "kill", s.running("echo")[0]["id"], show=False)
    out, _ = waiting.communicate(timeout=60)
    s.show(shlex.join(["lkrun", *args]), out, "while echo was at max_jobs")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="lkrun-readme-") as tmp:
        folder = Path(tmp)
        server = start_server(folder)
        try:
            port = http_port()
            env = dict(
                os.environ, **server_env(server), LKRUN_CONTROL_SOCKET=str(folder / "c.sock")
            )
            session = Session(env, port, folder / "daemon.log")
            print("## Check\n", flush=True)
            session.run("check", MANIFEST)
            for extra in sorted(REPO.glob("agents-*.toml.example")):  # e.g. the framework's
                session.run("check", extra.name)
            with daemon(env, folder, port) as proc:
                wait_for(lambda: ready(session, proc), 120, "the daemon to be ready")
                quick_start(session)
                cli_session(session)
                retry_at_max_jobs(session)
        except SystemExit:
            log = (folder / "daemon.log").read_text(errors="replace").splitlines()
            lines = ["readme_samples: the daemon's last log lines:", *log[-30:]]
            print("\n".join(lines), file=sys.stderr)
            raise
        finally:
            server.stop()
    return 0


def server_env(server: devserver.DevServer) -> dict[str, str]:
    return {
        "LIVEKIT_URL": server.url,
        "LIVEKIT_API_KEY": server.api_key,
        "LIVEKIT_API_SECRET": server.api_secret,
    }


if __name__ == "__main__":
    sys.exit(main())
