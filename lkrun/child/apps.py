"""What an agent's entrypoint names, and how a job process runs it (the child side).

An entrypoint names one of two kinds of app:

- an lkrun app: ``async def entrypoint(ctx: lkrun.context.JobContext)``;
- a livekit-agents app: an ``AgentServer``, a ``ServerOptions``/``WorkerOptions``, or
  ``async def entrypoint(ctx: livekit.agents.JobContext)``, run by lkrun.child.framework with
  the framework's own JobContext.

The import check finds out which (``detect``) and the daemon passes the answer to every
job process, so the check and the jobs never disagree. This module is imported before
user code by the runner, the fork server and the import check: it imports nothing heavy,
and livekit.agents only for an app written with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from lkrun.shared.jobpipe import RoomGone
from lkrun.shared.text import describe

LKRUN = "lkrun"
LIVEKIT_AGENTS = "livekit-agents"
AUTO = "auto"
FRAMEWORKS = (LKRUN, LIVEKIT_AGENTS)

INSTALL_HINT = "install it with: pip install 'lkrun[agents]'"

SHUTDOWN_CALLBACK_TIMEOUT = 10.0


class AppError(Exception):
    """The entrypoint cannot be run as the agent asks; the text says why, on one line."""


@dataclass(frozen=True)
class JobResult:
    ok: bool
    error: str = ""  # why it failed, one line
    reason: str = ""  # why it ended
    room_gone: RoomGone | None = None  # the room was deleted: the daemon may delete the new one


class Job(Protocol):
    """One job inside a job process, whichever API its entrypoint was written for."""

    def shutdown(self, reason: str) -> None: ...

    def drain(self) -> None: ...

    async def run(self, grace: Callable[[], float]) -> JobResult:
        """Run the entrypoint until the job ends; ``grace()`` bounds the cleanup."""
        ...


class App(Protocol):
    framework: str

    async def prepare(self) -> None:
        """Once per process, before it reports READY (the prewarm or setup function)."""
        ...

    def new_job(self, start: Mapping[str, Any], logger: logging.Logger) -> Job: ...


def load_target(spec: str) -> Any:
    """Import ``module:attribute`` or ``path/to/file.py:attribute`` and return the
    attribute, whatever it is."""
    source, name = split_entrypoint(spec)
    return getattr(import_source(source), name)


# Modules loaded from a file are registered under this prefix and the file's stem: not
# "__main__", so that the file's ``if __name__ == "__main__":`` block (the official CLI's
# ``cli.run_app(server)``) stays out, and not the bare stem, which may shadow a package.
FILE_MODULE_PREFIX = "__lkrun_entry__"
_file_modules: dict[Path, str] = {}  # resolved path -> its name in sys.modules


def split_entrypoint(spec: str) -> tuple[str, str]:
    """``(module or file, attribute)`` of an entrypoint; a file's path may contain ':'."""
    source, _, name = spec.rpartition(":")
    return source, name


def is_file_source(source: str) -> bool:
    """Whether an entrypoint's module part names a file rather than a module."""
    return source.endswith(".py") or "/" in source


def import_source(source: str) -> ModuleType:
    """The module an entrypoint's ``source`` names: a dotted module, or a ``.py`` file."""
    if is_file_source(source):
        return import_file(Path(source))
    return importlib.import_module(source)


def import_file(path: Path) -> ModuleType:
    """Import a script the way ``python file.py start`` runs it: its directory first on
    sys.path, so the modules beside it import; once per file and process."""
    path = path.resolve()
    known = _file_modules.get(path)
    if known is not None and known in sys.modules:
        return sys.modules[known]
    if not path.is_file():
        raise FileNotFoundError("no such file")
    directory = str(path.parent)
    if not sys.path or sys.path[0] != directory:
        sys.path.insert(0, directory)
    name = _file_module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {str(path)!r} as a Python module", path=str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs, as import does: dataclasses look it up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _file_modules[path] = name
    return module


def _file_module_name(path: Path) -> str:
    base = FILE_MODULE_PREFIX + re.sub(r"\W", "_", path.stem)
    name, n = base, 1
    while name in sys.modules:  # another file with the same stem
        n += 1
        name = f"{base}_{n}"
    return name


def import_error_hint(exc: ImportError) -> str:
    """What to install when ``exc`` says livekit-agents or one of its plugins is missing."""
    missing = getattr(exc, "name", None) or ""
    if not (missing == "livekit" or missing.startswith(("livekit.agents", "livekit.plugins"))):
        return ""
    if not _importable("livekit.agents"):
        # "from livekit import agents" says only "cannot import name 'agents' from 'livekit'".
        return f"the module is a livekit-agents app; {INSTALL_HINT}"
    parts = missing.split(".")
    if parts[:2] != ["livekit", "plugins"]:
        return ""
    # "from livekit.plugins import x" names only livekit.plugins (and x in name_from, 3.12+).
    plugin = parts[2] if len(parts) > 2 else getattr(exc, "name_from", None)
    package = "livekit-plugins-" + (plugin.replace("_", "-") if plugin else "<name>")
    return f"a livekit-agents plugin is missing; install it with: pip install {package}"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent that does not import, or an import hook refusing it
        return False


def detect(target: Any) -> str:
    """Which API ``target`` is written for: LKRUN or LIVEKIT_AGENTS.

    Decided by what the object is, then by the type of a function's first parameter,
    then by what its module imported. A module that never imported livekit.agents is an
    lkrun app. The manifest's ``framework`` field settles the cases this cannot.
    """
    agents = sys.modules.get("livekit.agents")
    if agents is None:
        return LKRUN
    if isinstance(target, (agents.AgentServer, agents.WorkerOptions)):
        return LIVEKIT_AGENTS
    hint = _first_parameter_type(target)
    if hint is not None:
        if hint is agents.JobContext:
            return LIVEKIT_AGENTS
        native = sys.modules.get("lkrun.context")
        if native is not None and hint is native.JobContext:
            return LKRUN
    module = sys.modules.get(getattr(target, "__module__", "") or "")
    names = vars(module).values() if module is not None else ()
    uses_agents = any(_from_package(value, "livekit.agents") for value in names)
    uses_lkrun = any(_from_package(value, "lkrun") for value in names)
    return LIVEKIT_AGENTS if uses_agents and not uses_lkrun else LKRUN


def _first_parameter_type(func: Any) -> Any:
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return None
    if not params:
        return None
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # an annotation that does not resolve: decide by other means
        return None
    return hints.get(params[0].name)


def _from_package(value: Any, package: str) -> bool:
    name = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
    return isinstance(name, str) and (name == package or name.startswith(package + "."))


def make_app(entrypoint: str, target: Any, warm: Callable[..., Any] | None, framework: str) -> App:
    """Wrap what ``entrypoint`` names (``target``) for the job process; AppError if it is
    not something lkrun can run."""
    if framework == AUTO:
        framework = detect(target)
    if framework == LIVEKIT_AGENTS:
        try:
            from lkrun.child.framework.app import FrameworkApp
        except ImportError as exc:
            raise AppError(f"{entrypoint} needs livekit-agents ({exc}); {INSTALL_HINT}") from exc
        return FrameworkApp.from_target(target, warm, spec=entrypoint)
    if not callable(target):
        raise AppError(f"{entrypoint} is not callable")
    return NativeApp(target, warm)


# --- lkrun's own apps ---------------------------------------------------------------------


class NativeApp:
    """An entrypoint written for lkrun.context.JobContext."""

    framework = LKRUN

    def __init__(self, entrypoint: Callable[..., Any], prewarm: Callable[..., Any] | None) -> None:
        self.entrypoint = entrypoint
        self.prewarm = prewarm
        self.userdata: Any = None

    async def prepare(self) -> None:
        import lkrun.context  # noqa: F401  the job's context, before READY

        if self.prewarm is not None:
            self.userdata = await call(self.prewarm)

    def new_job(self, start: Mapping[str, Any], logger: logging.Logger) -> Job:
        from lkrun.context import JobContext, JobInfo

        ctx = JobContext(
            job=JobInfo.from_dict(start["job"]),
            url=start["url"],
            token=start["token"],
            identity=start["identity"],
            logger=logger,
            userdata=self.userdata,
        )
        return NativeJob(self.entrypoint, ctx, logger)


class NativeJob:
    def __init__(self, entrypoint: Callable[..., Any], ctx: Any, logger: logging.Logger) -> None:
        self.entrypoint = entrypoint
        self.ctx = ctx
        self.log = logger

    def shutdown(self, reason: str) -> None:
        self.ctx.shutdown(reason)

    def drain(self) -> None:
        self.ctx._start_drain()

    async def run(self, grace: Callable[[], float]) -> JobResult:
        ctx = self.ctx
        entry = asyncio.ensure_future(call(self.entrypoint, ctx))
        stop = asyncio.ensure_future(ctx.wait_for_shutdown())
        await asyncio.wait({entry, stop}, return_when=asyncio.FIRST_COMPLETED)
        error = ""
        if entry.done():
            if (exc := entry.exception()) is not None:
                self.log.error("entrypoint failed", exc_info=exc)
                error = describe(exc)
                ctx.shutdown(f"entrypoint failed: {error}")
            elif not ctx.room.isconnected():
                ctx.shutdown("entrypoint returned")
            await stop  # returns at once unless the room is still connected
        await ctx._run_shutdown_callbacks(grace())
        await ctx._close_tasks(grace())
        if not entry.done():
            entry.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await entry
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ctx.room.disconnect(), grace())
        error = ctx._failure or error  # e.g. the room was gone (lkrun.context.RoomGoneError)
        reason, gone = ctx.shutdown_reason, ctx._room_gone
        return JobResult(ok=not error, error=error, reason=reason, room_gone=gone)


async def call(func: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async function."""
    result = func(*args)
    if inspect.isawaitable(result):
        result = await typing.cast(Awaitable[Any], result)
    return result
