"""Import entrypoints in a throwaway process: ``python -m lkrun.child.importcheck REQUEST``.

REQUEST is a JSON object: ``{"entrypoints": [[spec, framework], ...], "callables": [spec]}``.
Writes one JSON object to stdout and exits 0::

    {"entrypoints": [{"error": null | "one-line error", "app": {...} | null}, ...],
     "callables": {"mod:fn": null | "one-line error"},
     "env": {"python": ..., "python_version": ..., "lkrun": version, "lkrun_path": ...,
             "livekit": version | null, "livekit_error": ..., "livekit_agents": version | null}}

``app`` says what an entrypoint is (its app kind's ``info()``, lkrun.child.appkind): its
framework, its kind and, for a livekit-agents app, the settings found on its server object
and the inference runners its code registers (``runners``: [{method, class}]).
The daemon runs this instead of importing user code itself. Keep it light: it must not
import anything that could shadow or slow down the user's modules.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any

from lkrun.child import apps, kinds
from lkrun.child.appkind import AppError
from lkrun.child.importgraph import ImportGraph
from lkrun.shared.text import describe, one_line

_MAX_ERROR = 500


def _describe(exc: BaseException) -> str:
    """One line of at most _MAX_ERROR characters."""
    # An ImportError's own text already says what is missing; other errors need their type.
    if isinstance(exc, ImportError) and str(exc):
        hint = apps.import_error_hint(exc)
        text = f"{exc}: {hint}" if hint else str(exc)
        return one_line(text, _MAX_ERROR)
    if isinstance(exc, FileNotFoundError) and str(exc):
        return one_line(str(exc), _MAX_ERROR)
    return one_line(describe(exc), _MAX_ERROR)


class _Failed(Exception):
    pass


def _target(spec: str) -> Any:
    source, name = apps.split_entrypoint(spec)
    if not source or not name:
        raise _Failed(f"{spec!r} is not of the form 'module:function'")
    what = f"{'file' if apps.is_file_source(source) else 'module'} {source!r}"
    try:
        module = apps.import_source(source)
    except (Exception, SystemExit) as exc:  # user code may call sys.exit() at import
        raise _Failed(f"cannot import {what}: {_describe(exc)}") from exc
    try:
        return getattr(module, name)
    except AttributeError:
        raise _Failed(f"{what} has no attribute {name!r}") from None
    except (Exception, SystemExit) as exc:  # a module-level __getattr__ may raise anything
        raise _Failed(f"cannot get {spec!r}: {_describe(exc)}") from exc


def check(spec: str) -> str | None:
    """Return None if ``spec`` ("module:function") names a callable, else why not."""
    try:
        target = _target(spec)
    except _Failed as exc:
        return str(exc)
    return None if callable(target) else f"{spec!r} is not callable"


def describe_entrypoint(spec: str, framework: str) -> dict[str, Any]:
    """``{"error": ..., "app": ...}`` for one agent's entrypoint."""
    try:
        target = _target(spec)
    except _Failed as exc:
        return {"error": str(exc), "app": None}
    try:
        app = kinds.make_app(spec, target, None, framework, thorough=True)
    except AppError as exc:
        return {"error": one_line(str(exc), _MAX_ERROR), "app": None}
    info = app.info()
    if info.get("framework") == apps.LIVEKIT_AGENTS:
        info["runners"] = _runners(spec)
    return {"error": None, "app": info}


# Every import statement user code runs, from main() on: agents of one env are checked in
# one process, so a plugin two agents import registers its runners during the first only.
_imports = ImportGraph()


def _runners(spec: str) -> list[dict[str, str]]:
    """The inference runners the app's code registers: those whose class comes from a
    module its entrypoint's module imports (lkrun.child.framework.inference)."""
    from lkrun.child.framework.inference import registered_runners

    module = apps.import_source(apps.split_entrypoint(spec)[0])  # imported: from the cache
    return registered_runners(_imports.reach(module.__name__))


def environment() -> dict[str, Any]:
    """The interpreter this check runs under and what it imports of lkrun and LiveKit: the
    daemon refuses another lkrun than its own, and an env without livekit
    (lkrun.entrypoints), and shows the versions in `check` and `status`."""
    import lkrun

    report: dict[str, Any] = {
        "python": sys.executable,
        "python_version": platform.python_version(),
        "lkrun": lkrun.__version__,
        "lkrun_path": os.path.dirname(lkrun.__file__),
        "livekit": None,
        "livekit_error": None,
    }
    try:  # after the entrypoints: usually imported by them already, so free
        from livekit import rtc

        report["livekit"] = rtc.__version__
    except Exception as exc:  # ImportError, or OSError from its native library
        report["livekit_error"] = one_line(exc, _MAX_ERROR)  # no hint: the daemon gives it
    framework = sys.modules.get("livekit.agents")
    version = getattr(framework, "__version__", None)
    if version is None:
        import importlib.metadata

        try:
            version = importlib.metadata.version("livekit-agents")
        except importlib.metadata.PackageNotFoundError:
            version = None
    report["livekit_agents"] = version
    return report


def main(request: str) -> None:
    # User code may print while imported: keep the real stdout for the result only and send
    # everything else (Python-level and fd-level writes) to stderr.
    result_fd = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path.insert(0, os.getcwd())
    wanted = json.loads(request)
    _imports.install()
    results = {
        "entrypoints": [describe_entrypoint(s, f) for s, f in wanted.get("entrypoints", [])],
        "callables": {spec: check(spec) for spec in wanted.get("callables", [])},
        "env": environment(),
    }
    with os.fdopen(result_fd, "w", encoding="utf-8") as out:
        json.dump(results, out)
    sys.stderr.flush()
    # Threads or atexit hooks started by user code must not keep this process alive.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
