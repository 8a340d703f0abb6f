"""`lkrun protocol-test`, the job protocol's conformance kit, run as a user runs it against the
real livekit-server: lkrun's own runner, the Node echo example and a plain-Python
implementation pass every check; programs that break one rule each
(tests/agents/protocol_breakers/) fail the check for it, with a line that says why."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from lkrun import conformance
from lkrun.credentials import Credentials
from lkrun.devserver import free_tcp_port
from lkrun.manifest import JOB_THREADS, MALLOC_ARENA_MAX
from lkrun.shared import jobpipe
from lkrun.supervision.agent_processes import ARENA_ENV, THREAD_ENV
from tests.conftest import REPO, Server, run_cli
from tests.node_deps import NODE_ECHO, ensure_node_modules, node_missing

BREAKERS = REPO / "tests" / "agents" / "protocol_breakers"
RUNNER = [sys.executable, "-m", "lkrun.child.runner", "--entrypoint"]
NODE_ECHO_COMMAND = ["node", str(NODE_ECHO / "echo.mjs")]
needs_node = pytest.mark.skipif(bool(node_missing()), reason=node_missing() or "node is here")


def kit(server: Server, *command: str, options: tuple[str, ...] = ()) -> tuple[int, str, str]:
    env = {**os.environ, **server.env, "PYTHONPATH": str(REPO)}
    done = run_cli("protocol-test", *options, "--", *command, env=env, timeout=240, cwd=REPO)
    return done.returncode, done.stdout, done.stderr


def kit_json(server: Server, *command: str, options: tuple[str, ...] = ()) -> dict[str, Any]:
    code, out, err = kit(server, *command, options=("--json", *options))
    report: dict[str, Any] = json.loads(out)
    assert code == (0 if report["ok"] else 1), (code, err)
    return report


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {check["name"]: check["status"] for check in report["checks"]}


@pytest.mark.parametrize(
    "command",
    [
        pytest.param([*RUNNER, "lkrun.examples.echo:entrypoint"], id="lkrun-runner"),
        pytest.param([sys.executable, str(BREAKERS / "speaker.py")], id="plain-python"),
        pytest.param(NODE_ECHO_COMMAND, id="node-echo", marks=needs_node),
    ],
)
def test_a_program_that_speaks_the_protocol_passes_every_check(
    livekit_server: Server, command: list[str]
) -> None:
    if command == NODE_ECHO_COMMAND:
        ensure_node_modules(NODE_ECHO)  # npm ci once, cached under ~/.cache/lkrun/node
    report = kit_json(livekit_server, *command)
    assert report["protocol"] == 1 and report["command"] == command
    assert [c["name"] for c in report["checks"]] == list(conformance.CHECKS)
    failed = [c for c in report["checks"] if c["status"] != "passed"]
    assert not failed and report["ok"], failed
    assert report["summary"] == {"passed": len(conformance.CHECKS), "failed": 0, "skipped": 0}


# Each breaker, the check that must fail, and the start of the reason it gives.
BROKEN = {
    "never_ready": ("ready", "no ready within 3s; the daemon kills it then"),
    "other_version": (
        "ready",
        "the daemon records: job process speaks job protocol 2; this lkrun speaks 1",
    ),
    "garbage": ("stdout", "a bad message was ignored: not JSON: b'hello from an agent that"),
    "no_done": (
        "shutdown",
        "after a shutdown: exited without done; the daemon records: job process exited "
        "without reporting a result",
    ),
    "ignores_shutdown": ("shutdown", "did not exit within 2s of a shutdown"),
}


@pytest.mark.parametrize("breaker", sorted(BROKEN))
def test_a_program_that_breaks_the_protocol_fails_with_a_clear_line(
    livekit_server: Server, breaker: str
) -> None:
    check, reason = BROKEN[breaker]
    options = ("--ready-timeout", "3s", "--shutdown-timeout", "2s")
    script = str(BREAKERS / f"{breaker}.py")
    code, out, err = kit(livekit_server, sys.executable, script, options=options)
    assert code == 1, (out, err)
    lines = out.splitlines()
    assert lines[0].startswith("job protocol 1: "), lines
    failed = [line for line in lines if line.startswith("failed ")]
    assert any(line.startswith(f"failed  {check}: {reason}") for line in failed), lines
    if breaker == "garbage":  # the kit pins a fault down: its only one fails that one check
        assert len(failed) == 1, failed
    assert lines[-1].endswith("skipped") and " 0 failed" not in lines[-1]


# Breakers of the rules the kit tries by fault, each with exactly the checks it must fail
# (every other one passes), the check that names it and the start of what that one says.
FAULTS = {
    "ignores_sigterm": ({"sigterm"}, "sigterm", "still running 2s after SIGTERM to its group"),
    "ignores_eof": (
        {"eof-before-start", "eof"},
        "eof",
        "still running 5s after its stdin closed while running",
    ),
    "exits_on_bad_line": (
        {"garbage", "oversized"},
        "garbage",
        "no job to test: exited without running: exited without done; the daemon records: "
        "job process exited with code 1",
    ),
    # Given a minute to join: the leave is still judged on its own short limit, not on that.
    "never_leaves": (
        {"leaves", "shutdown-before-running"},
        "leaves",
        "still in the room 3s after it exited: it did not leave",
    ),
    "fails_on_drain": (
        {"drain"},
        "drain",
        "after drain: the daemon records: drained: the job failed",
    ),
}


@pytest.mark.parametrize("breaker", sorted(FAULTS))
def test_a_program_that_mishandles_a_fault_fails_that_check(
    livekit_server: Server, breaker: str
) -> None:
    failing, check, reason = FAULTS[breaker]
    options = ("--shutdown-timeout", "2s", "--join-timeout", "60s")
    script = str(BREAKERS / f"{breaker}.py")
    report = kit_json(livekit_server, sys.executable, script, options=options)
    found = statuses(report)
    assert not report["ok"] and set(found) == set(conformance.CHECKS)
    assert {name for name, status in found.items() if status != "passed"} == failing, found
    detail = next(c["detail"] for c in report["checks"] if c["name"] == check)
    assert detail.startswith(reason), detail


def test_without_a_ready_nothing_else_is_tried(livekit_server: Server) -> None:
    options = ("--ready-timeout", "2s")
    script = str(BREAKERS / "never_ready.py")
    report = kit_json(livekit_server, sys.executable, script, options=options)
    found = statuses(report)
    assert found["ready"] == "failed" and not report["ok"]
    assert {found[name] for name in conformance.LATER_CHECKS} == {"skipped"}


@pytest.mark.e2e
def test_no_livekit_server_is_exit_status_2(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_tcp_port()}"  # nothing listens there
    env = {**os.environ, "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s"}
    done = run_cli("protocol-test", "--url", url, "--", "true", env=env, cwd=tmp_path)
    assert done.returncode == 2, done
    assert done.stderr.startswith(f"error: cannot create a room at {url}: "), done.stderr


@pytest.mark.parametrize(
    ("ready", "problem"),
    [
        ({"type": "ready", "protocol": 1, "pid": 3, "ts": 1.5, "warm": True}, ""),
        ({"type": "ready", "protocol": 1}, ""),
        ({"type": "ready"}, 'ready has no "protocol": 1'),
        ({"type": "ready", "protocol": 1, "pid": "3"}, "ready's pid is '3', not a whole number"),
        ({"type": "ready", "protocol": 1, "pid": True}, "ready's pid is True"),
        ({"type": "ready", "protocol": 1, "ts": "now"}, "ready's ts is 'now', not a number"),
        ({"type": "ready", "protocol": 1, "warm": 1}, "ready's warm is 1, not true or false"),
    ],
)
def test_what_the_kit_requires_of_a_ready(ready: dict[str, Any], problem: str) -> None:
    found = conformance.ready_problem(ready)
    assert found.startswith(problem) and bool(found) == bool(problem), found


def test_the_program_gets_the_environment_the_daemon_gives_an_agent(tmp_path: Path) -> None:
    creds = Credentials("ws://lk:7880", "key", "secret")
    base = {"HOME": "/h", "LIVEKIT_API_KEY": "key", "LIVEKIT_API_SECRET": "secret"}
    settings = conformance.Settings(command=["x"], credentials=creds, cwd=tmp_path, env=base)
    env = conformance.job_env(settings)
    assert env == {
        "HOME": "/h",
        "LIVEKIT_URL": "ws://lk:7880",
        "PYTHONPATH": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
        "LKRUN_DAEMON_PYTHON": sys.executable,
        # job_threads and malloc_arena_max at their defaults (tests/test_job_resources.py)
        **dict.fromkeys(THREAD_ENV, str(JOB_THREADS)),
        ARENA_ENV: str(MALLOC_ARENA_MAX),
    }
    passing = dataclasses.replace(settings, pass_credentials=True)
    env = conformance.job_env(passing)
    assert (env["LIVEKIT_API_KEY"], env["LIVEKIT_API_SECRET"]) == ("key", "secret")


def test_the_largest_start_is_exactly_as_long_as_a_line_may_be() -> None:
    payload = {"job": {"id": "AJ_1"}, "url": "ws://x", "token": "t", "identity": "i"}
    line = jobpipe.encode("start", protocol=1, **conformance.padded(payload))
    assert len(line) == jobpipe.MAX_LINE and line.endswith(b"}\n")
    assert json.loads(line)["job"] == {"id": "AJ_1"}


def test_its_usage_line_shows_the_command_after_dashes() -> None:
    from typer.testing import CliRunner

    import lkrun.cli  # noqa: F401  registers the commands
    from lkrun.cli.common import app

    shown = CliRunner().invoke(app, ["protocol-test", "--help"], prog_name="lkrun")
    assert shown.exit_code == 0
    assert shown.output.splitlines()[0] == "Usage: lkrun protocol-test [OPTIONS] -- CMD [ARGS]..."
