"""The control API: HTTP over a local Unix socket, read by `lkrun jobs` and `lkrun status`.

Only the daemon's user can open the socket (directory 0700, socket 0600).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

ENV_SOCKET = "LKRUN_CONTROL_SOCKET"


class ControlError(Exception):
    """The CLI could not talk to the daemon."""


class DaemonView(Protocol):
    def status(self) -> dict[str, Any]: ...
    def jobs(self, *, include_ended: bool) -> list[dict[str, Any]]: ...


def default_socket_path() -> Path:
    if env := os.environ.get(ENV_SOCKET):
        return Path(env)
    if runtime := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(runtime) / "lkrun" / "control.sock"
    return Path(tempfile.gettempdir()) / f"lkrun-{os.getuid()}" / "control.sock"


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        return
    if not stat.S_ISSOCK(path.stat().st_mode):
        raise ControlError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left behind by a daemon that died
    else:
        raise ControlError(f"another lkrun daemon is already listening on {path}")
    finally:
        probe.close()


class ControlServer:
    def __init__(self, path: Path, view: DaemonView) -> None:
        self.path = path
        self.view = view
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        _prepare_socket_path(self.path)
        app = web.Application()
        app.router.add_get("/v1/status", self._status)
        app.router.add_get("/v1/jobs", self._jobs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            await web.UnixSite(self._runner, str(self.path)).start()
        finally:
            os.umask(old_umask)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(self.view.status())

    async def _jobs(self, request: web.Request) -> web.Response:
        include_ended = request.query.get("all", "") in ("1", "true")
        return web.json_response({"jobs": self.view.jobs(include_ended=include_ended)})


async def _get(path: Path, route: str, params: dict[str, str] | None = None) -> Any:
    connector = aiohttp.UnixConnector(path=str(path))
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get(f"http://lkrun{route}", params=params) as resp,
        ):
            resp.raise_for_status()
            return await resp.json()
    except (aiohttp.ClientConnectionError, FileNotFoundError) as exc:
        raise ControlError(
            f"cannot reach the lkrun daemon at {path}: is `lkrun serve` running? "
            f"(set {ENV_SOCKET} or --control-socket if it uses another socket)"
        ) from exc
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise ControlError(f"the lkrun daemon at {path} did not answer properly: {exc}") from exc


def request(path: Path, route: str, params: dict[str, str] | None = None) -> Any:
    """Blocking call for the CLI."""
    return asyncio.run(_get(path, route, params))
