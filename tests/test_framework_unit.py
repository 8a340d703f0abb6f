"""Pieces of livekit-agents hosting that need no server: requests, credentials."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.json_format import MessageToDict
from livekit.agents import JobContext, JobRequest
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.agent_host import _app_decision
from lkrun.child.framework.app import FrameworkApp
from lkrun.child.framework.job import FrameworkJob, running_job_info
from lkrun.child.framework.requests import RequestServer
from lkrun.credentials import DASHBOARD_TOKEN_ENV, Credentials, child_env
from lkrun.dashboard import guard
from lkrun.decisions import Acceptance, Decline
from lkrun.manifest import AgentSpec, parse_manifest
from lkrun.supervision.agent_processes import job_env
from tests.helpers import agent_table


class FakePipe:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, kind: str, **fields: Any) -> None:
        self.sent.append((kind, fields))


async def entrypoint(ctx: JobContext) -> None:
    pass


def request(room: str, timeout: float = 1.0) -> dict[str, Any]:
    job = proto.Job(id="AJ_1", room=models.Room(name=room), agent_name="a")
    return {"type": "request", "id": 7, "job": MessageToDict(job), "timeout": timeout}


async def answer(request_fnc: Any, msg: dict[str, Any]) -> dict[str, Any]:
    pipe = FakePipe()
    app = FrameworkApp("function", entrypoint, request_fnc=request_fnc)
    await RequestServer(app, pipe).answer(msg)
    [(kind, fields)] = pipe.sent
    assert kind == "answer" and fields["id"] == 7
    return fields


async def test_request_function_accepts_with_its_own_identity() -> None:
    async def on_request(req: JobRequest) -> None:
        assert req.room.name == "lobby" and req.id == "AJ_1"
        await req.accept(identity="me", name="Me", attributes={"k": "v"})
        await asyncio.sleep(0)  # it may go on after answering

    got = await answer(on_request, request("lobby"))
    assert got["accept"] is True and got["identity"] == "me" and got["name"] == "Me"
    assert got["attributes"] == {"k": "v"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("reject", {"accept": False, "terminate": True}),
        ("nothing", {"accept": False, "error": "on_request returned without accepting or "
                     "rejecting the job"}),
        ("raise", {"accept": False, "error": "on_request failed: ValueError: nope"}),
        ("hang", {"accept": False, "error": "on_request did not answer within "
                  "request_timeout=0.2s"}),
    ],
)  # fmt: skip
async def test_request_function_refusals(body: str, expected: dict[str, Any]) -> None:
    async def on_request(req: JobRequest) -> None:
        if body == "reject":
            await req.reject()
        elif body == "raise":
            raise ValueError("nope")
        elif body == "hang":
            await asyncio.sleep(60)

    got = await answer(on_request, request("r", timeout=0.2))
    assert {k: got[k] for k in expected} == expected


def test_app_decision_fills_in_lkrun_values() -> None:
    ours = Acceptance(identity="a-1", name="agent", metadata="m", attributes=(("x", "1"),))
    mine = _app_decision({"accept": True, "identity": "", "attributes": {"y": "2"}}, ours)
    assert mine == Acceptance(
        identity="a-1", name="agent", metadata="m", attributes=(("x", "1"), ("y", "2"))
    )
    assert _app_decision({"accept": False, "terminate": True}, ours) == Decline(
        "on_request", "rejected by on_request (terminate)", terminate=True
    )


def test_framework_apps_get_the_official_identity_and_name_unless_the_manifest_sets_them() -> None:
    def spec(framework: str, **fields: str) -> AgentSpec:
        manifest = parse_manifest(
            agent_table("helper", "m:f", framework=framework, **fields), "agents.toml"
        )
        return manifest.agents["helper"]

    for framework, identity, name in (
        ("livekit-agents", "agent-AJ_1", ""),  # as the official worker
        ("lkrun", "helper-AJ_1", "helper"),
    ):
        got = spec(framework)
        assert got.format_identity(job_id="AJ_1", room="r") == identity
        assert got.display_name() == name
    chosen = spec("livekit-agents", identity="{agent}-{room}-{job_id}", participant_name="Hi")
    assert chosen.format_identity(job_id="AJ_1", room="r") == "helper-r-AJ_1"
    assert chosen.display_name() == "Hi"


def test_job_environment_has_the_secret_only_when_asked() -> None:
    creds = Credentials("ws://127.0.0.1:7880", "key", "very-secret")
    base = {
        "LIVEKIT_API_KEY": "leak",
        "LIVEKIT_API_SECRET": "leak",
        "LKRUN_DASHBOARD_TOKEN": "leak-leak-leak-leak",
        "HOME": "/root",
    }
    spec = AgentSpec(name="a", entrypoint="m:f")
    env = job_env(spec, creds, base, Path("/app"))
    assert "LIVEKIT_API_KEY" not in env and "LIVEKIT_API_SECRET" not in env
    assert "LKRUN_DASHBOARD_TOKEN" not in env
    assert env["LIVEKIT_URL"] == creds.url and env["HOME"] == "/root"
    opted = job_env(AgentSpec(name="a", entrypoint="m:f", pass_credentials=True), creds, base,
                    Path("/app"))  # fmt: skip
    assert opted["LIVEKIT_API_KEY"] == "key" and opted["LIVEKIT_API_SECRET"] == "very-secret"
    assert "LKRUN_DASHBOARD_TOKEN" not in opted  # pass_credentials is LiveKit's only


def test_child_env_withholds_the_dashboard_token_always() -> None:
    base = {
        "LIVEKIT_API_KEY": "k",
        "LIVEKIT_API_SECRET": "s",
        DASHBOARD_TOKEN_ENV: "t" * 20,
        "HOME": "/root",
    }
    assert child_env(base) == {"HOME": "/root"}
    assert child_env(base, pass_credentials=True) == {
        "LIVEKIT_API_KEY": "k",
        "LIVEKIT_API_SECRET": "s",
        "HOME": "/root",
    }
    assert guard.ENV_TOKEN == DASHBOARD_TOKEN_ENV  # the name the dashboard reads


def test_running_job_info_from_a_start_message() -> None:
    job = proto.Job(id="AJ_9", room=models.Room(name="r", sid="RM_1"), metadata="meta")
    info = running_job_info(
        {
            "job": MessageToDict(job),
            "url": "ws://x",
            "token": "t",
            "identity": "agent-1",
            "name": "Agent",
            "attributes": {"a": "b"},
            "worker_id": "AW_1",
            "received_at": 1.5,
            "future_field": "ignored",
        }
    )
    assert info.job == job and info.url == "ws://x" and info.token == "t"
    assert info.accept_arguments.identity == "agent-1" and info.accept_arguments.name == "Agent"
    assert info.accept_arguments.attributes == {"a": "b"}
    assert info.worker_id == "AW_1" and info.received_at == 1.5 and not info.fake_job


async def test_a_connect_that_completes_after_the_stop_starts_nothing() -> None:
    """The entrypoint's connect may end after the job's clean-up closed what it had: no
    empty-room watch, room check or attribute update is started then (none would be
    closed or awaited)."""
    job = proto.Job(id="AJ_9", room=models.Room(name="r", sid="RM_1"))
    start = {
        "job": MessageToDict(job),
        "url": "ws://x",
        "token": "t",
        "identity": "agent-1",
        "empty_timeout": 3,
    }
    framework_job = FrameworkJob(Any, start, logging.getLogger("test"))  # type: ignore[arg-type]
    assert framework_job.empty_timeout == 3
    framework_job.ctx = object()  # type: ignore[assignment]  # touched only if it goes on
    framework_job.shutdown("stop")
    framework_job._on_connect()
    assert framework_job._empty is None and len(framework_job._background) == 0
    assert not framework_job._connected


def test_job_context_still_has_what_the_job_runner_reads() -> None:
    # Instance attributes cannot be checked on the class: build a context as a job would.
    from livekit import rtc
    from livekit.agents import JobProcess
    from livekit.agents.job import JobExecutorType

    from lkrun.child.framework.job import NoInference

    async def build() -> JobContext:
        info = running_job_info({"job": {}, "url": "ws://x", "token": "t", "identity": "i"})
        proc = JobProcess(executor_type=JobExecutorType.PROCESS, user_arguments=None,
                          http_proxy=None)  # fmt: skip
        return JobContext(
            proc=proc,
            info=info,
            room=rtc.Room(),
            on_connect=lambda: None,
            on_shutdown=lambda reason: None,
            inference_executor=NoInference(),
        )

    ctx = asyncio.run(build())
    for name in ("_primary_agent_session", "_shutdown_callbacks", "_pending_tasks"):
        assert hasattr(ctx, name), name


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
async def test_request_process_answers_offers(method: str) -> None:
    """The agent's request process, started like a job process, runs the app's on_request."""
    import logging
    import os
    import signal

    from lkrun.supervision.forkserver import ForkServer
    from lkrun.supervision.job_process import AppSpec, JobProcess, SpawnLauncher
    from lkrun.supervision.request_process import RequestProcess, RequestRefused
    from tests.conftest import REPO, wait_for

    env = dict(os.environ, PYTHONPATH=str(REPO))
    app = AppSpec("tests.lka_apps.gatekeeper:server", framework="livekit-agents")
    launcher: Any = (
        SpawnLauncher(app=app, cwd=REPO, env=env)
        if method == "spawn"
        else ForkServer(label="t", app=app, cwd=REPO, env=env, load_timeout=60)
    )
    log = logging.LoggerAdapter(logging.getLogger("test.requests"), {})
    requests = RequestProcess(
        label="gate",
        factory=lambda: JobProcess(launcher=lambda: launcher("requests"), log=log),
        timeout=2.0,
        start_timeout=60.0,
    )
    with pytest.raises(RequestRefused, match="not ready"):  # offers before it is up: declined
        await requests.ask(proto.Job(id="AJ_0", room=models.Room(name="early")))
    runner = asyncio.create_task(requests.run())
    try:
        await wait_for(lambda: requests.ready, 60, what="the request process")
        yes = await requests.ask(proto.Job(id="AJ_1", room=models.Room(name="lobby")))
        assert yes["accept"] is True and yes["identity"] == "gate-lobby"
        no = await requests.ask(proto.Job(id="AJ_2", room=models.Room(name="deny-me")))
        assert no["accept"] is False and no["terminate"] is True
        # A request process that dies is replaced; offers meanwhile are declined.
        first: Any = requests._serving
        os.kill(first.pid, signal.SIGKILL)
        await wait_for(lambda: requests._serving not in (None, first), 60,
                       what="a new request process")  # fmt: skip
        again = await requests.ask(proto.Job(id="AJ_3", room=models.Room(name="lobby")))
        assert again["accept"] is True
        # A code change: the old process answers until the new one is ready.
        second: Any = requests._serving
        requests.restart()
        answered = 0
        while requests._serving is second:
            meanwhile = await requests.ask(proto.Job(id="AJ_4", room=models.Room(name="x")))
            assert meanwhile["accept"] is True
            answered += 1
            await asyncio.sleep(0.05)
        assert answered > 0 and requests.ready
        await wait_for(lambda: second.exited, 20, what="the old request process to stop")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        if isinstance(launcher, ForkServer):
            await launcher.close(5)
