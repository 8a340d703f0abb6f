"""Which modules import which, recorded while user code is imported (the import check).

The import check imports every agent of one environment in one process, so a module two
agents import runs once: the second agent's import finds it in ``sys.modules`` and
registers nothing new. To say what each agent's code brings in (the inference runners its
plugins register, lkrun.child.framework.inference), the check records every import
statement that runs, as an edge from the importing module to the imported one, and an
agent's reach is everything its entrypoint module leads to.

``builtins.__import__`` sees every ``import`` statement, also of a module already loaded;
``importlib.import_module`` is wrapped too. The hook is installed in the check's own
process only, for its lifetime.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class ImportGraph:
    def __init__(self) -> None:
        self.edges: dict[str, set[str]] = {}  # importer -> modules it imported
        self._original: tuple[Callable[..., Any], Callable[..., Any]] | None = None

    def install(self) -> None:
        if self._original is not None:
            return
        original_import, original_module = builtins.__import__, importlib.import_module
        self._original = (original_import, original_module)

        def tracked_import(
            name: str,
            globals: Mapping[str, Any] | None = None,
            locals: Mapping[str, Any] | None = None,
            fromlist: Iterable[str] | None = (),
            level: int = 0,
        ) -> Any:
            module = original_import(name, globals, locals, fromlist, level)
            with contextlib.suppress(Exception):  # a record lost, never an import broken
                self._note_statement(name, globals, fromlist, level)
            return module

        def tracked_import_module(name: str, package: str | None = None) -> Any:
            module = original_module(name, package)
            caller = sys._getframe(1).f_globals.get("__name__")
            if isinstance(caller, str):
                self._add(caller, module.__name__)
            return module

        builtins.__import__ = tracked_import
        importlib.import_module = tracked_import_module  # type: ignore[assignment]

    def uninstall(self) -> None:
        if self._original is not None:
            builtins.__import__, importlib.import_module = self._original  # type: ignore[assignment]
            self._original = None

    def _note_statement(
        self,
        name: str,
        globals: Mapping[str, Any] | None,
        fromlist: Iterable[str] | None,
        level: int,
    ) -> None:
        if not globals:
            return
        importer = globals.get("__name__")
        if not isinstance(importer, str):
            return
        target = name
        if level > 0:
            package = globals.get("__package__")
            if package is None:
                package = importer if "__path__" in globals else importer.rpartition(".")[0]
            target = importlib.util.resolve_name("." * level + name, package)
        self._add(importer, target)
        for item in fromlist or ():
            # ``from package import submodule`` loads the submodule without another statement.
            if isinstance(item, str) and f"{target}.{item}" in sys.modules:
                self._add(importer, f"{target}.{item}")

    def _add(self, importer: str, target: str) -> None:
        if importer != target:
            self.edges.setdefault(importer, set()).add(target)

    def reach(self, module: str) -> set[str]:
        """``module`` and every module its import led to (with their parent packages,
        which an import of a submodule runs first)."""
        seen: set[str] = set()
        todo = [module]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            todo.extend(self.edges.get(name, ()))
            parent = name.rpartition(".")[0]
            if parent:
                todo.append(parent)
        return seen
