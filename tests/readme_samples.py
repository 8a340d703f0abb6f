"""The README's console samples, from a real run:

    .venv/bin/python -m tests.readme_samples           # print them
    .venv/bin/python -m tests.readme_samples --write   # and replace them in README.md

Starts a dev livekit-server (on 7880 when free, as `make serve` does, else on free ports)
and `lkrun serve agents.toml.example` with its control socket, history and job logs in a
temporary directory, runs the commands the README shows, and prints each as a console
block (`$ command`, then what it printed). With --write, each README block between
`<!-- samples:NAME -->` and `<!-- /samples:NAME -->` is replaced by the section NAME of
this run. Takes a minute or two; everything it starts is stopped on exit.

`check` reads the repository's manifests. The daemon serves a copy of agents.toml.example
in the temporary directory with `[daemon] load_threshold = "off"` added: on a busy machine
(tests running beside it) the CPU would otherwise make agents full and the samples would
show dropped dispatches; and the copy's directory, unlike the repository, has no .py file
that someone edits meanwhile (a change would hot-reload the agents).
"""

from __future__ import annotations

import argparse
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
README = REPO / "README.md"
MANIFEST = "agents.toml.example"
METRICS = re.compile(r"^lkrun_(jobs_started|jobs_ended|offers)_total")
# Sections whose commands the README shows as run from the repository's .venv.
VENV_PREFIX = {"quick-start": ".venv/bin/"}
BLOCK = re.compile(
    r"(<!-- samples:(?P<name>[a-z-]+) -->\n```(?P<lang>\w+)\n)"
    r".*?(```\n<!-- /samples:(?P=name) -->)",
    re.S,
)


class Session:
    """Runs `lkrun` against one daemon and collects what the README quotes, by section."""

    def __init__(self, env: dict[str, str], http_port: int, folder: Path) -> None:
        self.env = env
        self.http_port = http_port
        self.folder = folder
        self.section = ""
        self.sections: dict[str, list[str]] = {}

    def start(self, section: str) -> None:
        self.section = section
        self.sections.setdefault(section, [])

    def run(self, *args: str, comment: str = "", show: bool = True, cwd: Path = REPO) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "lkrun", *args],
            cwd=cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if show:
            self.show(["lkrun", *args], result.stdout + result.stderr, comment)
        return result.stdout

    def show(self, argv: list[str] | str, output: str, comment: str = "") -> None:
        command = argv if isinstance(argv, str) else shlex.join(argv)
        prefix = VENV_PREFIX.get(self.section, "") if command.startswith("lkrun ") else ""
        note = f"      # {comment}" if comment else ""
        # Tables pad their last column; a README keeps no trailing blanks.
        text = "\n".join(line.rstrip() for line in output.rstrip().splitlines())
        self.sections[self.section].append(f"$ {prefix}{command}{note}\n{text}")

    def text(self, line: str) -> None:
        self.sections[self.section].append(line)

    def jobs(self) -> list[dict[str, Any]]:
        out = self.run("jobs", "ls", "--json", show=False)
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
        command = f"curl -s 127.0.0.1:{self.http_port}/metrics | grep -E {pattern}"
        self.show(command, "\n".join(lines))


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
    # pretty: the README quotes one of its lines (Daemon logs)
    serve = ["serve", MANIFEST, "--http-addr", f"127.0.0.1:{port}", "--log-format", "pretty"]
    with (folder / "daemon.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lkrun", *serve],
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


def checks(s: Session) -> None:
    s.start("cli")
    s.run("check", MANIFEST)
    for extra in sorted(REPO.glob("agents-*.toml.example")):  # e.g. the framework's
        s.start(f"check-{extra.name.split('.')[0].removeprefix('agents-')}")
        s.run("check", extra.name)


def validation(s: Session) -> None:
    """A misspelt key: refused before anything connects (Validation)."""
    s.start("validation")
    bad = s.folder / "bad"
    bad.mkdir()
    manifest = '[agents.echo]\nentrypoint = "lkrun.examples.echo:entrypoint"\nmax_job = 8\n'
    (bad / "agents.toml").write_text(manifest)
    result = subprocess.run(
        [sys.executable, "-m", "lkrun", "serve", "agents.toml"],
        cwd=bad,
        env=s.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = f"{result.stdout}{result.stderr}(exit status {result.returncode})"
    s.show(["lkrun", "serve", "agents.toml"], output)


def quick_start(s: Session) -> None:
    s.start("quick-start")
    s.run("dispatch", "--room", "demo", "--agent", "echo")
    wait_for(lambda: s.running("echo", "demo"), 30, "the echo job in demo")
    wait_for(lambda: s.running("greeter", "demo"), 15, "the greeter in demo")
    s.run("jobs", "ls")


def cli_session(s: Session) -> None:
    s.start("cli")
    s.run("status")
    s.run("dispatch", "--room", "demo2", "--agent", "echo", "--wait")
    s.run("dispatch", "--room", "x", "--agent", "nobody", "--wait", "--timeout", "3s")
    s.run("jobs", "ls")
    job = s.running("echo", "demo")[0]["id"]
    s.run("jobs", "show", job, "--lines", "3")
    s.run("jobs", "logs", job, "--tail", "3")
    s.start("memory")
    s.run("jobs", "show", job, "--memory")
    s.start("cli")
    daemon_log_line(s, job)
    s.start("cli")
    s.run("jobs", "kill", job)
    wait_for(lambda: not s.running("echo", "demo"), 30, "the killed job to end")
    s.run("jobs", "ls", "--all")
    s.start("metrics")
    s.metrics()


def daemon_log_line(s: Session, job: str) -> None:
    """The daemon's pretty log line for the job's own 'ready' line (Daemon logs)."""
    s.start("daemon-log")
    lines = (s.folder / "daemon.log").read_text(errors="replace").splitlines()
    found = [line for line in lines if job in line and "echo ready" in line]
    s.text(found[0] if found else "(no line of the job found)")


def retry_at_max_jobs(s: Session) -> None:
    """A dispatch while echo is at max_jobs: dropped by the server, re-created by --wait."""
    s.start("retry")
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
    s.show(["lkrun", *args], out, "while echo was at max_jobs")


def second_daemon(s: Session) -> None:
    """A second `lkrun serve` on the running daemon's state directory is refused."""
    s.start("state-dir")
    args = ["serve", MANIFEST, "--http-addr", ""]
    result = subprocess.run(
        [sys.executable, "-m", "lkrun", *args],
        cwd=s.folder,
        env=s.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = f"{result.stdout}{result.stderr}(exit status {result.returncode})"
    s.show(["lkrun", *args], output)


def server_env(server: devserver.DevServer) -> dict[str, str]:
    return {
        "LIVEKIT_URL": server.url,
        "LIVEKIT_API_KEY": server.api_key,
        "LIVEKIT_API_SECRET": server.api_secret,
    }


def collect(folder: Path) -> dict[str, list[str]]:
    server = start_server(folder)
    try:
        port = http_port()
        env = dict(os.environ, **server_env(server))
        # The default state directory ($XDG_STATE_HOME/lkrun) and a socket of its own. Not
        # folder/lkrun: `python -m lkrun` run in folder would import that directory.
        state = str(folder / "state")
        env.update(XDG_STATE_HOME=state, LKRUN_CONTROL_SOCKET=str(folder / "c.sock"))
        session = Session(env, port, folder)
        checks(session)
        validation(session)
        with daemon(env, folder, port) as proc:
            wait_for(lambda: ready(session, proc), 120, "the daemon to be ready")
            quick_start(session)
            cli_session(session)
            retry_at_max_jobs(session)
            second_daemon(session)
        return session.sections
    except SystemExit:
        log = (folder / "daemon.log").read_text(errors="replace").splitlines()
        lines = ["readme_samples: the daemon's last log lines:", *log[-30:]]
        print("\n".join(lines), file=sys.stderr)
        raise
    finally:
        server.stop()


def write_readme(sections: dict[str, list[str]], path: Path = README) -> list[str]:
    """Replace each marked block of the README; the names of the blocks not replaced."""
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in sections:
            missing.append(name)
            return match.group(0)
        return match.group(1) + "\n\n".join(sections[name]) + "\n" + match.group(4)

    path.write_text(BLOCK.sub(replace, path.read_text()))
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="replace the samples in README.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lkrun-readme-") as tmp:
        sections = collect(Path(tmp))
    for name, blocks in sections.items():
        print(f"<!-- samples:{name} -->\n" + "\n\n".join(blocks) + "\n", flush=True)
    if args.write:
        missing = write_readme(sections)
        print(
            f"readme_samples: README.md updated{'; no run for ' if missing else ''}"
            f"{', '.join(missing)}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
