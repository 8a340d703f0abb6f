"""Everything lkrun relies on of livekit-agents, for each version it hosts.

lkrun builds the framework's JobContext the way the official job process does
(``livekit/agents/ipc/job_proc_lazy_main.py``), which takes names the framework does not
document. This module is the one place that knows them:

- ``NEEDED``: every name of livekit.agents the shim (app, job, requests, inference) uses,
  public or private. The import check fails, naming those that are gone, before the shim
  imports them (``check``), so a framework version that lacks one fails ``lkrun check`` in
  one line instead of with an ImportError somewhere in a job.
- the functions below ``NEEDED``: what differs between the versions lkrun hosts, each
  behind one small function that tests for the feature, not for the version number.
- ``TESTED``: the versions the test suite runs real AgentSession apps on
  (tests/test_framework_versions.py). Any other series gets a warning from ``lkrun check``,
  not a failure.

What changed between the versions lkrun hosts (read from their sources):

- 1.3.0: ``AgentServer`` with ``@server.rtc_session`` (before it, 1.2.x and older have only
  ``WorkerOptions`` and no ``JobContext._on_setup``: ``check`` fails on them).
- 1.6.0: ``utils.http_context._set_default_cert_env`` (``set_default_cert_env``).
- 1.8.2: ``JobContext._on_cleanup`` became a coroutine (``cleanup_job``); the framework's
  warm-up module ``ipc._preload`` (``preload_module``); ``RunningJobInfo``'s dispatch
  timeline fields (``running_job_info_fields``).
- 1.8.7: ``AgentServer(preload_modules=...)`` and ``ServerOptions.preload_modules``
  (``preload_modules``).

This module imports only ``livekit.agents.version`` at load time (every version has it),
so it can name what is missing from a version the rest of the shim cannot even import.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from livekit.agents import version as _version

from lkrun.child.appkind import AppError

VERSION: str = _version.__version__

# The versions tests/test_framework_versions.py serves real AgentSession apps on, each in its
# own virtualenv, under one daemon. A version of another series gets a check warning.
TESTED = ("1.7.1", "1.8.9")


@dataclass(frozen=True)
class Need:
    """One name the shim uses: ``module`` imported, then ``path`` read attribute by
    attribute (empty: the module itself)."""

    module: str
    path: str = ""

    def __str__(self) -> str:
        return f"{self.module}.{self.path}" if self.path else self.module


# What the shim takes from livekit.agents, in every version it hosts. A name that only
# some versions have is not here: it is behind one of the functions further down.
# (Instance attributes of a JobContext or an AgentServer cannot be read off the class; they
# are listed in INSTANCE_ATTRIBUTES. The import check builds a throwaway JobContext and
# names those it lacks (job.missing_job_attributes); an AgentServer's are read through
# server_attribute, which names the one that is gone.)
NEEDED: tuple[Need, ...] = (
    # app.py: what an entrypoint may name, and the settings read off it
    Need("livekit.agents", "AgentServer"),
    Need("livekit.agents", "JobProcess"),
    Need("livekit.agents.job", "JobExecutorType"),
    Need("livekit.agents.worker", "ServerEnvOption"),
    Need("livekit.agents.worker", "ServerOptions"),
    Need("livekit.agents.worker", "ServerType"),
    Need("livekit.agents.plugin", "Plugin.registered_plugins"),
    # job.py: one job, as job_proc_lazy_main.py runs it
    Need("livekit.agents.job", "JobContext"),
    Need("livekit.agents.job", "JobContext._on_setup"),
    Need("livekit.agents.job", "JobContext._on_cleanup"),
    Need("livekit.agents.job", "JobContext._on_session_end"),
    Need("livekit.agents.job", "JobProcess"),
    Need("livekit.agents.job", "RunningJobInfo"),
    Need("livekit.agents.job", "JobAcceptArguments"),
    Need("livekit.agents.job", "_JobContextVar"),
    Need("livekit.agents.utils", "http_context"),
    Need("livekit.agents.utils.http_context", "_new_session_ctx"),
    Need("livekit.agents.utils.http_context", "_close_http_ctx"),
    Need("livekit.agents.ipc.inference_executor", "InferenceExecutor"),
    # job.py: the fork server's rehearsal of a job's path (rehearse_in_fork_server)
    Need("livekit.agents", "Agent"),
    Need("livekit.agents", "AgentSession"),
    Need("livekit.agents", "llm"),
    # requests.py: the app's on_request
    Need("livekit.agents", "JobRequest"),
    # inference.py, inference_proc.py: the shared inference process
    Need("livekit.agents.inference_runner", "_InferenceRunner"),
    Need("livekit.agents.inference_runner", "_InferenceRunner.registered_runners"),
)

# Read on instances (they are set in __init__), by the shim files named.
INSTANCE_ATTRIBUTES: Mapping[str, tuple[str, ...]] = {
    "JobContext": (
        "_primary_agent_session",
        "_shutdown_callbacks",
        "_pending_tasks",
        "_tempdir",
        # The context built before the job comes is given the job's info and callbacks.
        "_info",
        "_on_connect",
        "_on_shutdown",
    ),
    "AgentServer": (
        "_entrypoint_fnc",
        "_agent_name",
        "_server_type",
        "_setup_fnc",
        "_request_fnc",
        "_session_end_fnc",
    ),
}


def missing(
    needs: tuple[Need, ...] | None = None,
    import_module: Callable[[str], ModuleType] = importlib.import_module,
) -> list[str]:
    """The names of ``needs`` (default ``NEEDED``) this livekit-agents lacks."""
    return [
        str(need) for need in (NEEDED if needs is None else needs) if not _has(need, import_module)
    ]


_MISSING = object()


def _get(need: Need, import_module: Callable[[str], ModuleType] = importlib.import_module) -> Any:
    """What ``need`` names in this livekit-agents, _MISSING if it lacks it."""
    try:
        value: Any = import_module(need.module)
        for part in filter(None, need.path.split(".")):
            value = getattr(value, part)
    except (ImportError, AttributeError):
        return _MISSING
    return value


def _has(need: Need, import_module: Callable[[str], ModuleType]) -> bool:
    return _get(need, import_module) is not _MISSING


# What an entrypoint may name as a whole app (WorkerOptions is ServerOptions' older name),
# and the type of a bare entrypoint's parameter: lkrun.child.kinds.detect tells the app kind
# by them.
APP_TYPES = (Need("livekit.agents", "AgentServer"), Need("livekit.agents.worker", "ServerOptions"))
JOB_CONTEXT = Need("livekit.agents.job", "JobContext")


def app_types() -> tuple[type, ...]:
    """The classes of a whole framework app, those this version has (check() names the
    others)."""
    return tuple(value for need in APP_TYPES if (value := _get(need)) is not _MISSING)


def job_context_type() -> type | None:
    """The framework's JobContext, None if this version lacks it (check() says so)."""
    value = _get(JOB_CONTEXT)
    return None if value is _MISSING else value


def missing_attributes(obj: Any) -> list[str]:
    """The INSTANCE_ATTRIBUTES of ``obj``'s class that ``obj`` lacks, named for check()."""
    cls = type(obj)
    wanted = INSTANCE_ATTRIBUTES.get(cls.__name__, ())
    return [f"{cls.__module__}.{cls.__name__}.{name}" for name in wanted if not hasattr(obj, name)]


def series(version: str) -> str:
    """``"1.8"`` for ``"1.8.9"`` (also ``"1.9.0rc1"`` -> ``"1.9"``); the version itself if it
    does not start with two numbers."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return f"{match[1]}.{match[2]}" if match else version


def tested_series() -> list[str]:
    return list(dict.fromkeys(series(v) for v in TESTED))


def _supported() -> str:
    return "lkrun is tested with livekit-agents " + ", ".join(TESTED)


def check(version: str | None = None, gone: list[str] | None = None) -> None:
    """AppError unless this livekit-agents has every name lkrun needs; one line naming the
    version (default: VERSION, read when called), the interpreter (an agent may have its
    own) and what is missing."""
    version = VERSION if version is None else version
    gone = missing() if gone is None else gone
    if gone:
        raise AppError(
            f"livekit-agents {version} (under {sys.executable}) lacks {len(gone)} of the "
            f"names lkrun needs to host its apps ({_supported()}): {_names(gone)}"
        )


def _names(names: list[str], budget: int = 240) -> str:
    """As many of ``names`` as fit in ``budget`` characters, then how many more: the import
    check's line is bounded, and the first few say enough about a version that lost them."""
    shown: list[str] = []
    for i, name in enumerate(names):
        if shown and len(", ".join([*shown, name])) > budget:
            return ", ".join(shown) + f" and {len(names) - i} more"
        shown.append(name)
    return ", ".join(shown)


def untested_warning(version: str | None = None) -> str | None:
    """A warning for a version (default: VERSION, read when called) outside the tested
    series (it has every needed name)."""
    version = VERSION if version is None else version
    if series(version) in tested_series():
        return None
    return (
        f"livekit-agents {version} is not a version lkrun was tested with "
        f"({', '.join(s + '.x' for s in tested_series())}); it has every name lkrun needs, "
        "but run your app's tests under lkrun before relying on it"
    )


def server_attribute(server: Any, name: str) -> Any:
    """A private attribute of an AgentServer; AppError naming the version if it is gone."""
    try:
        return getattr(server, name)
    except AttributeError:
        raise AppError(
            f"livekit-agents {VERSION}: AgentServer has no {name}; {_supported()}"
        ) from None


# -- what differs between versions -----------------------------------------------------------


def running_job_info_fields() -> set[str]:
    """The fields this version's RunningJobInfo takes (1.8.2 added the dispatch timeline:
    received_at, accepted_at, assigned_at, launched_at)."""
    import dataclasses

    from livekit.agents.job import RunningJobInfo

    return {f.name for f in dataclasses.fields(RunningJobInfo)}


def preload_modules(source: Any, prefix: str = "") -> list[str]:
    """The app's ``preload_modules`` (an AgentServer's ``_preload_modules``, a ServerOptions'
    ``preload_modules``): since 1.8.7; none before."""
    return list(getattr(source, prefix + "preload_modules", None) or [])


def preload_module() -> str | None:
    """The framework's own warm-up module, which the official forkserver and job process
    import (av, the rtc library, local inference models): since 1.8.2; None before."""
    name = "livekit.agents.ipc._preload"
    try:
        found = importlib.util.find_spec(name)
    except ImportError:
        return None
    return name if found is not None else None


def set_default_cert_env() -> None:
    """What the official job process does before the setup function: point SSL_CERT_FILE at
    certifi's bundle unless set (since 1.6.0; older versions do nothing of the kind)."""
    from livekit.agents.utils import http_context

    if (step := getattr(http_context, "_set_default_cert_env", None)) is not None:
        step()


async def cleanup_job(ctx: Any) -> None:
    """``JobContext._on_cleanup``: a coroutine since 1.8.2, a plain function before."""
    result = ctx._on_cleanup()
    if inspect.isawaitable(result):
        await result
