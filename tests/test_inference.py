"""The framework's shared inference process, end to end against a real livekit-server.

Two livekit-agents apps of one environment (tests/lka_apps/inference_app.py, a bare
function, and inference_server.py, an AgentServer) use a local model through the job
context's ``inference_executor``, as the turn detector plugin's models do; the model is
tests/lka_apps/pid_runner.py, whose answers name the process that ran them. The daemon runs
one inference process for both agents: the agents are not ready until it is up, both
agents' jobs get their answers from it, a request in flight when it is killed fails at once,
it is started again and the same job's next request is answered by the new one, `lkrun
status` and the metrics show its memory and latency, and it stops with its last agent.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from livekit import rtc

from lkrun.api import control
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
    # What a killed daemon cannot clean up: its socket directory (under the temp dir).
    shutil.rmtree(Path(inference["socket"]).parent)


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
    assert after["restarts"] == 0 and not pid_alive(before["pid"])
    assert inference_processes(daemon.pid) == [after["pid"]]
