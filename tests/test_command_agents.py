"""Command agents (manifest ``command``): a program in another language that speaks the job
pipe protocol is hosted like a Python agent. End to end with the Node echo example
(examples/node/echo, @livekit/rtc-node) against the real livekit-server; the manifest
rules and the warm pool's rule for programs without a livekit-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from watchfiles import Change

from lkrun import daemon as daemon_module
from lkrun.entrypoints import check_entrypoints
from lkrun.manifest import ManifestError, parse_manifest
from lkrun.supervision.warm_pool import WarmPool
from tests.conftest import livekit_api, observer, pid_alive, unique, wait_for, wait_for_participant
from tests.helpers import dispatch, echo_roundtrip, job_in_room, status_is
from tests.node_deps import NODE_ECHO, ensure_node_modules, node_missing
from tests.test_daemon_loops import make_daemon
from tests.test_supervisor import FakeProcess, settle

CPU_OFF = '[daemon]\nload_threshold = "off"\n\n'  # a busy shared machine must not refuse jobs
needs_node = pytest.mark.skipif(bool(node_missing()), reason=node_missing() or "node is here")


@pytest.fixture(scope="session")
def node_echo() -> Path:
    """The Node echo program, its npm dependencies installed (cached under ~/.cache/lkrun)."""
    ensure_node_modules(NODE_ECHO)
    return NODE_ECHO / "echo.mjs"


def node_agent(name: str, program: Path, **fields: Any) -> str:
    lines = [f"[agents.{name}]", f'command = ["node", "{program}"]']
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in fields.items()]
    return "\n".join(lines) + "\n"


@pytest.fixture
def node_pids() -> Iterator[list[int]]:
    """Pids of Node job processes a test saw: none may outlive it."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(OSError):
            if b"echo.mjs" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)


@needs_node
async def test_node_agent_joins_and_echoes_from_a_warm_process(
    start_daemon: Any, livekit_server: Any, node_echo: Path, node_pids: list[int]
) -> None:
    name, room_name = unique("node"), unique("room")
    daemon = await start_daemon(CPU_OFF + node_agent(name, node_echo, idle_processes=1))
    agent = (await daemon.status())["agents"][0]
    assert agent["framework"] == "command"
    assert agent["app"].startswith("command: ") and agent["app"].endswith(str(node_echo))
    assert agent["python"] == "" and agent["fork_server_pid"] is None  # none of ours runs it
    status = daemon.cli("status")
    assert status.returncode == 0 and f"{name}: command: " in status.stdout
    assert "; python" not in status.stdout
    # Its ready said "warm": true, so a process waits for the first job.
    await wait_for(
        lambda: _idle(daemon), 30, what="a warm Node process"
    )  # the pool fills in the background
    async with observer(livekit_server, room_name) as room:
        dispatch_id = await dispatch(livekit_server, room_name, name)
        participant = await wait_for_participant(room, f"{name}-", timeout=30)
        job = await job_in_room(daemon, room_name, "running")
        node_pids.append(job["pid"])
        assert job["warm"] is True and job["identity"] == participant.identity
        assert await echo_roundtrip(room, participant.identity, b"hello node") == b"hello node"
        async with livekit_api(livekit_server) as lk:
            await lk.agent_dispatch.delete_dispatch(dispatch_id, room_name)
        await wait_for(lambda: status_is(daemon, job["id"], "success"), 20, what="its end")
    ended = await daemon.job(job["id"])
    assert ended is not None and ended["error"] == "" and ended["exit_code"] == 0
    assert (ended["stop_reason"], ended["cause"]) == ("terminated by LiveKit", "terminated")
    assert not pid_alive(job["pid"])
    # Its log is its stderr: the SDK's own logger went there too, not onto the protocol.
    logs = daemon.cli("jobs", "logs", job["id"])
    assert logs.returncode == 0 and f"echo ready in room {room_name}" in logs.stdout
    # That nothing but messages reached its stdout (no line the daemon dropped) is counted
    # by the conformance kit's stdout check: tests/test_conformance.py runs it on this echo.


@needs_node
@pytest.mark.e2e
async def test_the_node_echo_refuses_a_start_of_another_protocol_version(node_echo: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(node_echo),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert (ready["type"], ready["protocol"]) == ("ready", 1)
        start = {"type": "start", "protocol": 2, "job": {"id": "AJ_1"}, "url": "ws://x"}
        proc.stdin.write(json.dumps(start).encode() + b"\n")
        out = await asyncio.wait_for(proc.stdout.read(), 30)  # until it exits
        said = [json.loads(line) for line in out.splitlines()]
        # No job (no running, no join): a failed done that names both versions.
        assert said == [
            {
                "type": "done",
                "ok": False,
                "error": "the daemon speaks job protocol 2; this program speaks 1",
                "reason": "",
            }
        ]
        assert await asyncio.wait_for(proc.wait(), 10) == 1
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@needs_node
async def test_editing_a_node_agents_program_replaces_its_warm_process(
    start_daemon: Any, livekit_server: Any, node_echo: Path, node_pids: list[int], tmp_path: Path
) -> None:
    name, room_name = unique("node"), unique("room")
    program = _copy_of(node_echo, tmp_path / "d0")  # where start_daemon puts the manifest
    table = f'[agents.{name}]\ncommand = ["node", "echo.mjs"]\nidle_processes = 1\n'
    daemon = await start_daemon(CPU_OFF + table)
    [old] = await wait_for(lambda: _node_processes(daemon), 30, what="a warm Node process")
    node_pids.append(old)

    _edit(program, "echo ready in room", "edited echo in room")
    # The watch sees echo.mjs (no .py file changed): the warm process goes, a new one comes.
    [new] = await wait_for(
        lambda: [p for p in _node_processes(daemon) if p != old] if not pid_alive(old) else [],
        30,
        what="the warm process replaced",
    )
    node_pids.append(new)
    await wait_for(lambda: _idle(daemon), 30, what="the new process ready")
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "running")
    assert job["warm"] is True and job["pid"] == new

    def new_code_ran() -> bool:  # its log line says so once it has joined
        return "edited echo in room" in daemon.cli("jobs", "logs", job["id"]).stdout

    await wait_for(new_code_ran, 20, what="the edited program's log line")


def _copy_of(program: Path, directory: Path) -> Path:
    """A copy of ``program`` in ``directory``, its npm dependencies linked in beside it."""
    directory.mkdir()
    (directory / "node_modules").symlink_to(ensure_node_modules(program.parent))
    copy = directory / program.name
    copy.write_text(program.read_text())
    return copy


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _node_processes(daemon: Any) -> list[int]:
    """The daemon's Node job processes (warm or serving a job)."""
    children = psutil.Process(daemon.pid).children()
    return [c.pid for c in children if any("echo.mjs" in word for word in _cmdline(c))]


def _cmdline(proc: psutil.Process) -> list[str]:
    with contextlib.suppress(psutil.Error):
        return proc.cmdline()
    return []


class _Host:
    """Stands for a running agent: counts the warm-process replacements asked of it."""

    def __init__(self, *command: str) -> None:
        self.spec = SimpleNamespace(
            command=command, resolved_framework="command" if command else "lkrun"
        )
        self.code_changes = 0

    def code_changed(self) -> None:
        self.code_changes += 1


async def test_a_command_agents_processes_are_replaced_for_its_own_files_only(
    tmp_path: Path,
) -> None:
    daemon = make_daemon(tmp_path)
    daemon.phase = "serving"
    program = tmp_path / "agent" / "echo.mjs"
    program.parent.mkdir()
    program.write_text("// the agent\n")
    node, python = _Host("/usr/bin/node", "agent/echo.mjs", "--flag"), _Host()
    daemon.hosts = {"node": node, "py": python}  # type: ignore[dict-item]
    manifest = daemon.manifest.path.resolve()
    assert daemon_module.command_files(node.spec.command, tmp_path) == {program.resolve()}

    relevant = daemon_module._relevant_to(manifest, daemon._command_files)
    assert relevant(Change.modified, str(program))  # not Python, but the agent's program
    assert not relevant(Change.modified, str(tmp_path / "agent" / "notes.mjs"))
    assert relevant(Change.modified, str(tmp_path / "helpers.py"))

    await daemon._on_changes(manifest, {(Change.modified, str(tmp_path / "helpers.py"))})
    assert (node.code_changes, python.code_changes) == (0, 1)  # not the Node agent's code
    await daemon._on_changes(manifest, {(Change.modified, str(program))})
    assert (node.code_changes, python.code_changes) == (1, 1)


async def _idle(daemon: Any) -> bool:
    return (await daemon.status())["agents"][0]["idle_processes"] == 1


@needs_node
async def test_jobs_kill_ends_a_node_job(
    start_daemon: Any, livekit_server: Any, node_echo: Path, node_pids: list[int]
) -> None:
    name, r1, r2 = unique("node"), unique("r1"), unique("r2")
    daemon = await start_daemon(CPU_OFF + node_agent(name, node_echo))
    await dispatch(livekit_server, r1, name)
    await dispatch(livekit_server, r2, name)
    gentle = await job_in_room(daemon, r1, "running")
    forced = await job_in_room(daemon, r2, "running")
    node_pids += [gentle["pid"], forced["pid"]]
    assert gentle["warm"] is False  # no idle_processes: started when the job came

    assert daemon.cli("jobs", "kill", gentle["id"]).returncode == 0
    await wait_for(lambda: status_is(daemon, gentle["id"], "success"), 20, what="a clean stop")
    ended = await daemon.job(gentle["id"])
    assert ended is not None and ended["stop_reason"] == "stopped by `lkrun jobs kill`"
    assert ended["exit_code"] == 0  # it said done and exited when asked
    assert ended["cause"] == "killed"

    assert daemon.cli("jobs", "kill", forced["id"], "--force").returncode == 0
    await wait_for(lambda: status_is(daemon, forced["id"], "failed"), 20, what="the kill")
    killed = await daemon.job(forced["id"])
    assert killed is not None and killed["error"] == "killed by `lkrun jobs kill --force`"
    assert killed["exit_code"] == -signal.SIGTERM
    assert killed["cause"] == "killed"  # the operator's kill, not a signal nobody sent
    assert not pid_alive(gentle["pid"]) and not pid_alive(forced["pid"])


@needs_node
async def test_a_draining_daemon_lets_its_node_job_finish(
    start_daemon: Any, livekit_server: Any, node_echo: Path, node_pids: list[int]
) -> None:
    name, room_name, later = unique("node"), unique("room"), unique("later")
    daemon = await start_daemon(CPU_OFF + node_agent(name, node_echo))
    async with observer(livekit_server, room_name) as room:
        dispatch_id = await dispatch(livekit_server, room_name, name)
        participant = await wait_for_participant(room, f"{name}-", timeout=30)
        job = await job_in_room(daemon, room_name, "running")
        node_pids.append(job["pid"])

        daemon.signal(signal.SIGTERM)
        code, body = await wait_for(lambda: _draining(daemon), 10, what="the drain")
        assert (code, body["reason"]) == (503, "draining")
        # No new job while draining; the running one still serves.
        await dispatch(livekit_server, later, name)
        assert await echo_roundtrip(room, participant.identity, b"still here") == b"still here"
        assert daemon.proc.poll() is None

        async with livekit_api(livekit_server) as lk:
            await lk.agent_dispatch.delete_dispatch(dispatch_id, room_name)
        assert await daemon.wait_exit(30) == 0
    assert not pid_alive(job["pid"])
    history = daemon.history()
    assert [(j["id"], j["status"], j["error"]) for j in history] == [(job["id"], "success", "")]


async def _draining(daemon: Any) -> tuple[int, dict[str, Any]] | None:
    code, body = await daemon.http("/readyz")
    return (code, body) if code == 503 else None


@needs_node
async def test_a_node_job_over_its_memory_limit_is_killed(
    start_daemon: Any, livekit_server: Any, node_echo: Path, node_pids: list[int]
) -> None:
    # Node with the SDK loaded needs well over 20 MB: the first sample is over the limit.
    name, room_name = unique("node"), unique("room")
    daemon = await start_daemon(CPU_OFF + node_agent(name, node_echo, memory_limit_mb=20))
    await dispatch(livekit_server, room_name, name)
    failed = await job_in_room(daemon, room_name, "failed")
    node_pids.append(failed["pid"])
    assert re.fullmatch(
        r"memory limit exceeded: \d+ MB in \d+ process\(es\) > memory_limit_mb=20", failed["error"]
    ), failed
    assert failed["peak_memory_mb"] > 20 and failed["cause"] == "memory_limit"
    assert not pid_alive(failed["pid"])


@needs_node
async def test_a_node_job_past_its_timeout_fails(
    start_daemon: Any, livekit_server: Any, node_echo: Path, node_pids: list[int]
) -> None:
    name, room_name = unique("node"), unique("room")
    daemon = await start_daemon(CPU_OFF + node_agent(name, node_echo, job_timeout="2s"))
    await dispatch(livekit_server, room_name, name)
    failed = await job_in_room(daemon, room_name, "failed")
    node_pids.append(failed["pid"])
    assert failed["error"] == "job exceeded job_timeout=2s", failed
    assert failed["exit_code"] == 0  # it stopped when asked, and still counts as failed
    assert failed["stop_reason"] == "job exceeded job_timeout=2s"
    assert failed["cause"] == "job_timeout"


@needs_node
async def test_a_node_job_dies_with_its_daemon(
    start_daemon: Any, livekit_server: Any, node_echo: Path, node_pids: list[int]
) -> None:
    name, room_name = unique("node"), unique("room")
    daemon = await start_daemon(CPU_OFF + node_agent(name, node_echo))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "running")
    node_pids.append(job["pid"])
    daemon.signal(signal.SIGKILL)
    # The parent-death signal (SIGTERM) ends it at once; stdin EOF would too.
    await wait_for(lambda: not pid_alive(job["pid"]), 5, interval=0.05, what="the job to die")


# -- the manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "field", "message"),
    [
        (
            'command = ["node", "a.mjs"]\nentrypoint = "m:f"',
            "entrypoint",
            "cannot be set with command",
        ),
        ('command = ["node", "a.mjs"]\nprewarm = "m:f"', "prewarm", "cannot be set with command"),
        (
            'command = ["node", "a.mjs"]\nframework = "lkrun"',
            "framework",
            "cannot be set with command",
        ),
        (
            'command = ["node", "a.mjs"]\nstart_method = "spawn"',
            "start_method",
            "cannot be set with command",
        ),
        ('command = ["node", "a.mjs"]\npython = "/usr/bin/python3"', "python", "cannot be set"),
        ("command = []", "command", "must be a non-empty array of strings"),
        ('command = "node a.mjs"', "command", "must be a non-empty array of strings"),
        ('command = ["node", ""]', "command", "must contain only non-empty strings"),
        ('command = ["./no-such-program"]', "command", "no such program: ./no-such-program"),
        ("max_jobs = 2", "entrypoint", 'is required (or command = ["program", ...]'),
    ],
)
def test_command_fields_are_checked(table: str, field: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest(f"[agents.n]\n{table}\n", "agents.toml")
    error = caught.value
    assert (error.agent, error.field) == ("n", field)
    assert str(error).startswith(f"agents.toml: agent 'n': field '{field}': {message}"), error
    assert "\n" not in str(error)


def test_a_command_program_is_found_relative_to_the_manifest(tmp_path: Path) -> None:
    program = tmp_path / "bin" / "agent"
    program.parent.mkdir()
    program.write_text("#!/bin/sh\n")
    manifest_path = tmp_path / "agents.toml"
    text = '[agents.n]\ncommand = ["bin/agent", "--flag", "file.txt"]\nidle_processes = 1\n'
    with pytest.raises(ManifestError, match=r"field 'command': not executable: bin/agent"):
        parse_manifest(text, manifest_path)
    program.chmod(0o755)
    spec = parse_manifest(text, manifest_path).agents["n"]
    # The program made absolute; its arguments as given (it runs in the manifest's directory).
    assert spec.command == (str(program), "--flag", "file.txt")
    assert spec.start_method == "spawn" and spec.idle_processes == 1
    checked = check_entrypoints(parse_manifest(text, manifest_path)).agents["n"]
    assert checked.app is not None and checked.app.framework == "command"
    assert checked.app.summary() == f"command: {program} --flag file.txt"


def test_a_bare_program_name_is_looked_up_on_the_jobs_path(tmp_path: Path) -> None:
    (tmp_path / "tool").write_text("#!/bin/sh\n")
    (tmp_path / "tool").chmod(0o755)
    text = '[agents.n]\ncommand = ["tool", "x"]\nenv = {{ PATH = "{path}" }}\n'
    checked = check_entrypoints(parse_manifest(text.format(path=tmp_path), "agents.toml"))
    assert checked.agents["n"].app is not None
    assert checked.agents["n"].app.command == (str(tmp_path / "tool"), "x")
    with pytest.raises(ManifestError) as caught:
        check_entrypoints(parse_manifest(text.format(path="/nonexistent"), "agents.toml"))
    assert str(caught.value) == (
        "agents.toml: agent 'n': field 'command': cannot run tool: not found on PATH (/nonexistent)"
    )


# -- warm processes -------------------------------------------------------------------------


def _programs(made: list[FakeProcess], ready: dict[str, Any]) -> Any:
    def factory() -> FakeProcess:
        proc = FakeProcess()
        proc.ready_message = ready  # type: ignore[attr-defined]  as JobProcess records it
        made.append(proc)
        return proc

    return factory


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_a_program_that_does_not_say_warm_is_started_per_job() -> None:
    made: list[FakeProcess] = []
    pool = WarmPool(
        label="n", factory=_programs(made, {"type": "ready"}), size=2, timeout=60, require_warm=True
    )
    task = asyncio.create_task(pool.run())
    await settle()
    [first] = made
    first.ready()
    await settle()
    # Not kept: it did not say it waits for its start. No second one is started.
    assert first.kinds() == ["spawn", "kill"] and pool.idle == [] and len(made) == 1
    assert pool.settled and not pool.warming_first and pool.wanted == 0
    pool.recycle("new code")  # a change may bring a program that says otherwise
    await settle()
    assert len(made) == 2
    await _cancel(task)


async def test_a_program_that_says_warm_is_kept_idle() -> None:
    made: list[FakeProcess] = []
    ready = {"type": "ready", "protocol": 1, "warm": True}
    pool = WarmPool(
        label="n", factory=_programs(made, ready), size=2, timeout=60, require_warm=True
    )
    task = asyncio.create_task(pool.run())
    for expected in (1, 2):
        await settle()
        assert len(made) == expected
        made[-1].ready()
    await settle()
    assert pool.idle == made and all(p.kinds() == ["spawn"] for p in made)
    await _cancel(task)


# -- the agents-js proof of concept ---------------------------------------------------------

AGENTS_JS_SHIM = NODE_ECHO.parent / "agents-js-shim"


def test_the_agents_js_evidence_the_readme_cites_is_in_the_repo() -> None:
    readme = (NODE_ECHO.parents[2] / "README.md").read_text()
    assert "(examples/node/agents-js-shim/README.md)" in readme
    for name in ("README.md", "shim.mjs", "app.mjs", "agents.toml", "measure.sh"):
        assert (AGENTS_JS_SHIM / name).is_file(), name
    # The versions it was tried with, pinned exactly, and the lock installs those.
    package = json.loads((AGENTS_JS_SHIM / "package.json").read_text())
    lock = json.loads((AGENTS_JS_SHIM / "package-lock.json").read_text())
    assert package["dependencies"]["@livekit/agents"] == "1.9.0"
    assert lock["packages"][""]["dependencies"] == package["dependencies"]
    for name, version in package["dependencies"].items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name
    # Two command agents (the shim and the Node echo beside it) that check accepts as such.
    manifest = parse_manifest(
        (AGENTS_JS_SHIM / "agents.toml").read_text(), AGENTS_JS_SHIM / "agents.toml"
    )
    assert {name: spec.command[1:] for name, spec in manifest.agents.items()} == {
        "agents-js-echo": ("shim.mjs", "app.mjs"),
        "node-echo": ("../echo/echo.mjs",),
    }
