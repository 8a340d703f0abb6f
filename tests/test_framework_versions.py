"""Two livekit-agents versions under one daemon, each agent in a virtualenv of its own.

Every version in compat.TESTED gets a cached venv (tests/envs.py) with that livekit-agents
from the package index and serves tests/lka_apps/versions.py, a real text-only AgentSession
app that answers with the ``livekit.agents.__version__`` it imported. One daemon serves
them all at once, against the real livekit-server. The versions differ in what the shim
must do for them (compat: ``_on_cleanup`` sync before 1.8.2, no ``ipc._preload`` before
1.8.2...), so each one's job must start, answer, shut down and clean up.

Also: a livekit-agents that lacks the names lkrun needs fails ``lkrun check`` in one line
naming the agent, its interpreter, the version and the names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy
from livekit import rtc

from lkrun.child.framework import compat
from tests.conftest import observer, run_cli, unique, wait_for, wait_for_participant
from tests.envs import FRAMEWORKS, OLD, OLD_LIVEKIT, OLD_NUMPY, EnvFactory, PythonEnv
from tests.helpers import agent_table, dispatch, job_in_room, status_is
from tests.test_framework_apps import CPU_OFF, Transcripts, events
from tests.test_python_envs import attributes_of

APP = Path(__file__).parent / "lka_apps" / "versions.py"
REPORTER = Path(__file__).parent / "agents" / "env_report.py"  # says what its env holds


def agents_env(python_env: EnvFactory, version: str) -> PythonEnv:
    return python_env(FRAMEWORKS[version])


def same_dir(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def exists(path: str) -> bool:
    return Path(path).exists()


def check_json(manifest: Path) -> tuple[int, dict[str, Any]]:
    result = run_cli("check", "--json", str(manifest), cwd=manifest.parent, timeout=180)
    return result.returncode, json.loads(result.stdout)


async def test_two_framework_versions_serve_at_once(
    python_env: EnvFactory, start_daemon: Any, livekit_server: Any, tmp_path: Path
) -> None:
    """The issue's demonstration: one daemon serves, at the same time, an agent whose env
    holds packages that conflict with the daemon's (livekit 1.0 and numpy 1.26) and one
    real AgentSession app on each tested livekit-agents version, each reporting what it
    imported."""
    versions = compat.TESTED
    assert len({compat.series(v) for v in versions}) >= 2  # two series, not two patches
    envs = {v: agents_env(python_env, v) for v in versions}
    names = {v: unique("lka-" + v.replace(".", "-")) for v in versions}
    logs = {v: tmp_path / f"events-{v}.jsonl" for v in versions}
    old, old_name = python_env(OLD), unique("old")
    manifest = (
        CPU_OFF
        + "".join(
            agent_table(
                names[v],
                f"{APP}:server",
                python=str(envs[v].python),
                env={"LKA_EVENTS": str(logs[v]), "LKA_AGENT_NAME": names[v]},
            )
            for v in versions
        )
        + agent_table(old_name, f"{REPORTER}:entrypoint", python=str(old.python))
    )

    # `lkrun check`: each agent's interpreter and the livekit-agents it found, no warning.
    path = tmp_path / "agents.toml"
    path.write_text(manifest)
    code, report = check_json(path)
    assert code == 0, report
    checked = {a["name"]: a for a in report["agents"]}
    for v in versions:
        agent = checked[names[v]]
        assert (agent["framework"], agent["version"]) == ("livekit-agents", v)
        assert agent["python"] == str(envs[v].python)
        assert agent["warnings"] == []

    daemon = await start_daemon(manifest)
    status = {a["agent"]: a for a in (await daemon.status())["agents"]}
    for v in versions:
        assert status[names[v]]["framework_version"] == v
        assert status[names[v]]["python"] == str(envs[v].python)

    rooms = {v: unique("versions") for v in versions}
    old_room = unique("conflicting")
    async with contextlib.AsyncExitStack() as stack:
        observers = {
            v: await stack.enter_async_context(observer(livekit_server, rooms[v])) for v in versions
        }
        old_observer = await stack.enter_async_context(observer(livekit_server, old_room))
        transcripts = {v: Transcripts(observers[v]) for v in versions}
        await asyncio.gather(
            *(dispatch(livekit_server, rooms[v], names[v]) for v in versions),
            dispatch(livekit_server, old_room, old_name),
        )
        agents: dict[str, rtc.RemoteParticipant] = {}
        for v in versions:
            agents[v] = await wait_for_participant(observers[v], "agent-")
            await wait_for(
                lambda v=v: agents[v].attributes.get("lka.version") is not None,
                60,
                what=f"the {v} agent's session to start",
            )
        reported = await attributes_of(old_observer, f"{old_name}-")
        # All the jobs run at the same time, each on its own env: the framework apps on
        # their livekit-agents, the other on packages pip could not install beside the
        # daemon's.
        jobs = {v: await job_in_room(daemon, rooms[v], "running") for v in versions}
        old_job = await job_in_room(daemon, old_room, "running")
        running = {j["id"] for j in await daemon.jobs(include_ended=False)}
        assert {j["id"] for j in jobs.values()} | {old_job["id"]} <= running
        assert reported["python"] == str(old.python)
        assert (reported["livekit"], reported["numpy"]) == (OLD_LIVEKIT, OLD_NUMPY)
        assert rtc.__version__ != OLD_LIVEKIT and numpy.__version__ != OLD_NUMPY
        for v in versions:
            assert agents[v].attributes["lka.version"] == v
            prefix = agents[v].attributes["lka.prefix"]
            assert same_dir(prefix, envs[v].dir)
            assert agents[v].attributes.get("lk.agent.state")  # the AgentSession's own
            await observers[v].local_participant.send_text(f"hello {v}", topic="lk.chat")
        for v in versions:
            await wait_for(
                lambda v=v: transcripts[v].has(f"{v}: hello {v}"), 30, what=f"{v}'s reply"
            )

        for v in versions:
            killed = daemon.cli("jobs", "kill", jobs[v]["id"])
            assert killed.returncode == 0, killed.stderr
        for v in versions:
            await wait_for(
                lambda v=v: status_is(daemon, jobs[v]["id"], "success"), 30, what=f"{v} ended"
            )

    for v in versions:
        found = events(logs[v])
        [entry] = [e for e in found if e["event"] == "entrypoint"]
        assert entry["version"] == v and entry["job_id"] == jobs[v]["id"]
        assert entry["prewarm_pid"] is not None  # the setup function ran in its process
        [shutdown] = [e for e in found if e["event"] == "shutdown"]
        assert shutdown["reason"] == "stopped by `lkrun jobs kill`"
        # The framework's own cleanup ran (a plain function in 1.7, a coroutine in 1.8.9).
        assert not exists(entry["session_directory"])


def test_a_version_without_the_names_lkrun_needs_fails_check_in_one_line(
    python_env: EnvFactory, tmp_path: Path
) -> None:
    # A real env, whose livekit.agents is shadowed by one that kept only its version: what
    # a future release that renamed every private name would look like to the shim.
    env = agents_env(python_env, compat.TESTED[0])
    fake = tmp_path / "livekit" / "agents"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('"""livekit-agents without what lkrun needs."""\n')
    (fake / "version.py").write_text('__version__ = "9.0.0"\n')
    (tmp_path / "app.py").write_text("async def entrypoint(ctx):\n    pass\n")
    path = tmp_path / "agents.toml"
    path.write_text(
        agent_table(
            "future", "app.py:entrypoint", framework="livekit-agents", python=str(env.python)
        )
    )
    code, report = check_json(path)
    assert code == 2
    [error] = report["errors"]
    assert (error["agent"], error["field"]) == ("future", "entrypoint")
    message = error["message"]
    assert message.startswith(f"livekit-agents 9.0.0 (under {env.python}) lacks ")
    assert "livekit.agents.AgentServer" in message and "more" in message
    result = run_cli("check", str(path), cwd=tmp_path, timeout=180)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line == f"error: {error['text']}" and "agent 'future'" in line


# livekit.agents of the env, with this directory's version.py in place of its own: the real
# package's __init__ runs with both directories on its __path__, this one first.
SHADOWED_INIT = """
import os
import sys

_here = os.path.dirname(os.path.abspath(__file__))
_real = next(
    found
    for found in (os.path.join(entry, "livekit", "agents") for entry in sys.path)
    if os.path.isfile(os.path.join(found, "__init__.py")) and os.path.abspath(found) != _here
)
__path__.append(_real)
with open(os.path.join(_real, "__init__.py")) as _file:
    exec(compile(_file.read(), os.path.join(_real, "__init__.py"), "exec"))
"""


def test_an_untested_version_is_a_warning_in_check_json(
    python_env: EnvFactory, tmp_path: Path
) -> None:
    # A real livekit-agents that says it is 1.6.10: a series lkrun was not tested with, whose
    # every name lkrun needs is there (1.6 has them all).
    env = agents_env(python_env, compat.TESTED[-1])
    shadow = tmp_path / "shadow" / "livekit" / "agents"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(SHADOWED_INIT)
    (shadow / "version.py").write_text('__version__ = "1.6.10"\n')
    (tmp_path / "app.py").write_text(
        "from livekit.agents import AgentServer, JobContext\n\n"
        "server = AgentServer()\n\n\n"
        "@server.rtc_session()\nasync def entrypoint(ctx: JobContext) -> None:\n    pass\n"
    )
    path = tmp_path / "agents.toml"
    path.write_text(
        agent_table(
            "older",
            "app.py:server",
            python=str(env.python),
            env={"PYTHONPATH": str(shadow.parent.parent)},
        )
    )
    code, report = check_json(path)
    assert code == 0, report
    [agent] = report["agents"]
    assert (agent["ok"], agent["framework"], agent["version"]) == (True, "livekit-agents", "1.6.10")
    [warning] = agent["warnings"]
    assert warning.startswith("livekit-agents 1.6.10 is not a version lkrun was tested with (")
    assert ", ".join(f"{s}.x" for s in compat.tested_series()) in warning
