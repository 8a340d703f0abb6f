"""The test virtualenvs (tests/envs.py) are declared in one list, which `make test` builds
before pytest runs, so that no test spends its timeout on pip."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from lkrun.child.framework import compat
from tests import envs

MAKEFILE = Path(__file__).parent.parent / "Makefile"


def recipes(text: str) -> dict[str, tuple[list[str], list[str]]]:
    """Each rule of a Makefile: target -> (prerequisites, recipe lines)."""
    rules: dict[str, tuple[list[str], list[str]]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("\t") and current is not None:
            current.append(line.strip())
        elif match := re.match(r"^([\w.$()-]+):(?!=)\s*(.*)$", line):
            current = []
            rules[match[1]] = (match[2].split(), current)
        elif not line.startswith("#"):
            current = None
    return rules


def fake_ensure(calls: list[tuple[str, tuple[str, ...], tuple[str, ...]]]) -> Any:
    def ensure(name: str, requirements: Any = (), *, imports: Any = ()) -> envs.PythonEnv:
        calls.append((name, tuple(requirements), tuple(imports)))
        return envs.PythonEnv(name, Path("/envs") / name, tuple(requirements))

    return ensure


def test_all_builds_every_declared_env() -> None:
    calls: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    built = envs.main(["--all"], ensure=fake_ensure(calls))
    assert calls == [(s.name, s.requirements, s.imports) for s in envs.ENVS]
    assert [env.name for env in built] == [s.name for s in envs.ENVS]
    # What the tests need: a bare interpreter, conflicting packages, each tested framework.
    assert {"bare", "lk-old"} | {f"lka-{v}" for v in compat.TESTED} == {s.name for s in envs.ENVS}


def test_an_env_that_is_not_declared_is_refused() -> None:
    calls: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
    undeclared = envs.EnvSpec("lk-other", ("livekit==1.0.0",))
    with pytest.raises(LookupError, match=r"not in tests\.envs\.ENVS"):
        envs.declared_env(undeclared, ensure=fake_ensure(calls))
    assert calls == []
    assert envs.declared_env(envs.OLD, ensure=fake_ensure(calls)).name == "lk-old"


def test_make_test_builds_the_envs_before_pytest() -> None:
    rules = recipes(MAKEFILE.read_text())
    prerequisites, steps = rules["test"]
    builders = [
        target
        for target in prerequisites
        if target in rules and "$(BIN)/python -m tests.envs --all" in rules[target][1]
    ]
    assert builders, f"no prerequisite of test builds the envs: {prerequisites}"
    assert any(step.startswith("$(BIN)/pytest") for step in steps)
