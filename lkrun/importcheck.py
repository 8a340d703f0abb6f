"""Import entrypoints in a throwaway process: ``python -m lkrun.importcheck mod:fn [mod:fn ...]``.

Writes one JSON object to stdout, ``{"mod:fn": null | "one-line error", ...}``, and exits 0.
The daemon runs this instead of importing user code itself. Keep it tiny: it must not import
anything that could shadow or slow down the user's modules.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

_MAX_ERROR = 500


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_ERROR else flat[: _MAX_ERROR - 3] + "..."


def _describe(exc: BaseException) -> str:
    # An ImportError's own text already says what is missing; other errors need their type.
    if isinstance(exc, ImportError) and str(exc):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check(spec: str) -> str | None:
    """Return None if ``spec`` ("module:function") names a callable, else why not."""
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        return f"{spec!r} is not of the form 'module:function'"
    try:
        module = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # user code may call sys.exit() at import
        return f"cannot import module {module_name!r}: {_one_line(_describe(exc))}"
    try:
        target = getattr(module, func_name)
    except AttributeError:
        return f"module {module_name!r} has no attribute {func_name!r}"
    except (Exception, SystemExit) as exc:  # a module-level __getattr__ may raise anything
        return f"cannot get {spec!r}: {_one_line(_describe(exc))}"
    if not callable(target):
        return f"{spec!r} is not callable"
    return None


def main(specs: list[str]) -> None:
    # User code may print while imported: keep the real stdout for the result only and send
    # everything else (Python-level and fd-level writes) to stderr.
    result_fd = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path.insert(0, os.getcwd())
    results = {spec: check(spec) for spec in specs}
    with os.fdopen(result_fd, "w", encoding="utf-8") as out:
        json.dump(results, out)
    sys.stderr.flush()
    # Threads or atexit hooks started by user code must not keep this process alive.
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
