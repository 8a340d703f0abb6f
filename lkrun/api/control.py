"""The control API: HTTP over a local Unix socket, read by `lkrun jobs` and `lkrun status`.

Only the daemon's user can open the socket (socket 0600, in a directory of that user that
nobody else may write to), and the CLI trusts only a daemon of its own user (SO_PEERCRED).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypedDict

import aiohttp
from aiohttp import web

from lkrun import memory_map, paths
from lkrun.jobs.fields import STATUSES
from lkrun.jobs.store import JobQuery

ENV_SOCKET = "LKRUN_CONTROL_SOCKET"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ControlError(Exception):
    """The CLI could not talk to the daemon, or the daemon said no."""


class AgentStatus(TypedDict):
    """One registration of one agent, in GET /v1/status."""

    agent: str
    dispatch: str  # explicit | automatic
    registered_name: str  # "" for automatic dispatch
    rooms: list[str]  # patterns of the rooms it takes; empty: any
    retiring: bool  # removed or re-registered: finishing its jobs
    connected: bool
    worker_id: str
    server_version: str
    reconnects: int
    last_error: str
    jobs: int
    max_jobs: int
    full: bool
    full_reason: str  # "", draining, starting, max_jobs or cpu
    load: float
    idle_processes: int
    idle_memory_mb: float
    warm_error: str
    warm_failures: int
    start_method: str
    app: str  # what the import check found, one line
    framework: str
    framework_version: str  # livekit-agents' version, for its apps; "" otherwise
    python: str  # the interpreter that runs its code (manifest ``python``, else the daemon's)
    python_version: str
    livekit_version: str  # of livekit (rtc) in that interpreter
    request_process_ready: bool | None  # None: no request process
    request_process_error: str
    fork_server_pid: int | None
    fork_server_error: str


class InferenceStatus(TypedDict):
    """One shared inference process (lkrun.supervision.inference), in GET /v1/status."""

    interpreter: str
    socket: str  # where its agents' jobs reach it
    pid: int | None  # the serving process, else the one loading; None while neither runs
    ready: bool  # a process serves the socket path
    agents: list[str]
    runners: list[str]  # what it loads: its agents' runners (method names)
    failed_runners: dict[str, str]  # method -> why the serving process could not load it
    uptime: float | None  # seconds the serving process has served
    restarts: int  # times it died or failed to start
    last_error: str
    rss_mb: float
    pss_mb: float
    requests: int
    errors: int
    latency_ms: dict[str, float] | None  # p50, p95, max, mean over the recent requests, samples


class DaemonStatus(TypedDict):
    """GET /v1/status: read by `lkrun status` and by `lkrun dispatch --wait` when no job came."""

    ready: bool
    not_ready_reason: str
    pid: int
    version: str
    name: str  # the daemon's ([daemon] name, else the host name)
    manifest: str
    url: str
    uptime: float
    phase: str  # starting | serving | draining | stopping
    stopping: bool  # draining or stopping
    cpu: float
    cpu_high_for: float  # seconds the CPU has stayed at or over load_threshold
    reload: bool
    reloads: int
    http_port: int | None
    agents: list[AgentStatus]
    # The framework's shared inference processes, one per interpreter that needs one.
    inference: list[InferenceStatus]


class DaemonView(Protocol):
    def status(self) -> DaemonStatus: ...
    async def jobs(self, query: JobQuery | None) -> list[dict[str, Any]]: ...
    async def job(self, job_id: str) -> dict[str, Any] | None: ...
    async def job_chain(self, job_id: str) -> list[dict[str, Any]]: ...
    def job_log_tail(self, job_id: str, lines: int) -> list[str]: ...
    async def job_memory(self, job_id: str) -> dict[str, Any] | None: ...
    def follow_job_log(self, job_id: str, lines: int) -> AsyncIterator[str]: ...
    def kill_job(self, job_id: str, *, force: bool, by: str | None = None) -> str | None: ...
    def drain(self) -> str: ...


def default_socket_path() -> Path:
    if env := os.environ.get(ENV_SOCKET):
        return Path(env)
    return paths.runtime_dir() / "control.sock"


def _prepare_socket_path(path: Path) -> None:
    """Refuse a path another daemon listens on; remove a socket a dead daemon left."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_socket_dir(path.parent)
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(found.st_mode):
        raise ControlError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        # Left behind by a daemon that died; only that file, not one bound since the probe.
        _unlink_if_same(path, _identity(found))
    else:
        raise ControlError(f"another lkrun daemon is already listening on {path}")
    finally:
        probe.close()


def _identity(info: os.stat_result) -> tuple[int, int]:
    return info.st_dev, info.st_ino


def _unlink_if_same(path: Path, identity: tuple[int, int]) -> bool:
    """Remove path only if it is still the file we know (same device and inode)."""
    try:
        if _identity(os.lstat(path)) != identity:
            return False
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _bind_unix(path: Path) -> socket.socket:
    """A listening socket bound at path, born 0600. Bound here rather than by asyncio, which
    removes whatever socket is at the path first: that could be another daemon's, bound
    since our probe."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which others could connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ControlError(f"another lkrun daemon is already listening on {path}") from exc
        raise ControlError(f"cannot bind the control socket {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def check_socket_dir(directory: Path) -> None:
    """ControlError unless ``directory`` is a real directory of ours that nobody else can
    write to (lkrun.paths.unsafe_dir)."""
    try:
        problem = paths.unsafe_dir(directory)
    except OSError as exc:
        raise ControlError(f"cannot use {directory} for the control socket: {exc}") from exc
    if problem:
        raise ControlError(
            f"refusing {directory} for the control socket: {problem}; remove it, or set "
            f"control_socket in [daemon] (or {ENV_SOCKET}) to a directory of your own"
        )


def check_peer(path: Path) -> None:
    """ControlError unless the process listening on ``path`` runs as this user (Linux)."""
    if not hasattr(socket, "SO_PEERCRED"):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return  # nobody listening: the request itself reports it
    finally:
        probe.close()
    pid, uid, _gid = struct.unpack("3i", creds)
    if uid != os.getuid():
        raise ControlError(
            f"refusing the answer on {path}: it comes from pid {pid} of uid {uid}, not from "
            "an lkrun daemon of this user"
        )


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=message)


def parse_query(params: Any) -> JobQuery | None:
    """The /v1/jobs query string; None means "the running jobs"."""
    keys = {"status", "agent", "room", "since", "limit"}
    wants_all = params.get("all", "0") not in ("0", "false", "")  # all=0: the running ones
    if not wants_all and not keys & set(params):
        return None
    statuses = tuple(s for s in params.get("status", "").split(",") if s)
    if unknown := [s for s in statuses if s not in STATUSES]:
        raise _bad_request(f"unknown status {unknown[0]!r}; one of {', '.join(STATUSES)}")
    try:
        since = float(params["since"]) if params.get("since") else None
        limit = int(params.get("limit", 100))
    except ValueError as exc:
        raise _bad_request(f"bad number: {exc}") from exc
    return JobQuery(
        statuses=statuses,
        agent=params.get("agent") or None,
        room=params.get("room") or None,
        since=since,
        limit=limit,
    )


class ControlHandlers:
    """The control API's handlers, over a DaemonView: mounted on the control socket by
    ControlServer, and under /api/v1/ by the web dashboard (lkrun.dashboard), so both show
    the same data. ``by`` names who asks a kill (its stop reason); ``headers`` go on every
    streamed response too (sent before a wrapper could add them). ``max_jobs`` and
    ``max_lines`` (None: no maximum, the control socket's own user asks) cap what one
    answer holds: a job listing's ``limit`` (0, "no limit", too) and a log's ``tail`` or a
    job's ``lines``."""

    def __init__(
        self,
        view: DaemonView,
        *,
        by: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_jobs: int | None = None,
        max_lines: int | None = None,
    ) -> None:
        self.view = view
        self.by = by
        self.headers = dict(headers or {})
        self.max_jobs = max_jobs
        self.max_lines = max_lines

    def add_to(self, app: web.Application, prefix: str = "") -> None:
        """Mount every route under prefix (e.g. "/api")."""
        for method, route, handler in self.routes():
            app.router.add_route(method, prefix + route, handler)

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("GET", "/v1/status", self.status),
            ("GET", "/v1/jobs", self.jobs),
            ("GET", "/v1/jobs/{job_id}", self.job),
            ("GET", "/v1/jobs/{job_id}/logs", self.logs),
            ("GET", "/v1/jobs/{job_id}/memory", self.memory),
            ("POST", "/v1/jobs/{job_id}/kill", self.kill),
            ("POST", "/v1/drain", self.drain),
        ]

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.view.status())

    async def jobs(self, request: web.Request) -> web.Response:
        query = parse_query(request.query)
        cap = self.max_jobs
        if query is not None and cap is not None and not 0 < query.limit <= cap:
            query = dataclasses.replace(query, limit=cap)
        return web.json_response({"jobs": await self.view.jobs(query)})

    async def job(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        job = await self.view.job(job_id)
        if job is None:
            raise web.HTTPNotFound(text=f"no job {job_id}")
        lines = self._lines(_int_param(request, "lines", 20))
        # The recovery chain it belongs to (lkrun.recovery): every attempt at its call.
        chain = await self.view.job_chain(job_id)
        return web.json_response({"job": job, "log": self._tail(job_id, lines), "chain": chain})

    def _lines(self, lines: int) -> int:
        return lines if self.max_lines is None else min(lines, self.max_lines)

    def _tail(self, job_id: str, lines: int) -> list[str]:
        try:
            return self.view.job_log_tail(job_id, lines)
        except ValueError as exc:
            raise _bad_request(str(exc)) from exc

    async def logs(self, request: web.Request) -> web.StreamResponse:
        job_id = request.match_info["job_id"]
        if await self.view.job(job_id) is None:
            raise web.HTTPNotFound(text=f"no job {job_id}")
        lines = self._lines(_int_param(request, "tail", 100))
        if request.query.get("follow") not in ("1", "true"):
            body = "".join(line + "\n" for line in self._tail(job_id, lines))
            return web.Response(text=body)
        response = web.StreamResponse(
            headers={**self.headers, "Content-Type": "text/plain; charset=utf-8"}
        )
        await response.prepare(request)
        async for line in self.view.follow_job_log(job_id, lines):
            await response.write((line + "\n").encode())
        await response.write_eof()
        return response

    async def memory(self, request: web.Request) -> web.Response:
        """Where a running job's memory goes (lkrun.memory_map): its process tree by mapping
        kind, its threads by name. The daemon reads /proc itself, from the pid it started:
        a client never names a pid."""
        job_id = request.match_info["job_id"]
        try:
            data = await self.view.job_memory(job_id)
        except memory_map.TooSlow as exc:
            raise web.HTTPServiceUnavailable(text=f"job {job_id}: {exc}") from exc
        if data is None:
            job = await self.view.job(job_id)
            if job is None:
                raise web.HTTPNotFound(text=f"no job {job_id}")
            raise web.HTTPConflict(
                text=f"job {job_id} has no running process to read (status {job['status']})"
            )
        return web.json_response(data)

    async def kill(self, request: web.Request) -> web.Response:
        job_id = request.match_info["job_id"]
        force = request.query.get("force") in ("1", "true")
        action = self.view.kill_job(job_id, force=force, by=self.by)
        if action is None:
            job = await self.view.job(job_id)
            if job is None:
                raise web.HTTPNotFound(text=f"no job {job_id}")
            raise web.HTTPConflict(text=f"job {job_id} is not running (status {job['status']})")
        return web.json_response({"job_id": job_id, "action": action})

    async def drain(self, request: web.Request) -> web.Response:
        """Drain as the first SIGTERM does: no new jobs, the running ones end, then exit."""
        return web.json_response({"phase": self.view.drain()})


def _int_param(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError as exc:
        raise _bad_request(f"bad number for {name}: {exc}") from exc


class ControlServer:
    def __init__(self, path: Path, view: DaemonView) -> None:
        self.path = path
        self.view = view
        self._runner: web.AppRunner | None = None
        self._bound: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound

    async def start(self) -> None:
        _prepare_socket_path(self.path)
        app = web.Application()
        ControlHandlers(self.view).add_to(app)
        sock = _bind_unix(self.path)
        try:
            self._bound = _identity(os.lstat(self.path))
            self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            await self.stop()
            raise

    async def stop(self) -> None:
        """Close the server; remove the socket file only if this server bound it and it is
        still that file (a daemon refused at start must not remove the running one's)."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        bound, self._bound = self._bound, None
        if bound is not None:
            _unlink_if_same(self.path, bound)


def _unreachable(path: Path) -> ControlError:
    return ControlError(
        f"cannot reach the lkrun daemon at {path}: is `lkrun serve` running? "
        f"(set {ENV_SOCKET} or --control-socket if it uses another socket)"
    )


@contextlib.asynccontextmanager
async def _session(path: Path, timeout: float | None) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:
        yield session


async def _call(path: Path, method: str, route: str, params: dict[str, str] | None = None) -> Any:
    await asyncio.to_thread(check_peer, path)
    try:
        async with (
            _session(path, 10) as session,
            session.request(method, f"http://lkrun{route}", params=params) as resp,
        ):
            if resp.status >= 400:
                raise ControlError((await resp.text()).strip() or f"HTTP {resp.status}")
            return await resp.json()
    except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
        raise _unreachable(path) from exc
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise ControlError(f"the lkrun daemon at {path} did not answer properly: {exc}") from exc


async def get(path: Path, route: str, params: dict[str, str] | None = None) -> Any:
    return await _call(path, "GET", route, params)


async def stream(path: Path, route: str, params: dict[str, str]) -> AsyncIterator[str]:
    """Lines of a streamed response (job logs with follow)."""
    await asyncio.to_thread(check_peer, path)
    try:
        async with (
            _session(path, None) as session,
            session.get(f"http://lkrun{route}", params=params) as resp,
        ):
            if resp.status >= 400:
                raise ControlError((await resp.text()).strip() or f"HTTP {resp.status}")
            async for raw in resp.content:
                yield raw.decode(errors="replace").rstrip("\n")
    except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
        raise _unreachable(path) from exc


def request(
    path: Path, route: str, params: dict[str, str] | None = None, *, method: str = "GET"
) -> Any:
    """Blocking call for the CLI."""
    return asyncio.run(_call(path, method, route, params))
