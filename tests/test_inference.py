"""The framework's shared inference process, end to end against a real livekit-server.

Two livekit-agents apps of one environment (tests/lka_apps/inference_app.py, a bare
function, and inference_server.py, an AgentServer) use a local model through the job
context's ``inference_executor``, as the turn detector plugin's models do; the model is
tests/lka_apps/pid_runner.py, whose answers name the process that ran them. The daemon runs
one inference process for both agents: the agents are not ready until it is up, both
agents' jobs get their answers from it, a request in flight when it is killed fails at once,
it is started again and the same job's next request is answered by the new one, `lkrun
status` and the metrics show its memory and latency, and it stops with its last agent.

The supervision (lkrun.supervision.inference) also runs here in the test's own loop: with
the real inference process, a restart asked for (a new runner) that no request notices;
with stand-in processes, its failures, stops and gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from livekit import rtc

from lkrun import paths
from lkrun.api import control
from lkrun.api.metrics import Metrics
from lkrun.child.framework.inference import SocketInference
from lkrun.supervision import inference as supervision
from lkrun.supervision.inference import InferenceProcess, InferenceProcesses, Lease
from tests.conftest import (
    REPO,
    observer,
    pid_alive,
    run_cli,
    unique,
    wait_for,
    wait_for_participant,
)
from tests.envs import FRAMEWORKS
from tests.helpers import agent_table, dispatch, job_in_room

CPU_OFF = '[daemon]\nload_threshold = "off"\n'
APP = "tests.lka_apps.inference_app:entrypoint"
PID_RUNNER = "tests.lka_apps.pid_runner:PidRunner"
SERVER_APP = "tests.lka_apps.inference_server:server"
PLAIN_APP = "tests.lka_apps.listener:entrypoint"
METHOD = "lkrun_test_pid"
INIT_SECONDS = 3.0  # the model's load time, so the wait for it can be seen


def inference_processes(daemon_pid: int) -> list[int]:
    """Every inference process this daemon started, counted from the process table."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "lkrun.child.framework.inference_proc" in cmdline and str(daemon_pid) in cmdline:
            found.append(proc.info["pid"])
    return found


class Replies:
    """The app's answers on lka.infer.reply, by request number."""

    def __init__(self, room: rtc.Room) -> None:
        self.room = room
        self.by_n: dict[int, dict[str, Any]] = {}
        room.on("data_received", self._on_data)

    def _on_data(self, packet: rtc.DataPacket) -> None:
        if packet.topic == "lka.infer.reply":
            reply = json.loads(packet.data)
            self.by_n[reply["n"]] = reply

    async def send(self, agent: str, n: int, **request: Any) -> None:
        await self.room.local_participant.publish_data(
            json.dumps({"n": n, **request}),
            reliable=True,
            topic="lka.infer",
            destination_identities=[agent],
        )

    async def ask(self, agent: str, n: int, timeout: float = 30, **request: Any) -> dict[str, Any]:
        await self.send(agent, n, **request)
        return await wait_for(lambda: self.by_n.get(n), timeout, what=f"the reply to request {n}")


@pytest.mark.e2e
def test_check_names_the_runners_each_app_registers(tmp_path: Path) -> None:
    """Both inference apps are checked in one process, where the second import of the
    plugin registers nothing: each is still credited with its runner; the plain app is not."""
    manifest = tmp_path / "agents.toml"
    manifest.write_text(
        agent_table("inf-a", APP)
        + agent_table("inf-b", SERVER_APP)
        + agent_table("plain", PLAIN_APP)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = run_cli("check", str(manifest), "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = {agent["name"]: agent for agent in json.loads(result.stdout)["agents"]}
    runner = [{"method": METHOD, "class": "tests.lka_apps.pid_runner:PidRunner"}]
    assert report["inf-a"]["runners"] == runner
    assert report["inf-b"]["runners"] == runner
    assert report["plain"]["runners"] == []

    text = run_cli("check", str(manifest), env=env)
    assert text.returncode == 0, text.stderr
    lines = {line.split(":")[0].strip(): line for line in text.stdout.splitlines()}
    assert f"inference runners: {METHOD}" in lines["inf-a"]
    assert f"inference runners: {METHOD}" in lines["inf-b"]
    assert "inference runners" not in lines["plain"]


async def test_agents_of_one_env_share_one_inference_process(
    start_daemon: Any, livekit_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = unique("inf-a"), unique("inf-b")
    monkeypatch.setenv("LKRUN_TEST_RUNNER_INIT_SECONDS", str(INIT_SECONDS))
    daemon = await start_daemon(
        CPU_OFF + agent_table(a, APP) + agent_table(b, SERVER_APP), wait=False
    )

    # While the model loads, neither agent takes jobs: FULL ("starting"), saying why.
    samples: list[dict[str, Any]] = []

    async def up() -> bool:
        try:
            status = await daemon.status()
        except control.ControlError:  # not listening yet
            return False
        samples.append(status)
        return bool(status["ready"])

    await wait_for(up, 90, what="the daemon to be ready")
    loading = [
        s
        for s in samples
        if s["inference"]
        and not s["inference"][0]["ready"]
        and all(agent["connected"] for agent in s["agents"])
    ]
    assert loading, "the agents were never seen registered while the model loaded"
    for status in loading:
        assert not status["ready"]
        assert all(agent["full_reason"] == "starting" for agent in status["agents"])
    # Once the fork servers have loaded the code, the model is what they wait for.
    waiting = "its inference process is loading lkrun_test_pid"
    assert any(waiting in status["not_ready_reason"] for status in loading)

    [inference] = (await daemon.status())["inference"]
    assert inference["ready"] and inference["runners"] == [METHOD]
    assert inference["agents"] == sorted([a, b])
    first_pid = inference["pid"]
    assert inference_processes(daemon.pid) == [first_pid]  # one for both agents

    room_a, room_b = unique("inf-room-a"), unique("inf-room-b")
    async with observer(livekit_server, room_a) as ra, observer(livekit_server, room_b) as rb:
        replies_a, replies_b = Replies(ra), Replies(rb)
        await dispatch(livekit_server, room_a, a)
        await dispatch(livekit_server, room_b, b)
        agent_a = (await wait_for_participant(ra, "agent-")).identity
        agent_b = (await wait_for_participant(rb, "agent-")).identity
        await wait_for(lambda: _job_running(daemon, room_a), 30, what="the job in room a to run")
        await wait_for(lambda: _job_running(daemon, room_b), 30, what="the job in room b to run")

        # Both agents' jobs are answered by the one process, whose counter they share.
        answers = [(await replies_a.ask(agent_a, n, text=f"a{n}"))["answer"] for n in (1, 2, 3)]
        answers.append((await replies_b.ask(agent_b, 4, text="b4"))["answer"])
        assert {ans["pid"] for ans in answers} == {first_pid}
        assert [ans["count"] for ans in answers] == [1, 2, 3, 4]
        assert all(ans["initialized_here"] for ans in answers)
        assert [ans["text"] for ans in answers] == ["a1", "a2", "a3", "b4"]

        # A request in flight when the process dies fails at once, not after its 30 s.
        mark = tmp_path / "in-flight"
        await replies_a.send(agent_a, 5, sleep=30, mark=str(mark))
        await wait_for(mark.exists, 30, what="the slow request to reach the inference process")
        killed_at = time.monotonic()
        os.kill(first_pid, signal.SIGKILL)
        failed = await wait_for(lambda: replies_a.by_n.get(5), 10, what="the in-flight failure")
        assert time.monotonic() - killed_at < 10
        assert "answer" not in failed and "InferenceUnavailable" in failed["error"]
        assert "closed the connection" in failed["error"]

        # Started again (after its backoff); the same job's next request reaches the new one.
        async def restarted() -> dict[str, Any] | None:
            found = (await daemon.status())["inference"]
            ready = found and found[0]["ready"] and found[0]["pid"] != first_pid
            return found[0] if ready else None

        again = await wait_for(restarted, 60, what="the inference process to be started again")
        assert again["restarts"] == 1 and "exited with code -9" in again["last_error"]
        second_pid = again["pid"]
        assert not pid_alive(first_pid)
        answer = (await replies_a.ask(agent_a, 6, text="after"))["answer"]
        assert answer["pid"] == second_pid and answer["count"] == 1
        answer = (await replies_b.ask(agent_b, 7, text="after"))["answer"]
        assert answer["pid"] == second_pid and answer["count"] == 2
        assert inference_processes(daemon.pid) == [second_pid]

        # Its memory and request latency, in `lkrun status --json` and the metrics.
        await wait_for(lambda: _memory_sampled(daemon), 30, what="a memory sample")
        shown = daemon.cli("status", "--json")
        [inference] = json.loads(shown.stdout)["inference"]
        assert inference["pid"] == second_pid and inference["restarts"] == 1
        assert inference["rss_mb"] > 10 and 0 < inference["pss_mb"] <= inference["rss_mb"]
        # Counted over both processes; the killed request was never answered.
        assert inference["requests"] == 6 and inference["errors"] == 0
        latency = inference["latency_ms"]
        assert latency is not None and 0 < latency["p50"] <= latency["p95"] <= latency["max"]
        text = daemon.cli("status").stdout
        assert "inference process for" in text and f"pid {second_pid}" in text
        print(f"\ninference process: {json.dumps(inference)}")

        assert await daemon.metric("lkrun_inference_up") == 1
        assert await daemon.metric("lkrun_inference_restarts_total") == 1
        ok = await daemon.metric("lkrun_inference_requests_total", method=METHOD, result="ok")
        assert ok == 6
        assert await daemon.metric("lkrun_inference_request_seconds_count") == 6
        assert await daemon.metric("lkrun_inference_memory_bytes", kind="pss") > 0

        for room in (room_a, room_b):
            job = await job_in_room(daemon, room, "running")
            assert daemon.cli("jobs", "kill", job["id"]).returncode == 0

    # With its last agent gone from the manifest, it stops.
    daemon.manifest_path.write_text(CPU_OFF + agent_table(unique("plain"), PLAIN_APP))

    async def stopped() -> bool:
        return not (await daemon.status())["inference"] and not pid_alive(second_pid)

    await wait_for(stopped, 60, what="the inference process to stop with its last agent")
    assert inference_processes(daemon.pid) == []


async def _job_running(daemon: Any, room: str) -> bool:
    return any(j["room"] == room and j["status"] == "running" for j in await daemon.jobs(False))


async def _memory_sampled(daemon: Any) -> bool:
    found = (await daemon.status())["inference"]
    return bool(found and found[0]["pss_mb"] > 0)


async def test_the_inference_process_dies_with_the_daemon(
    start_daemon: Any, livekit_server: Any
) -> None:
    """Killed with SIGKILL, the daemon cleans nothing up: the process goes by itself (its
    parent-death signal, and EOF on its stdin)."""
    daemon = await start_daemon(CPU_OFF + agent_table(unique("inf"), APP))
    [inference] = (await daemon.status())["inference"]
    assert inference_processes(daemon.pid) == [inference["pid"]]
    assert daemon.proc is not None
    daemon.proc.kill()
    daemon.proc.wait()
    await wait_for(
        lambda: not pid_alive(inference["pid"]), 10, what="the inference process to exit"
    )
    # What a killed daemon cannot clean up: its socket directory, in the runtime directory
    # under a name of its state directory's, which the next daemon with it removes.
    left = Path(inference["socket"]).parent
    assert left.is_dir() and left.parent == paths.runtime_dir()
    next_daemon = InferenceProcesses(workdir=daemon.dir, socket_dir=left)
    next_daemon.clean_stale()
    assert not left.exists()


async def test_each_environment_has_its_own_inference_process(
    start_daemon: Any, livekit_server: Any, python_env: Any
) -> None:
    """An agent on its own interpreter (manifest ``python``) gets the inference process of
    that environment, started with that interpreter: two environments, two processes."""
    env = python_env(FRAMEWORKS["1.8.9"])
    here, there = unique("inf-here"), unique("inf-there")
    daemon = await start_daemon(
        CPU_OFF
        + agent_table(here, APP)
        # Its own interpreter does not get the daemon's PYTHONPATH: the app is on its own.
        + agent_table(there, APP, python=str(env.python), env={"PYTHONPATH": str(REPO)}),
        wait=False,
    )
    await daemon.wait_registered(timeout=120)
    found = {p["agents"][0]: p for p in (await daemon.status())["inference"]}
    assert set(found) == {here, there}
    assert found[there]["interpreter"] == str(env.python)
    assert found[here]["interpreter"] != str(env.python)
    assert sorted(inference_processes(daemon.pid)) == sorted(p["pid"] for p in found.values())

    for agent in (here, there):
        room = unique("inf-env")
        async with observer(livekit_server, room) as r:
            replies = Replies(r)
            await dispatch(livekit_server, room, agent)
            identity = (await wait_for_participant(r, "agent-")).identity
            await wait_for(lambda r=room: _job_running(daemon, r), 30, what="the job to run")
            answer = (await replies.ask(identity, 1, text=agent))["answer"]
            assert answer["pid"] == found[agent]["pid"]
            assert answer["python"] == found[agent]["interpreter"]
            job = await job_in_room(daemon, room, "running")
            assert daemon.cli("jobs", "kill", job["id"]).returncode == 0


LOCAL_RUNNER = """
from livekit.agents.inference_runner import _InferenceRunner

from tests.lka_apps.pid_runner import PidRunner


class LocalRunner(PidRunner):
    INFERENCE_METHOD = "lkrun_test_local"


_InferenceRunner.register_runner(LocalRunner)
"""
LOCAL_APP = (
    "import local_runner  # noqa: F401\nfrom tests.lka_apps.inference_app import entrypoint\n"
)


@pytest.mark.e2e
async def test_a_restart_asked_for_serves_on_until_the_new_process_takes_over(
    tmp_path: Path,
) -> None:
    """The real inference process, supervised in this test's loop, a job's executor asking
    it: a second agent brings a runner the process lacks. The new process loads both
    (slowly) while the old one goes on answering; a request in flight when the new one
    takes over is still answered by the old one, while the job's next requests go to the
    new one; the old one exits once the job has its answer. No request fails."""
    (tmp_path / "local_runner.py").write_text(LOCAL_RUNNER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LKRUN_TEST_RUNNER_INIT_SECONDS": "1"}
    registry = InferenceProcesses(workdir=tmp_path, base_env=env)
    a = registry.attach("a", sys.executable, {METHOD: PID_RUNNER})
    job = SocketInference(a.socket_path)

    async def ask(**request: Any) -> int:
        answer = await job.do_inference(METHOD, json.dumps(request).encode())
        assert answer is not None
        pid: int = json.loads(answer)["pid"]
        return pid

    try:
        await wait_for(lambda: not a.waiting, 60, what="the first process")
        proc = a.process
        assert proc is not None and proc.pid is not None
        first = proc.pid
        assert await ask(text="before") == first
        mark, release = tmp_path / "in-flight", tmp_path / "release"
        held = asyncio.ensure_future(ask(mark=str(mark), until=str(release)))
        await wait_for(mark.exists, 10, what="the held request to reach the process")

        b = registry.attach("b", sys.executable, {"lkrun_test_local": "local_runner:LocalRunner"})
        assert b.waiting
        answered: list[int] = []

        async def taken_over() -> bool:
            answered.append(await ask(text="meanwhile"))
            return not b.waiting

        await wait_for(taken_over, 60, interval=0.2, what="the new process to take over")
        assert len(answered) >= 3 and set(answered[:-1]) == {first}
        second = proc.pid
        assert second not in (None, first) and proc.ready
        assert proc.status()["runners"] == ["lkrun_test_local", METHOD]
        await wait_for(
            lambda: any(c.moved for c in job._connections), 10, what="the job to hear moved"
        )
        assert await ask(text="after") == second
        assert not held.done() and pid_alive(first)
        release.touch()
        assert await asyncio.wait_for(held, 10) == first
        await wait_for(lambda: registry.pids() == {second}, 10, what="the old one to be reaped")
        assert not pid_alive(first) and proc.restarts == 0 and proc.last_error == ""
    finally:
        await job.aclose()
        await registry.close()
    assert leftover_tasks() == []


# -- the supervision, with stand-in processes ------------------------------------------------

# A few lines of Python in place of the inference process (which takes seconds to import
# livekit.agents): it speaks the same stdout protocol. FAKE_PLAN says what each start does
# in turn (FAKE_COUNT counts them): "serve" listens and says ready, then exits at the first
# line on stdin (a drain) or EOF; "stubborn" does too but ignores SIGTERM; "hang" never
# gets ready; "exitN" exits with code N.
FAKE = """
import json, os, signal, socket, sys
args = sys.argv[1:]
path = args[args.index("--socket") + 1]
runners = [a.split("=", 2)[1] for a in args if a.startswith("--runner=")]
plan = os.environ.get("FAKE_PLAN", "serve").split(",")
counter = os.environ.get("FAKE_COUNT")
n = 0
if counter:
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
step = plan[min(n, len(plan) - 1)]
if step.startswith("exit"):
    print("fake: giving up", file=sys.stderr)
    sys.exit(int(step[4:]))
if step == "hang":
    sys.stdin.readline()
    sys.exit(0)
if step == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.path.exists(path):
    os.unlink(path)
sock = socket.socket(socket.AF_UNIX)
sock.bind(path)
sock.listen()
ready = {"type": "ready", "pid": os.getpid(), "runners": runners, "failed": {}, "files": []}
print(json.dumps(ready), flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def fake_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    command = InferenceProcess.command

    def fake(self: InferenceProcess, *args: Any, **kwargs: Any) -> list[str]:
        return [sys.executable, "-c", FAKE, *command(self, *args, **kwargs)[3:]]

    monkeypatch.setattr(InferenceProcess, "command", fake)
    monkeypatch.setattr(supervision, "KILL_GRACE", 0.5)


def fake_env(tmp_path: Path, plan: str) -> dict[str, str]:
    return {**os.environ, "FAKE_PLAN": plan, "FAKE_COUNT": str(tmp_path / "starts")}


def process(
    tmp_path: Path,
    make_env: Callable[[Any], dict[str, str]] = lambda leases: {},
    **options: Any,
) -> InferenceProcess:
    return InferenceProcess(
        interpreter="/venv/bin/python",
        socket_path=short_socket_dir() / "s.sock",
        cwd=tmp_path,
        make_env=make_env,
        **options,
    )


def short_socket_dir() -> Path:
    # pytest's tmp_path can be longer than a unix socket path may be (108 bytes).
    return Path(tempfile.mkdtemp(prefix="lkrun-test-"))


@contextlib.asynccontextmanager
async def running(proc: InferenceProcess) -> AsyncIterator[asyncio.Task[None]]:
    run = asyncio.create_task(proc.run())
    try:
        yield run
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        shutil.rmtree(proc.socket_path.parent, ignore_errors=True)


def leftover_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of the daemon's inference supervision still running."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_coro().cr_code.co_filename == supervision.__file__
    ]


@pytest.mark.e2e
async def test_each_failure_says_why_that_start_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_processes: None
) -> None:
    """A start that timed out, then one that exited: last_error says the second; then it
    serves."""
    monkeypatch.setattr(supervision, "BACKOFF_BASE", 0.05)
    env = fake_env(tmp_path, "hang,exit3,serve")
    proc = process(tmp_path, make_env=lambda leases: env, initialize_timeout=0.5)
    lease = Lease("a", {"m": "p:R"}, lambda: None)
    proc.add(lease)
    errors: list[str] = []

    def served() -> bool:
        if proc.last_error and proc.last_error not in errors:
            errors.append(proc.last_error)
        return proc.ready

    async with running(proc):
        await wait_for(served, 20, interval=0.01, what="the third start to serve")
    assert len(errors) == 2 and errors[0].startswith("it did not load its runners within 0.5s")
    assert "exited with code 3 (last log line: fake: giving up)" in errors[1]
    assert proc.restarts == 2 and not lease.waiting
    assert leftover_tasks() == []


@pytest.mark.e2e
async def test_a_stopping_process_leaves_its_successors_gauges_alone(
    tmp_path: Path, fake_processes: None
) -> None:
    """An agent's interpreter loses its last agent and gets a new one while the old process
    is still stopping (it ignores SIGTERM, so that takes KILL_GRACE): the successor's
    lkrun_inference_up stays."""
    metrics = Metrics()
    python = "/env/bin/python"
    registry = InferenceProcesses(
        workdir=tmp_path, metrics=metrics, base_env=fake_env(tmp_path, "stubborn,serve")
    )

    def up() -> float | None:
        return metrics.registry.get_sample_value("lkrun_inference_up", {"interpreter": python})

    a = registry.attach("a", python, {"m": "p:R"})
    await wait_for(lambda: not a.waiting, 10, what="the first process")
    assert up() == 1 and a.process is not None
    first = a.process.pid
    assert first is not None
    a.release()
    b = registry.attach("b", python, {"m": "p:R"})
    await wait_for(lambda: not b.waiting, 10, what="its successor")
    assert pid_alive(first) and first in registry.pids()
    await registry._stopping.join()  # the first one is gone now
    assert up() == 1 and not pid_alive(first) and first not in registry.pids()
    await registry.close()
    assert up() is None and registry.pids() == set()
    assert leftover_tasks() == []


@pytest.mark.e2e
async def test_closing_while_a_process_stops_still_kills_it(
    tmp_path: Path, fake_processes: None
) -> None:
    """The daemon stops while the last agent's process is stopping (SIGTERM ignored): it
    is killed all the same, not left behind."""
    registry = InferenceProcesses(workdir=tmp_path, base_env=fake_env(tmp_path, "stubborn"))
    lease = registry.attach("a", "/env/bin/python", {"m": "p:R"})
    await wait_for(lambda: not lease.waiting, 10, what="the process")
    proc = lease.process
    assert proc is not None and proc.pid is not None
    pid = proc.pid
    try:
        lease.release()
        await wait_for(lambda: not proc.ready, 5, what="its stop to begin")
        await registry.close()
        await wait_for(lambda: not pid_alive(pid), 5, what="the process to be killed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert leftover_tasks() == []


async def test_a_runner_edited_on_disk_is_loaded_again(
    start_daemon: Any, livekit_server: Any
) -> None:
    """A runner written beside the agents: editing it starts the inference process again
    (a restart asked for, not a failure); editing the agent's own module does not."""
    daemon = await start_daemon(
        CPU_OFF + agent_table(unique("inf-local"), "local_app:entrypoint"),
        files={"local_runner.py": LOCAL_RUNNER, "local_app.py": LOCAL_APP},
    )
    [before] = (await daemon.status())["inference"]
    # Its module imports the test plugin, which registers its own runner as well.
    assert before["runners"] == ["lkrun_test_local", METHOD]

    async def fork_server() -> int | None:
        [agent] = (await daemon.status())["agents"]
        return agent["fork_server_pid"]

    zygote = await fork_server()
    (daemon.dir / "local_app.py").write_text(LOCAL_APP + "# edited\n")

    async def reloaded() -> bool:
        pid = await fork_server()
        return pid is not None and pid != zygote

    await wait_for(reloaded, 60, what="the agent's code to be loaded again")
    [same] = (await daemon.status())["inference"]
    assert same["pid"] == before["pid"]

    (daemon.dir / "local_runner.py").write_text(LOCAL_RUNNER + "# edited\n")

    async def restarted() -> dict[str, Any] | None:
        found = (await daemon.status())["inference"]
        ready = found and found[0]["ready"] and found[0]["pid"] != before["pid"]
        return found[0] if ready else None

    after = await wait_for(restarted, 60, what="the inference process to start again")
    assert after["restarts"] == 0
    # The old one drains (no job is connected: at once) and exits.
    await wait_for(
        lambda: inference_processes(daemon.pid) == [after["pid"]], 10, what="the old one to go"
    )
    assert not pid_alive(before["pid"])
