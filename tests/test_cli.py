"""The CLI as a user meets it: exit codes and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lkrun import __version__
from lkrun.devserver import free_tcp_port
from tests.conftest import REPO, run_cli, unique

pytestmark = pytest.mark.e2e  # the lkrun command in subprocesses

GOOD = """
[agents.echo]
entrypoint = "lkrun.examples.echo:entrypoint"
"""

BAD_MANIFESTS = {
    "unknown key": (
        '[agents.echo]\nentrypoint = "lkrun.examples.echo:entrypoint"\nmax_job = 3\n',
        ["agent 'echo'", "'max_job'", "did you mean 'max_jobs'"],
    ),
    "wrong type": (
        '[agents.echo]\nentrypoint = "lkrun.examples.echo:entrypoint"\nmax_jobs = "many"\n',
        ["agent 'echo'", "'max_jobs'"],
    ),
    "bad value": (
        '[agents.echo]\nentrypoint = "lkrun.examples.echo:entrypoint"\ndispatch = "sometimes"\n',
        ["agent 'echo'", "'dispatch'", "sometimes"],
    ),
    "unimportable entrypoint": (
        '[agents.echo]\nentrypoint = "lkrun.examples.nope:entrypoint"\n',
        ["agent 'echo'", "'entrypoint'", "lkrun.examples.nope"],
    ),
    "missing function": (
        '[agents.echo]\nentrypoint = "lkrun.examples.echo:nothing_here"\n',
        ["agent 'echo'", "'entrypoint'", "nothing_here"],
    ),
    "two automatic agents in one pool": (
        '[agents.a]\nentrypoint = "lkrun.examples.echo:entrypoint"\ndispatch = "automatic"\n'
        '[agents.b]\nentrypoint = "lkrun.examples.echo:entrypoint"\ndispatch = "automatic"\n',
        ["agent 'b'", "'dispatch'", "'a'"],
    ),
    "invalid toml": ("[agents.echo\n", ["invalid TOML"]),
}


def unreachable_env(tmp: Path) -> dict[str, str]:
    """Credentials pointing at a port nobody listens on: nothing may connect anyway."""
    import os

    port = free_tcp_port()
    return dict(
        os.environ,
        LIVEKIT_URL=f"ws://127.0.0.1:{port}",
        LIVEKIT_API_KEY="k",
        LIVEKIT_API_SECRET="s",
        PYTHONPATH=str(REPO),
        LKRUN_CONTROL_SOCKET=f"/tmp/{unique('lkrun-test')}.sock",
        XDG_STATE_HOME=str(tmp / "state"),  # never the user's own history
    )


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
@pytest.mark.parametrize("command", ["serve", "check"])
def test_bad_manifest_exits_2_with_one_line(tmp_path: Path, case: str, command: str) -> None:
    text, expected = BAD_MANIFESTS[case]
    manifest = tmp_path / "agents.toml"
    manifest.write_text(text)
    result = run_cli(command, str(manifest), env=unreachable_env(tmp_path), timeout=60)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    [line] = lines
    assert line.startswith(f"error: {manifest}: ")
    assert "Traceback" not in result.stderr
    for part in expected:
        assert part in line, line
    if case not in ("invalid toml", "two automatic agents in one pool"):
        assert "field " in line


def test_check_accepts_the_example_manifest(tmp_path: Path) -> None:
    result = run_cli("check", str(REPO / "agents.toml.example"), env=unreachable_env(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (
        "7 agent(s) OK: echo, greeter, level-meter, frame-sampler, relay, webhook, recorder"
        in result.stdout
    )


def test_check_json_reports_each_agent(tmp_path: Path) -> None:
    manifest = tmp_path / "agents.toml"
    manifest.write_text(
        GOOD + '[agents.greeter]\nentrypoint = "lkrun.examples.greeter:entrypoint"\n'
    )
    result = run_cli("check", "--json", str(manifest), env=unreachable_env(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["errors"] == []
    assert [(a["name"], a["ok"], a["error"]) for a in report["agents"]] == [
        ("echo", True, None),
        ("greeter", True, None),
    ]
    echo = report["agents"][0]
    assert echo["entrypoint"] == "lkrun.examples.echo:entrypoint"
    assert (echo["framework"], echo["kind"], echo["app"]) == ("lkrun", "function", "lkrun function")


def test_check_json_reports_a_refused_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "agents.toml"
    manifest.write_text(GOOD + '[agents.bad]\nentrypoint = "lkrun.examples.echo:nothing_here"\n')
    result = run_cli("check", "--json", str(manifest), env=unreachable_env(tmp_path))
    assert result.returncode == 2, result
    report = json.loads(result.stdout)  # JSON on stdout even when refused
    assert report["ok"] is False
    [error] = report["errors"]
    assert (error["agent"], error["field"]) == ("bad", "entrypoint")
    assert "nothing_here" in error["message"]
    bad = next(a for a in report["agents"] if a["name"] == "bad")
    assert bad["ok"] is False and "nothing_here" in bad["error"]
    manifest.write_text("[agents.echo\n")  # not even TOML: no agent to report
    result = run_cli("check", "--json", str(manifest), env=unreachable_env(tmp_path))
    assert result.returncode == 2
    report = json.loads(result.stdout)
    assert report["agents"] == [] and report["errors"][0]["agent"] is None


def test_jobs_ls_without_a_daemon_says_so(tmp_path: Path) -> None:
    env = unreachable_env(tmp_path)
    result = run_cli("jobs", "ls", "--control-socket", str(tmp_path / "none.sock"), env=env)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot reach the lkrun daemon at ")


def test_dispatch_to_unreachable_server_says_so(tmp_path: Path) -> None:
    env = unreachable_env(tmp_path)
    result = run_cli("dispatch", "--room", "r", "--agent", "a", env=env)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach LiveKit at {env['LIVEKIT_URL']}")


def test_dispatch_with_wrong_secret_is_refused(tmp_path: Path, livekit_server: Any) -> None:
    env = dict(unreachable_env(tmp_path), **livekit_server.env)
    env["LIVEKIT_API_SECRET"] = "not-the-secret"
    result = run_cli("dispatch", "--room", "r", "--agent", "a", env=env)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: LiveKit at") and "refused" in line


def test_serve_with_wrong_secret_fails_in_one_line(tmp_path: Path, livekit_server: Any) -> None:
    manifest = tmp_path / "agents.toml"
    manifest.write_text(GOOD)
    env = dict(unreachable_env(tmp_path), **livekit_server.env)
    env["LIVEKIT_API_SECRET"] = "not-the-secret"
    result = run_cli("serve", str(manifest), env=env, timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rejected API key 'devkey'" in errors[0], result.stderr
    assert "not-the-secret" not in result.stderr


def test_dispatch_json_output(tmp_path: Path, livekit_server: Any) -> None:
    env = dict(unreachable_env(tmp_path), **livekit_server.env)
    result = run_cli("dispatch", "--room", unique("r"), "--agent", "nobody", "--json", env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"dispatch_id", "agent", "room", "metadata"}


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"lkrun {__version__}"


async def test_json_logs_carry_agent_and_job_id(start_daemon: Any, livekit_server: Any) -> None:
    from tests.helpers import agent_table, dispatch, job_in_room

    name, room = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name), "--log-format", "json")
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")

    def entries() -> list[dict[str, Any]]:
        return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]

    from tests.conftest import wait_for

    await wait_for(
        lambda: any(e.get("job_id") == job["id"] and "echo ready" in e["msg"] for e in entries()),
        15,
        what="the job's own log line in JSON",
    )
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), lines[:3]
    registered = next(e for e in entries() if e["msg"].startswith("registered as worker"))
    assert registered["agent"] == name and registered["level"] == "info"
    job_lines = [e for e in entries() if e.get("job_id") == job["id"]]
    assert all(e["agent"] == name for e in job_lines)


async def test_dispatch_wait_reports_the_running_job(
    start_daemon: Any, livekit_server: Any
) -> None:
    from tests.helpers import agent_table

    name, room = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name), "--name", "host-a")
    result = daemon.cli("dispatch", "--room", room, "--agent", name, "--wait", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["job_id"].startswith("AJ_") and data["seen_in"] == "this host"
    assert data["daemon"] == "host-a"  # which daemon took it, when several serve the agent
    assert (await daemon.job(data["job_id"]))["daemon"] == "host-a"
    assert (await daemon.status())["name"] == "host-a"
    assert data["participant_identity"] == f"{name}-{data['job_id']}"
    # The first dispatch to a new name: the server's dispatch record shows the job only when
    # its 5 s agent check ends; the daemon's own record has it at once.
    assert 0 < data["seconds"] < 4.5, data
    assert (await daemon.job(data["job_id"])) is not None
    text = daemon.cli("dispatch", "--room", unique("room"), "--agent", name, "--wait")
    assert text.returncode == 0 and " running after " in text.stdout

    # From a host without the daemon: the agent participant in the room tells.
    elsewhere = daemon.cli(
        "dispatch", "--room", unique("room"), "--agent", name, "--wait", "--json",
        "--control-socket", str(daemon.dir / "no-daemon-here.sock"),
    )  # fmt: skip
    assert elsewhere.returncode == 0, elsewhere.stderr
    seen = json.loads(elsewhere.stdout)
    assert seen["seen_in"] == "the room" and seen["participant_identity"].startswith(name)
    assert seen["daemon"] == "host-a"  # the agent participant's lkrun.daemon attribute


async def test_dispatch_wait_explains_a_timeout(start_daemon: Any, livekit_server: Any) -> None:
    from tests.helpers import agent_table

    name = unique("served")
    daemon = await start_daemon(agent_table(name, rooms=["support-*"]))
    nobody = daemon.cli(
        "dispatch", "--room", unique("r"), "--agent", unique("nobody"), "--wait", "--timeout", "2s"
    )
    assert nobody.returncode == 1
    lines = nobody.stderr.strip().splitlines()
    assert lines[0].startswith("error: no job of dispatch AD_") and "after 2s" in lines[0]
    assert "no worker is registered under the name" in lines[1]
    assert "lkrun status" in lines[1]
    declined = daemon.cli(
        "dispatch", "--room", "sales-1", "--agent", name, "--wait", "--timeout", "2s"
    )
    assert declined.returncode == 1
    assert "matches none of" in declined.stderr and "support-*" in declined.stderr
