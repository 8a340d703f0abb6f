"""A livekit-agents app as lkrun runs it: its functions, and the settings it carries.

What an entrypoint may name:

- an ``AgentServer`` with an ``@server.rtc_session(...)`` (the shape the official docs use);
- a ``ServerOptions`` (``WorkerOptions``), the older shape;
- a bare ``async def entrypoint(ctx: JobContext)``. When an AgentServer of the same module
  registered that function with ``rtc_session``, the server is used, so its
  ``on_request`` and setup function are not lost.

Settings the app gives its server object with a value other than the framework's default
become manifest fields, unless the manifest sets them (lkrun.entrypoints applies them).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from livekit.agents import AgentServer, JobProcess
from livekit.agents.job import JobContext, JobExecutorType
from livekit.agents.worker import ServerEnvOption, ServerOptions, ServerType

from lkrun.child.appkind import LIVEKIT_AGENTS, AppError, Job, Requests, Sender, call
from lkrun.child.framework import compat

# At import, not at the first job: in the fork server, so every job shares it ready.
from lkrun.child.framework.job import FrameworkJob, rehearse_in_fork_server, warm_up_job_path
from lkrun.child.framework.requests import RequestServer
from lkrun.shared.text import describe

log = logging.getLogger("lkrun.child.framework")

# Settings lkrun takes from the app: (framework name, lkrun field, conversion).
_APPLIED: tuple[tuple[str, str, Callable[[Any], Any]], ...] = (
    ("num_idle_processes", "idle_processes", lambda v: int(ServerEnvOption.getvalue(v, False))),
    ("job_memory_limit_mb", "memory_limit_mb", lambda v: math.ceil(v)),
    ("initialize_process_timeout", "prewarm_timeout", float),
    ("shutdown_process_timeout", "shutdown_timeout", float),
)
# Settings that mean something to the official worker only; a non-default value is reported.
_IGNORED = {
    "load_fnc": "lkrun's load policy decides",
    "load_threshold": "set [daemon] load_threshold",
    "job_executor_type": "every lkrun job is a process",
    "drain_timeout": "set [daemon] drain_timeout",
    "host": "set [daemon] http_addr",
    "port": "set [daemon] http_addr",
    "prometheus_port": "lkrun serves /metrics on [daemon] http_addr",
    "job_memory_warn_mb": "only memory_limit_mb is enforced",
    "multiprocessing_context": "set start_method",
    "log_level": "set LKRUN_JOB_LOG_LEVEL in the agent's env",
}


@dataclass
class _Source:
    """An AgentServer or ServerOptions, read field by field against the framework defaults."""

    obj: Any
    prefix: str  # "_" for AgentServer's private attributes
    defaults: Mapping[str, Any]

    def value(self, name: str) -> Any:
        return getattr(self.obj, self.prefix + name, None)

    def changed(self, name: str) -> bool:
        if name not in self.defaults or not hasattr(self.obj, self.prefix + name):
            return False
        default = self.defaults[name]
        if default is None:
            return self.value(name) is not None
        return bool(self.value(name) != default)

    @classmethod
    def of_server(cls, server: AgentServer) -> _Source:
        params = inspect.signature(AgentServer.__init__).parameters
        return cls(server, "_", {n: p.default for n, p in params.items() if n != "self"})

    @classmethod
    def of_options(cls, options: ServerOptions) -> _Source:
        defaults = {}
        for f in dataclasses.fields(options):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                defaults[f.name] = f.default_factory()
        return cls(options, "", defaults)


@dataclass
class FrameworkApp:
    """One livekit-agents app, loaded in a job process, a request process or the check."""

    kind: str  # AgentServer | ServerOptions | function
    entrypoint_fnc: Callable[..., Any]
    setup_fnc: Callable[..., Any] | None = None
    request_fnc: Callable[..., Any] | None = None
    session_end_fnc: Callable[..., Any] | None = None
    session_end_timeout: float = 300.0
    agent_name: str | None = None  # None: a bare function names no agent
    job_type: str | None = None
    preload_modules: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    proc: JobProcess | None = None  # made by prepare(), once per process
    spare: JobContext | None = None  # made by prepare(): the context its job will take

    framework = LIVEKIT_AGENTS

    @classmethod
    def from_target(
        cls, target: Any, prewarm: Callable[..., Any] | None, *, spec: str
    ) -> FrameworkApp:
        """The app ``target`` names; a manifest ``prewarm`` replaces its setup function."""
        compat.check()
        if isinstance(target, AgentServer):
            app = cls._from_server(target, spec)
        elif isinstance(target, ServerOptions):
            app = cls._from_options(target)
        elif callable(target):
            server = _server_of(target)
            app = cls._from_server(server, spec) if server else cls("function", target)
        else:
            raise AppError(
                f"{spec} is a {type(target).__name__}, not an AgentServer, ServerOptions or "
                "entrypoint function"
            )
        if prewarm is not None:
            app.setup_fnc = prewarm
        if warning := compat.untested_warning():
            app.warnings.append(warning)
        return app

    @classmethod
    def _from_server(cls, server: AgentServer, spec: str) -> FrameworkApp:
        entrypoint = compat.server_attribute(server, "_entrypoint_fnc")
        if entrypoint is None:
            raise AppError(
                f"{spec}: the AgentServer has no session entrypoint; register one with "
                "@server.rtc_session()"
            )
        source = _Source.of_server(server)
        name = str(compat.server_attribute(server, "_agent_name") or "")
        server_type = compat.server_attribute(server, "_server_type")
        app = cls(
            "AgentServer",
            entrypoint,
            setup_fnc=compat.server_attribute(server, "_setup_fnc"),
            request_fnc=compat.server_attribute(server, "_request_fnc"),
            session_end_fnc=compat.server_attribute(server, "_session_end_fnc"),
            session_end_timeout=float(source.value("session_end_timeout") or 300.0),
            agent_name=name,
            job_type="publisher" if server_type == ServerType.PUBLISHER else "room",
            preload_modules=compat.preload_modules(server, "_"),
        )
        app._read_settings(source)
        return app

    @classmethod
    def _from_options(cls, options: ServerOptions) -> FrameworkApp:
        source = _Source.of_options(options)
        name = options.agent_name or os.environ.get("LIVEKIT_AGENT_NAME", "")
        app = cls(
            "ServerOptions",
            options.entrypoint_fnc,
            setup_fnc=options.prewarm_fnc if source.changed("prewarm_fnc") else None,
            request_fnc=options.request_fnc if source.changed("request_fnc") else None,
            session_end_timeout=float(options.session_end_timeout),
            agent_name=name,
            job_type="publisher" if options.worker_type == ServerType.PUBLISHER else "room",
            preload_modules=compat.preload_modules(options),
        )
        app._read_settings(source)
        return app

    def _read_settings(self, source: _Source) -> None:
        self.settings["dispatch"] = "explicit" if self.agent_name else "automatic"
        self.settings["job_type"] = self.job_type
        for name, lkrun_name, convert in _APPLIED:
            if source.changed(name):
                self.settings[lkrun_name] = convert(source.value(name))
        if source.changed("permissions"):
            perms = source.value("permissions")
            self.settings["permissions"] = {
                key: bool(getattr(perms, key))
                for key in (
                    "can_publish",
                    "can_subscribe",
                    "can_publish_data",
                    "can_update_metadata",
                    "hidden",
                )
            }
            if getattr(perms, "can_publish_sources", None):
                self.warnings.append("permissions.can_publish_sources is not applied by lkrun")
        ignored = [f"{n} ({why})" for n, why in _IGNORED.items() if source.changed(n)]
        if ignored:
            self.warnings.append("settings lkrun does not use: " + "; ".join(ignored))

    def info(self) -> dict[str, Any]:
        """What the import check reports to the daemon (lkrun.entrypoints.apply_app)."""
        return {
            "framework": LIVEKIT_AGENTS,
            "kind": self.kind,
            "version": compat.VERSION,
            "agent_name": self.agent_name,
            "setup": self.setup_fnc is not None,
            "on_request": self.request_fnc is not None,
            "on_session_end": self.session_end_fnc is not None,
            "settings": self.settings,
            "warnings": self.warnings,
        }

    # -- in the fork server --------------------------------------------------------------

    def preload(self) -> None:
        """Import what the official worker preloads in its forkserver, so jobs share it."""
        from livekit.agents.plugin import Plugin

        packages = [p.package for p in Plugin.registered_plugins] + self.preload_modules
        # The framework's own warm-up last (av, the rtc library, local inference models...):
        # no threads, no event loop, so it is safe before fork.
        warm_up = compat.preload_module()
        for name in [*dict.fromkeys(packages), *([warm_up] if warm_up else [])]:
            try:
                importlib.import_module(name)
            except ImportError as exc:  # as the official forkserver does: skip it, but say so
                print(f"lkrun: cannot preload {name}: {describe(exc)}", file=sys.stderr)
        # The lazy caches every job's path fills (measured with tests/bench/cow.py: 6 MB of
        # PSS per job at 50 on the bench's agents workload).
        rehearse_in_fork_server()

    # -- in a job process -----------------------------------------------------------------

    async def prepare(self) -> None:
        """Once per job process, before READY: the JobProcess and the setup function."""
        proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("HTTP_PROXY") or None
        self.proc = JobProcess(
            executor_type=JobExecutorType.PROCESS, user_arguments=None, http_proxy=proxy
        )
        if warm_up := compat.preload_module():
            importlib.import_module(warm_up)  # no-op after the fork server
        compat.set_default_cert_env()
        if self.setup_fnc is not None:
            await call(self.setup_fnc, self.proc)
        self.spare = warm_up_job_path(self.proc)

    def take_spare(self) -> JobContext | None:
        """The context prepare() built, once: a process runs one job."""
        spare, self.spare = self.spare, None
        return spare

    def new_job(self, start: Mapping[str, Any], logger: logging.Logger) -> Job:
        return FrameworkJob(self, start, logger)

    # -- in the agent's request process ----------------------------------------------------

    def request_server(self, sender: Sender) -> Requests:
        """Answers with ``request_fnc``; each request says so if the app has none (the code
        may have lost its on_request since the check)."""
        return RequestServer(self, sender)


def _server_of(func: Callable[..., Any]) -> AgentServer | None:
    """An AgentServer in ``func``'s module whose rtc_session is ``func``."""
    module = sys.modules.get(getattr(func, "__module__", "") or "")
    for value in vars(module).values() if module is not None else ():
        if isinstance(value, AgentServer) and getattr(value, "_entrypoint_fnc", None) is func:
            return value
    return None
