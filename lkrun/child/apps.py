"""Importing what an agent's entrypoint names (the child side): ``module:attribute`` or
``path/to/file.py:attribute``, and what to install when that fails for want of
livekit-agents.

The runner, the fork server, the import check and the framework's inference process load
user code with these functions; which app kind the loaded object is, lkrun.child.kinds
decides. This module imports only the standard library, lkrun.child.appkind and lkrun.shared, so
every part of the child side may use it.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

# The kinds' names and their error, for the code that loads apps (defined in appkind).
from lkrun.child.appkind import AUTO as AUTO
from lkrun.child.appkind import FRAMEWORKS as FRAMEWORKS
from lkrun.child.appkind import INSTALL_HINT as INSTALL_HINT
from lkrun.child.appkind import LIVEKIT_AGENTS as LIVEKIT_AGENTS
from lkrun.child.appkind import LKRUN as LKRUN
from lkrun.child.appkind import AppError as AppError
from lkrun.child.appkind import framework_install_hint, pip_install

# How an entrypoint reads, as the daemon parses it too (defined in lkrun.shared.entrypoint).
from lkrun.shared.entrypoint import is_file_source as is_file_source
from lkrun.shared.entrypoint import split_entrypoint as split_entrypoint


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
        return f"the module is a livekit-agents app; {framework_install_hint()}"
    parts = missing.split(".")
    if parts[:2] != ["livekit", "plugins"]:
        return ""
    # "from livekit.plugins import x" names only livekit.plugins (and x in name_from, 3.12+).
    plugin = parts[2] if len(parts) > 2 else getattr(exc, "name_from", None)
    package = "livekit-plugins-" + (plugin.replace("_", "-") if plugin else "<name>")
    return f"a livekit-agents plugin is missing; install it with: {pip_install(package)}"


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent that does not import, or an import hook refusing it
        return False
