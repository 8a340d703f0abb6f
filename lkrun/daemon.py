"""The daemon: one AgentHost per manifest agent, the control API, signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from lkrun import __version__
from lkrun.agent_host import AgentHost
from lkrun.control import ControlServer
from lkrun.credentials import Credentials
from lkrun.jobs import JobBook
from lkrun.manifest import Manifest
from lkrun.registration import AuthError

log = logging.getLogger("lkrun.daemon")

FLUSH_TIMEOUT = 2.0  # time given to final job status updates before the sockets close


@dataclass(frozen=True)
class DaemonConfig:
    manifest: Manifest
    credentials: Credentials
    control_socket: Path
    shutdown_timeout: float = 10.0


class FatalError(Exception):
    """The daemon cannot go on (bad credentials, control socket taken, ...)."""


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.book = JobBook()
        self.hosts: dict[str, AgentHost] = {}
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._signals = 0

    # -- the view the control API reads --------------------------------------------------

    def status(self) -> dict[str, Any]:
        agents = []
        for name, host in self.hosts.items():
            state = host.registration.state
            load = host.worker_load()
            agents.append(
                {
                    "agent": name,
                    "dispatch": host.spec.dispatch,
                    "registered_name": host.spec.registered_name,
                    "connected": state.connected,
                    "worker_id": state.worker_id,
                    "server_version": state.server_version,
                    "reconnects": state.reconnects,
                    "last_error": state.last_error,
                    "jobs": load.job_count,
                    "max_jobs": host.spec.max_jobs,
                    "full": load.full,
                    "load": load.load,
                }
            )
        return {
            "pid": os.getpid(),
            "version": __version__,
            "manifest": str(self.config.manifest.path),
            "url": self.config.credentials.url,
            "uptime": round(time.time() - self.started_at, 3),
            "stopping": self._stop.is_set(),
            "agents": agents,
        }

    def jobs(self, *, include_ended: bool) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.book if include_ended or not r.status.ended]

    # -- running ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        """Run until a stop is requested. Raises FatalError when the daemon cannot go on."""
        self._install_signal_handlers()
        control = ControlServer(self.config.control_socket, self)
        async with aiohttp.ClientSession() as session:
            self.hosts = {
                name: AgentHost(
                    spec=spec,
                    workdir=self.config.manifest.workdir,
                    credentials=self.config.credentials,
                    book=self.book,
                    session=session,
                    shutdown_timeout=self.config.shutdown_timeout,
                )
                for name, spec in self.config.manifest.agents.items()
            }
            await control.start()
            log.info(
                "lkrun %s serving %d agent(s) from %s; control socket %s",
                __version__,
                len(self.hosts),
                self.config.manifest.path,
                self.config.control_socket,
            )
            runs = [asyncio.create_task(h.run(), name=f"agent {n}") for n, h in self.hosts.items()]
            try:
                await self._until_stop_or_fatal(runs)
            finally:
                await self._shutdown(runs)
                await control.stop()

    async def _until_stop_or_fatal(self, runs: list[asyncio.Task[None]]) -> None:
        stop = asyncio.create_task(self._stop.wait())
        try:
            done, _ = await asyncio.wait([*runs, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        for task in done:
            if task is not stop and (exc := task.exception()) is not None:
                if isinstance(exc, AuthError):
                    raise FatalError(str(exc)) from exc
                raise FatalError(f"{task.get_name()} stopped: {exc!r}") from exc

    async def _shutdown(self, runs: list[asyncio.Task[None]]) -> None:
        log.info("shutting down: stopping %d job(s)", len(self.book.active()))
        for host in self.hosts.values():
            host.stop_accepting()
        await asyncio.gather(*(h.stop_jobs("daemon shutting down") for h in self.hosts.values()))
        await self._flush_registrations()
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    async def _flush_registrations(self) -> None:
        await asyncio.gather(*(h.registration.flush(FLUSH_TIMEOUT) for h in self.hosts.values()))

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("received %s: shutting down (again to force)", sig.name)
            self._stop.set()
        else:
            log.warning("received %s again: killing jobs now", sig.name)
            for host in self.hosts.values():
                host.kill_jobs("daemon received a second stop signal")
