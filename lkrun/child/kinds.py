"""Which app kind an agent's entrypoint is, and the one function that makes it.

An entrypoint names one of two kinds of app (lkrun.child.appkind says what each offers):

- an lkrun app: ``async def entrypoint(ctx: lkrun.context.JobContext)`` (lkrun.child.native);
- a livekit-agents app: an ``AgentServer``, a ``ServerOptions``/``WorkerOptions``, or
  ``async def entrypoint(ctx: livekit.agents.JobContext)``, run by lkrun.child.framework with
  the framework's own JobContext.

The import check finds out which (``detect``) and the daemon passes the answer to every
job process, so the check and the jobs never disagree; ``make_app`` is the one place that
picks the kind. This module is imported before user code by the runner, the fork server and
the import check: it imports nothing heavy, and livekit.agents only for an app written with
it, so an environment without livekit-agents runs lkrun apps. No app kind imports it.
"""

from __future__ import annotations

import inspect
import sys
import typing
from collections.abc import Callable
from typing import Any

from lkrun.child.appkind import AUTO, LIVEKIT_AGENTS, LKRUN, App, AppError, framework_install_hint
from lkrun.child.native import NativeApp


def detect(target: Any) -> str:
    """Which API ``target`` is written for: LKRUN or LIVEKIT_AGENTS.

    Decided by what the object is, then by the type of a function's first parameter,
    then by what its module imported. A module that never imported livekit.agents is an
    lkrun app. The manifest's ``framework`` field settles the cases this cannot.
    """
    if "livekit.agents" not in sys.modules:
        return LKRUN
    # Imported already, so compat costs nothing more; it knows the names of each version.
    from lkrun.child.framework import compat

    if isinstance(target, compat.app_types()):
        return LIVEKIT_AGENTS
    hint = _first_parameter_type(target)
    if hint is not None:
        if hint is compat.job_context_type():
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


def make_app(
    entrypoint: str,
    target: Any,
    warm: Callable[..., Any] | None,
    framework: str,
    *,
    thorough: bool = False,
) -> App:
    """Wrap what ``entrypoint`` names (``target``) in its app kind, ``framework`` (or the one
    ``detect`` finds for AUTO); AppError, on one line, if it is not something lkrun can run.

    ``thorough`` (the import check): also build a throwaway framework JobContext and name
    the attributes lkrun reads off it that it lacks (not in a fork server or a job process,
    see lkrun.child.framework.job.missing_job_attributes)."""
    if framework == AUTO:
        framework = detect(target)
    if framework == LIVEKIT_AGENTS:
        try:
            # compat first: it names what a framework version lacks, which the shim's own
            # imports would only report as an ImportError of the first missing name.
            from lkrun.child.framework import compat

            compat.check()
            from lkrun.child.framework.app import FrameworkApp

            if thorough:
                from lkrun.child.framework.job import missing_job_attributes

                compat.check(gone=missing_job_attributes())
        except ImportError as exc:
            raise AppError(
                f"{entrypoint!r} is a livekit-agents app, which is not installed ({exc}); "
                + framework_install_hint()
            ) from exc
        return FrameworkApp.from_target(target, warm, spec=entrypoint)
    if not callable(target):
        raise AppError(f"{entrypoint!r} is not callable (type {type(target).__name__})")
    return NativeApp(target, warm)
