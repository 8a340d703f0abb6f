"""The package's layout holds: what runs in job processes imports nothing of the daemon.

The child side (lkrun.shared.CHILD_SIDE) may be copied alone into another Python
environment (an agent's own interpreter), so what it imports is checked here statically,
from the source, and by importing a copy of it where the daemon's dependencies are missing.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import lkrun
from lkrun.shared import CHILD_SIDE

ROOT = Path(lkrun.__file__).parent
# What the child side may import besides the standard library and itself: the LiveKit SDK
# (not livekit.api, which brings aiohttp) everywhere, livekit-agents and what it brings in
# child/framework only, and optional speed-ups inside a function that can do without them.
# livekit.protocol is the separate livekit-protocol package, which livekit-agents brings and
# an env with only ``livekit`` lacks.
THIRD_PARTY = ("livekit.rtc",)
FRAMEWORK_ONLY = (
    "livekit.agents",
    "livekit.plugins",
    "livekit.api",
    "livekit.protocol",
    "google.protobuf",
    "pydantic",  # livekit-agents' models; the fork server's rehearsal fills their caches
)
OPTIONAL = ("uvloop",)
# What the daemon needs and a job process must not: an agent's env need not have them.
DAEMON_ONLY = (
    "aiohttp",
    "psutil",
    "typer",
    "click",
    "rich",
    "uvloop",
    "prometheus_client",
    "watchfiles",
    "livekit.api",
    "livekit.agents",
)


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name: a module, or a package's name
    line: int
    deferred: bool  # inside a function: runs when it is called, not at import
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def child_side_files(root: Path = ROOT, members: Iterable[str] = CHILD_SIDE) -> list[Path]:
    files: list[Path] = []
    for member in members:
        path = root / member
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, known: Iterable[str], root: Path = ROOT) -> list[Import]:
    """Every import statement of ``path``; ``from pkg import mod`` counts as importing
    ``pkg.mod`` when that is one of the ``known`` modules."""
    known = set(known)
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, deferred: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(alias.name, node.lineno, deferred, type_only))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                is_module = full in known if base.split(".")[0] == "lkrun" else _is_module(full)
                target = full if is_module else base
                found.append(Import(target, node.lineno, deferred, type_only))
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, deferred, True)
            for child in node.orelse:
                visit(child, deferred, type_only)
            return
        inner = deferred or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_only)

    visit(ast.parse(path.read_text(), str(path)), False, False)
    return found


@functools.cache
def _is_module(name: str) -> bool:
    """Whether ``name`` (from ``from package import name``) is a module, as in ``from
    livekit import rtc``, rather than something a module defines."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, AttributeError, ValueError):  # the parent is a module, not a package
        return False


def within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def runs_with(imp: Import) -> Iterator[str]:
    """The modules an import runs: the module and each package above it."""
    parts = imp.module.split(".")
    for n in range(1, len(parts) + 1):
        yield ".".join(parts[:n])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node, or with a self edge."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def import_graph(
    modules: dict[str, Path],
    *,
    deferred: bool,
    unit: dict[str, str] | None = None,
    root: Path = ROOT,
) -> dict[str, set[str]]:
    """Who imports whom among ``modules`` (TYPE_CHECKING imports never run, so they do not
    count; function-level ones only with ``deferred``). Importing a module runs the
    packages above it too. ``unit`` collapses modules into larger nodes (a package's
    modules into the package)."""
    unit = unit or {name: name for name in modules}
    graph: dict[str, set[str]] = {unit[name]: set() for name in modules}
    for name, path in modules.items():
        for imp in imports(path, modules, root):
            if imp.type_only or (imp.deferred and not deferred):
                continue
            for target in runs_with(imp):
                if target in modules and unit[target] != unit[name]:
                    graph[unit[name]].add(unit[target])
    return graph


def units(modules: Iterable[str]) -> dict[str, str]:
    """Each module's unit: lkrun.X for a module or a package directly under lkrun."""
    return {name: ".".join(name.split(".")[:2]) for name in modules}


# --- the child side imports nothing of the daemon --------------------------------------


def test_the_child_side_set_names_what_exists() -> None:
    for member in CHILD_SIDE:
        assert (ROOT / member).exists(), member
    files = child_side_files()
    assert len(files) >= 15, files  # runner, zygote, importcheck, apps, framework, shared...
    names = {module_name(p) for p in files}
    assert {"lkrun", "lkrun.context", "lkrun.shared.jobpipe", "lkrun.child.runner"} <= names


def test_the_child_side_imports_nothing_of_the_daemon() -> None:
    assert wrong_imports(ROOT) == []


def test_the_import_rules_catch_a_framework_only_import_outside_the_framework(
    tmp_path: Path,
) -> None:
    root = tmp_path / "lkrun"
    for rel, text in {
        "__init__.py": "",
        "context.py": "",
        "shared/__init__.py": "",
        "child/__init__.py": "",
        "child/runner.py": "from livekit import rtc\nfrom livekit.protocol import agent\n",
        "child/framework/__init__.py": "",
        "child/framework/job.py": "from livekit.protocol import agent\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert wrong_imports(root) == ["lkrun/child/runner.py:2 imports livekit.protocol.agent"]


def wrong_imports(root: Path) -> list[str]:
    """Each import of the child side under ``root`` that it may not make."""
    modules = all_modules(root)
    files = child_side_files(root)
    child = {module_name(p, root) for p in files}
    wrong = []
    for path in files:
        in_framework = within(module_name(path, root), ["lkrun.child.framework"])
        for imp in imports(path, modules, root):
            top = imp.module.split(".")[0]
            if top == "lkrun":
                ok = imp.module in child
            elif (
                top in sys.stdlib_module_names
                or top == "__future__"
                or within(imp.module, THIRD_PARTY)
            ):
                ok = True
            elif within(imp.module, FRAMEWORK_ONLY):
                ok = in_framework
            else:
                ok = within(imp.module, OPTIONAL) and imp.deferred
            if not ok:
                wrong.append(f"{path.relative_to(root.parent)}:{imp.line} imports {imp.module}")
    return wrong


def test_the_daemon_side_imports_nothing_of_the_child_package() -> None:
    """What both sides need (entrypoint parsing, the framework names, the fork server's
    messages) is in lkrun.shared; the daemon starts child modules by name only
    (``python -m lkrun.child.runner``), never imports them, not even in a function."""
    modules = all_modules()
    child = {module_name(p) for p in child_side_files()}
    wrong = []
    for name, path in modules.items():
        if name in child or within(name, ["lkrun.examples"]):  # agents' code, not the daemon
            continue
        for imp in imports(path, modules):
            if within(imp.module, ["lkrun.child"]) and not imp.type_only:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{imp.line} imports {imp.module}")
    assert not wrong, "\n".join(wrong)


def test_shared_imports_only_the_standard_library() -> None:
    modules = all_modules()
    shared = sorted((ROOT / "shared").rglob("*.py"))
    assert len(shared) >= 5, shared  # jobpipe, pdeathsig, tasks, text
    wrong = []
    for path in shared:
        for imp in imports(path, modules):
            top = imp.module.split(".")[0]
            ok = top in sys.stdlib_module_names or top == "__future__"
            if not (ok or within(imp.module, ["lkrun.shared"])):
                wrong.append(f"{path.relative_to(ROOT.parent)}:{imp.line} imports {imp.module}")
    assert not wrong, "\n".join(wrong)


# --- no import cycles -----------------------------------------------------------------


def test_no_import_cycles_among_modules() -> None:
    """What a module imports at its top never leads back to it: each module can be read
    (and loaded) after the ones it needs."""
    assert cycles(import_graph(all_modules(), deferred=False)) == []


def test_the_child_side_has_no_cycles_even_through_deferred_imports() -> None:
    """A function-level import is a dependency all the same: the app kinds never import
    the module that picks them, and lkrun.context never imports lkrun.child."""
    modules = {module_name(p): p for p in child_side_files()}
    assert cycles(import_graph(modules, deferred=True)) == []


def test_the_child_side_packages_import_one_way() -> None:
    """lkrun.child may use lkrun.context and lkrun.shared, which never import it back."""
    modules = {module_name(p): p for p in child_side_files()}
    graph = import_graph(modules, deferred=True, unit=units(modules))
    assert cycles(graph) == []
    assert graph["lkrun.shared"] == set()
    assert graph["lkrun.context"] <= {"lkrun", "lkrun.shared"}


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


# --- a copy of the child side runs without the daemon's dependencies -------------------

# Makes the daemon's dependencies unimportable, as in an agent's env that lacks them.
BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"{{name}} is blocked: the child side must not need it", name=name)
        return None
sys.meta_path.insert(0, Blocker())
# An env where lkrun is not installed: drop the finder of this venv's editable install.
sys.meta_path[:] = [f for f in sys.meta_path if not f.__module__.startswith("__editable")]
sys.path.insert(0, {copy!r})
"""

PROBE = """
import json
import lkrun.child.runner, lkrun.child.zygote, lkrun.child.importcheck, lkrun.context
from lkrun.child import apps, kinds
app = kinds.make_app("native_app:entrypoint", apps.load_target("native_app:entrypoint"), None,
                     "auto")
try:
    import lkrun.manifest
    daemon = "importable"
except ImportError:
    daemon = "missing"
loaded = sorted(n for n in sys.modules if n == "lkrun" or n.startswith("lkrun."))
files = sorted({getattr(sys.modules[n], "__file__", "") or "" for n in loaded})
blocked = sorted(n for n in sys.modules if any(n == b or n.startswith(b + ".") for b in BLOCKED))
print(json.dumps({"app": app.info(), "daemon": daemon, "loaded": loaded, "files": files,
                  "blocked": blocked}))
"""


@pytest.mark.e2e  # a Python process
def test_a_copy_of_the_child_side_imports_without_the_daemon(tmp_path: Path) -> None:
    copy = tmp_path / "env"
    for member in CHILD_SIDE:
        source, target = ROOT / member, copy / "lkrun" / member
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    (copy / "native_app.py").write_text(
        "from lkrun.context import JobContext\n\n\n"
        "async def entrypoint(ctx: JobContext) -> None:\n    pass\n"
    )
    # Also what an env with only ``livekit`` lacks.
    blocked = [*DAEMON_ONLY, "livekit.protocol"]
    code = BLOCKER.format(blocked=blocked, copy=str(copy)) + textwrap.dedent(PROBE)
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["app"] == {"framework": "lkrun", "kind": "function"}
    assert result["daemon"] == "missing"  # the copy, not the repo's package, was imported
    assert all(f.startswith(str(copy)) for f in result["files"]), result["files"]
    assert "lkrun.child.runner" in result["loaded"]
    assert result["blocked"] == []
