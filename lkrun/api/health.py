"""HTTP endpoints for orchestrators: liveness, readiness, and whatever the daemon mounts."""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Readiness = Callable[[], tuple[bool, str]]


class HealthError(Exception):
    """The health endpoint could not be served."""


class HealthServer:
    def __init__(self, host: str, port: int, *, ready: Readiness) -> None:
        self.host = host
        self._requested_port = port
        self._ready = ready
        self._app = web.Application()
        # add_get also answers HEAD.
        self._app.router.add_get("/healthz", self._healthz)
        self._app.router.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    def add_route(self, path: str, handler: Handler, method: str = "GET") -> None:
        """Mount a route (GET also answers HEAD); the router freezes at start()."""
        if self._runner is not None:
            raise RuntimeError("add_route() must be called before start()")
        if method == "GET":
            self._app.router.add_get(path, handler)
        else:
            self._app.router.add_route(method, path, handler)

    @property
    def port(self) -> int:
        """The bound port once started; the requested one before."""
        return self._requested_port if self._port is None else self._port

    async def start(self) -> None:
        # A dashboard following a job's log holds a request open: the stop waits for it
        # only briefly (aiohttp's default is 60 s).
        runner = web.AppRunner(self._app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            where = f"{self.host}:{self._requested_port}"
            raise HealthError(f"cannot listen on {where}: {_os_reason(exc)}") from exc
        self._runner = runner
        self._port = _bound_port(runner, self._requested_port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        # Answering at all is the proof: the event loop is serving.
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, reason = self._ready()
        if ready:
            return web.json_response({"ready": True})
        return web.json_response({"ready": False, "reason": reason}, status=503)


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    """The port the OS chose when asked for port 0."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested


def _os_reason(exc: OSError) -> str:
    # asyncio wraps bind errors in a long "error while attempting to bind on ..." text.
    if exc.errno is not None and not isinstance(exc, socket.gaierror):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)
