"""What the runner and the fork server ask of an app, whatever API it is written for.

An app kind is one way of writing an agent: an lkrun function (lkrun.child.native) or a
livekit-agents app (lkrun.child.framework.app). ``lkrun.child.kinds.make_app`` picks the
kind for an entrypoint; after that the runner, the fork server and the import check only
call the operations of ``App`` below, so none of them imports a kind's module. The kinds
import this module and lkrun.child.apps (loading user code), never the one that picks them,
which keeps the imports one way:

    runner, zygote, importcheck -> kinds -> native, framework (lazily) -> apps, appkind

This module imports only the standard library and lkrun.shared.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lkrun.shared import DAEMON_PYTHON_ENV

# The kinds' names, which the daemon uses too (defined in lkrun.shared.entrypoint).
from lkrun.shared.entrypoint import AUTO as AUTO
from lkrun.shared.entrypoint import FRAMEWORKS as FRAMEWORKS
from lkrun.shared.entrypoint import LIVEKIT_AGENTS as LIVEKIT_AGENTS
from lkrun.shared.entrypoint import LKRUN as LKRUN
from lkrun.shared.jobpipe import RoomGone

INSTALL_HINT = "install it with: pip install 'lkrun[agents]'"  # in the daemon's env

SHUTDOWN_CALLBACK_TIMEOUT = 10.0


class AppError(Exception):
    """The entrypoint cannot be run as the agent asks; the text says why, on one line."""


@dataclass(frozen=True)
class JobResult:
    ok: bool
    error: str = ""  # why it failed, one line
    reason: str = ""  # why it ended
    room_gone: RoomGone | None = None  # the room was deleted: the daemon may delete the new one
    cause: str = ""  # why it ended, when the job knows better than its reason says: room_empty


class Job(Protocol):
    """One job inside a job process, whichever API its entrypoint was written for."""

    def shutdown(self, reason: str) -> None: ...

    def drain(self) -> None: ...

    async def run(self, grace: Callable[[], float]) -> JobResult:
        """Run the entrypoint until the job ends; ``grace()`` bounds the cleanup."""
        ...


class Sender(Protocol):
    """Where a process's messages to the daemon go (lkrun.child.runner.Pipe)."""

    def send(self, kind: str, **fields: Any) -> None: ...


class Requests(Protocol):
    """The agent's request process: answers the daemon's ``request`` messages."""

    def handle(self, msg: Mapping[str, Any]) -> None:
        """Start answering one request; the answer goes out on the Sender."""
        ...

    async def close(self, grace: float) -> None:
        """Finish the requests in hand, then stop."""
        ...


class App(Protocol):
    """One agent's app, loaded in a job process, a fork server, a request process or the
    import check."""

    framework: str  # LKRUN | LIVEKIT_AGENTS

    def info(self) -> dict[str, Any]:
        """What the import check reports to the daemon (lkrun.entrypoints.apply_app)."""
        ...

    def preload(self) -> None:
        """In the fork server, before any fork: what every job of the app shares."""
        ...

    async def prepare(self) -> None:
        """Once per process, before it reports READY (the prewarm or setup function)."""
        ...

    def new_job(self, start: Mapping[str, Any], logger: logging.Logger) -> Job:
        """The job the daemon's ``start`` message describes."""
        ...

    def request_server(self, sender: Sender) -> Requests:
        """The agent's request function as a request process; AppError if it has none."""
        ...


def _own_python() -> bool:
    """Whether this process runs under an interpreter other than the daemon's (an agent's
    ``python``)."""
    daemons = os.environ.get(DAEMON_PYTHON_ENV)
    return bool(daemons) and daemons != sys.executable


def pip_install(requirement: str) -> str:
    """The command that installs ``requirement`` where this process's code runs: pip, in the
    daemon's env; this interpreter's own pip under an agent's own Python."""
    if _own_python():
        return f"{sys.executable} -m pip install {requirement}"
    return f"pip install {requirement}"


def framework_install_hint() -> str:
    """What to install for a livekit-agents app: lkrun's extra in the daemon's env, the
    framework itself in an agent's own env (which needs no lkrun)."""
    if _own_python():
        return f"install it with: {pip_install('livekit-agents')}"
    return INSTALL_HINT


async def call(func: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async function."""
    result = func(*args)
    if inspect.isawaitable(result):
        result = await typing.cast(Awaitable[Any], result)
    return result
