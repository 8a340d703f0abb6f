"""The package's layout holds: what runs in job processes imports nothing of the daemon."""

from __future__ import annotations

import ast
from pathlib import Path

import lkrun

CHILD = Path(lkrun.__file__).parent / "child"
# What a child process may import of lkrun besides lkrun.child: the package itself (its
# version) and the API lkrun's own agents are written against.
ALLOWED = {"lkrun", "lkrun.context"}


def lkrun_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.split(".")[0] == "lkrun")
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "lkrun"
        ):
            names.add(node.module or "")
    return names


def test_the_child_side_imports_nothing_of_the_daemon() -> None:
    modules = sorted(CHILD.rglob("*.py"))
    assert len(modules) >= 8, modules  # runner, zygote, importcheck, apps, framework, ...
    for path in modules:
        for name in lkrun_imports(path):
            assert name in ALLOWED or name.startswith(("lkrun.child", "lkrun.shared")), (path, name)
