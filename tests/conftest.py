"""Fixtures: one real livekit-server per session, and lkrun daemons driven as a user would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from livekit import api, rtc

from lkrun.api import control
from tests.browser import browser  # noqa: F401  (a fixture: headless chromium, Selenium)
from tests.envs import python_env  # noqa: F401  (a fixture: cached test virtualenvs)

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Server:
    url: str
    api_key: str
    api_secret: str
    log_path: Path

    def worker_statuses(self, worker_id: str) -> list[str]:
        """The statuses the server recorded for a worker, from its debug log."""
        statuses = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if "worker status changed" in line and f'"workerID": "{worker_id}"' in line:
                statuses.append(line.rsplit('"status": "', 1)[1].split('"', 1)[0])
        return statuses

    @property
    def env(self) -> dict[str, str]:
        return {
            "LIVEKIT_URL": self.url,
            "LIVEKIT_API_KEY": self.api_key,
            "LIVEKIT_API_SECRET": self.api_secret,
        }


# Tests that need a real livekit-server or start lkrun's processes: `-m "not e2e"` is the
# fast tier (pure logic, fakes), `make test` runs everything.
E2E_FIXTURES = frozenset({"livekit_server", "start_daemon", "own_server", "python_env", "browser"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


# Every way a test can start a process ends in one of these: subprocess (its own binding of
# fork_exec; asyncio's subprocesses go through subprocess.Popen) and multiprocessing call
# _posixsubprocess.fork_exec, the rest are the os module's own.
_SPAWNERS = (
    ("subprocess", "_fork_exec"),
    ("_posixsubprocess", "fork_exec"),
    ("os", "fork"),
    ("os", "forkpty"),
    ("os", "posix_spawn"),
    ("os", "posix_spawnp"),
    ("os", "system"),
)


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """A test not marked e2e that starts a process fails: the mark is what `-m "not e2e"`
    relies on, so it must follow what a test does, not only the fixtures it names."""
    if request.node.get_closest_marker("e2e") is not None:
        yield
        return
    import importlib

    started: list[str] = []

    def refuse(what: str) -> Callable[..., Any]:
        def spawn(*_args: Any, **_kwargs: Any) -> Any:
            started.append(what)
            pytest.fail(f"{request.node.nodeid} starts a process ({what}) but is not marked e2e")

        return spawn

    for module, name in _SPAWNERS:
        target = importlib.import_module(module)
        if hasattr(target, name):
            monkeypatch.setattr(target, name, refuse(f"{module}.{name}"))
    yield
    call = getattr(request.node, "call_report", None)
    if started and (call is None or call.passed):  # the code under test caught the failure
        pytest.fail(f"{request.node.nodeid} tried to start processes ({', '.join(started)})")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.call_report = report  # type: ignore[attr-defined]
    return report


@pytest.fixture(scope="session")
def livekit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from lkrun import devserver

    binary = devserver.ensure_server_binary(on_build=lambda m: print(m, file=sys.stderr))
    logs = tmp_path_factory.mktemp("livekit")
    server = devserver.DevServer.on_free_ports(binary, logs / "livekit-server.log")
    server.start()
    try:
        yield Server(server.url, server.api_key, server.api_secret, logs / "livekit-server.log")
    finally:
        server.stop()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def wait_for(
    predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll until predicate() is truthy; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purposes.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


class DaemonProc:
    """An `lkrun serve` subprocess with its own manifest and control socket."""

    def __init__(self, tmp: Path, server: Server, manifest: str, extra_args: list[str]) -> None:
        self.dir = tmp
        self.dir.mkdir(parents=True, exist_ok=True)
        self.server = server
        self.manifest_path = tmp / "agents.toml"
        self.manifest_path.write_text(manifest)
        self.socket = tmp / "control.sock"
        self.log_path = tmp / "daemon.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.server.env)
        env["PYTHONPATH"] = str(REPO)
        env[control.ENV_SOCKET] = str(self.socket)
        env["XDG_STATE_HOME"] = str(self.dir / "state")  # its own job history and logs
        return env

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lkrun",
                    "serve",
                    str(self.manifest_path),
                    "--log-level",
                    "debug",
                    "--log-format",
                    "pretty",
                    "--http-addr",
                    "127.0.0.1:0",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.dir,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def request(self, route: str, params: dict[str, str] | None = None) -> Any:
        return await control.get(self.socket, route, params)

    async def status(self) -> dict[str, Any]:
        return await self.request("/v1/status")

    async def jobs(self, include_ended: bool = True) -> list[dict[str, Any]]:
        data = await self.request("/v1/jobs", {"all": "1" if include_ended else "0"})
        return data["jobs"]

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return next((j for j in await self.jobs() if j["id"] == job_id), None)

    async def wait_registered(self, timeout: float = 30.0) -> dict[str, Any]:
        async def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status = await self.status()
            except control.ControlError:
                return None
            # "ready": serving (agents created) and every registration confirmed.
            return status if status["ready"] else None

        return await wait_for(ready, timeout, what="every agent registered")

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples whose labels include ``labels`` (0 if none)."""
        import aiohttp
        from prometheus_client.parser import text_string_to_metric_families

        port = (await self.status())["http_port"]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            text = await resp.text()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def history(self) -> list[dict[str, Any]]:
        """Every row of the daemon's job history, read from its database (also after the
        daemon has exited)."""
        import sqlite3

        path = self.dir / "state" / "lkrun" / "jobs.db"
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            conn.row_factory = sqlite3.Row
            return [dict(row) for row in conn.execute("SELECT * FROM jobs")]

    async def http(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET a path of the daemon's health endpoint."""
        import aiohttp

        port = (await self.status())["http_port"]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}{path}") as resp,
        ):
            return resp.status, await resp.json()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        proc = self.proc
        await wait_for(lambda: proc.poll() is not None, timeout, what="the daemon to exit")
        return proc.returncode

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=self.env, timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        # Twice: the first starts a drain that would wait for running jobs.
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.proc.wait(0.2)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lkrun", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def _kill_job_processes(daemon_pid: int) -> None:
    """Last line of defence: no job process or fork server of this daemon survives the test."""
    for proc_dir in Path("/proc").iterdir():
        if not proc_dir.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = (proc_dir / "cmdline").read_bytes()
            ours = f"--daemon-pid\0{daemon_pid}\0".encode() in environ
            ours = ours and any(
                module in environ
                for module in (
                    b"lkrun.child.runner",
                    b"lkrun.child.zygote",
                    b"lkrun.child.framework.inference_proc",
                )
            )
            if ours:
                os.kill(int(proc_dir.name), signal.SIGKILL)


@pytest.fixture
async def start_daemon(tmp_path: Path, livekit_server: Server) -> AsyncIterator[Callable[..., Any]]:
    daemons: list[DaemonProc] = []

    async def start(
        manifest: str,
        *extra_args: str,
        wait: bool = True,
        server: Server | None = None,
        files: dict[str, str] | None = None,
    ) -> DaemonProc:
        daemon = DaemonProc(
            tmp_path / f"d{len(daemons)}", server or livekit_server, manifest, [*extra_args]
        )
        for name, text in (files or {}).items():  # e.g. agent modules beside the manifest
            (daemon.dir / name).write_text(text)
        daemons.append(daemon)
        daemon.start()
        if wait:
            await daemon.wait_registered()
        return daemon

    yield start
    for daemon in daemons:
        daemon.stop()
        _kill_job_processes(daemon.pid)


class OwnServer:
    """A livekit-server for one test, to stop and restart on the same ports."""

    def __init__(self, tmp: Path) -> None:
        from lkrun import devserver

        self._server = devserver.DevServer.on_free_ports(
            devserver.ensure_server_binary(), tmp / "own-livekit-server.log"
        )
        self.info = Server(
            self._server.url,
            self._server.api_key,
            self._server.api_secret,
            tmp / "own-livekit-server.log",
        )

    def start(self) -> None:
        self._server.start()

    def stop(self) -> None:
        self._server.stop()


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def room_token(server: Server, room: str, identity: str) -> str:
    return (
        api.AccessToken(server.api_key, server.api_secret)
        .with_identity(identity)
        .with_grants(api.VideoGrants(room_join=True, room=room))
        .to_jwt()
    )


@contextlib.asynccontextmanager
async def observer(server: Server, room_name: str) -> AsyncIterator[rtc.Room]:
    """A plain participant in the room, as a user of the agent would be."""
    room = rtc.Room()
    await room.connect(server.url, room_token(server, room_name, unique("observer")))
    try:
        yield room
    finally:
        await room.disconnect()


async def wait_for_participant(
    room: rtc.Room, prefix: str, timeout: float = 20.0
) -> rtc.RemoteParticipant:
    def find() -> rtc.RemoteParticipant | None:
        return next(
            (p for p in room.remote_participants.values() if p.identity.startswith(prefix)), None
        )

    return await wait_for(find, timeout, what=f"a participant named {prefix}*")


@contextlib.asynccontextmanager
async def livekit_api(server: Server) -> AsyncIterator[api.LiveKitAPI]:
    lkapi = api.LiveKitAPI(
        server.url.replace("ws://", "http://"), server.api_key, server.api_secret, failover=False
    )
    try:
        yield lkapi
    finally:
        await lkapi.aclose()
