"""Python environments for tests: virtualenvs built once and cached, like livekit-server.

``ensure_env(name, requirements)`` returns a ``PythonEnv`` under
``<cache>/envs/<name>-<hash>/`` (``<cache>`` is lkrun.paths.cache_dir(): ``$LKRUN_CACHE_DIR``,
else ``$XDG_CACHE_HOME/lkrun``, else ``~/.cache/lkrun``). The hash covers the requirements,
the base interpreter and this file's build recipe, so a changed requirement makes a new env
and an unchanged one is reused. A build goes into a temporary directory that is renamed
into place when pip has finished and the ``imports`` import, so an interrupted build is
never reused; a lock file per env keeps two pytest processes from building the same one.

The env is moved after it is built, so the scripts pip wrote into its bin/ name the
temporary path in their ``#!`` line: run tools as ``env.python -m pip``, never ``bin/pip``.

Every env the tests use is declared once, in ``ENVS`` below, and ``make test`` builds them
all before pytest runs (``python -m tests.envs --all``): building one takes a minute or more
(pip, from the package index), which must not count against a test's timeout. The
``python_env`` fixture (session-scoped, e2e) takes one of those declarations and refuses any
other, so the list stays complete::

    def test_x(python_env):
        env = python_env(OLD)
        env.python  # Path of its bin/python, for a manifest's ``python = ...``
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from lkrun import paths
from lkrun.child.framework import compat

# Bump when the way an env is built changes: every cached env is built again.
RECIPE = 1
MANIFEST = "lkrun-test-env.json"  # written last into a built env: what it holds
BUILD_TIMEOUT = 900.0


@dataclass(frozen=True)
class EnvSpec:
    """A test env: its name, what pip installs into it, what must import once it has."""

    name: str
    requirements: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()


def framework_env(version: str) -> EnvSpec:
    return EnvSpec(f"lka-{version}", (f"livekit-agents=={version}",), ("livekit.agents",))


# Older than the daemon's livekit (1.1.x) and numpy (2.x): pip could not install these
# beside the daemon's packages, so only an env of its own can run an agent that pins them.
OLD_LIVEKIT = "1.0.25"
OLD_NUMPY = "1.26.4"
BARE = EnvSpec("bare")  # an interpreter with nothing installed (no pip)
OLD = EnvSpec(
    "lk-old", (f"livekit=={OLD_LIVEKIT}", f"numpy=={OLD_NUMPY}"), ("livekit.rtc", "numpy")
)
# One env per livekit-agents version lkrun is tested with.
FRAMEWORKS = {version: framework_env(version) for version in compat.TESTED}
# Every env the tests use: `make test` builds them before pytest (python -m tests.envs --all).
ENVS = (BARE, OLD, *FRAMEWORKS.values())


class EnvBuildError(Exception):
    """An env could not be built; the text has the failing command and its output's end."""


@dataclass(frozen=True)
class PythonEnv:
    name: str
    dir: Path
    requirements: tuple[str, ...]

    @property
    def python(self) -> Path:
        return self.dir / "bin" / "python"

    def run(self, code: str, timeout: float = 120.0) -> str:
        """Run ``code`` with the env's python; its stdout (EnvBuildError if it fails)."""
        return _run([str(self.python), "-c", code], timeout=timeout)

    def version(self, distribution: str) -> str | None:
        """The installed version of ``distribution`` in the env, None if it is not."""
        code = (
            "import importlib.metadata as m, sys\n"
            "try: print(m.version(sys.argv[1]))\n"
            "except m.PackageNotFoundError: print('')\n"
        )
        out = _run([str(self.python), "-c", code, distribution]).strip()
        return out or None


def base_python() -> str:
    """The interpreter new envs are made from: $LKRUN_TEST_ENV_PYTHON, else the one under
    the test run's own venv."""
    return os.environ.get("LKRUN_TEST_ENV_PYTHON") or getattr(
        sys, "_base_executable", sys.executable
    )


def envs_dir() -> Path:
    return paths.cache_dir() / "envs"


def env_key(requirements: Sequence[str], base: str, pip: bool) -> str:
    text = json.dumps([RECIPE, list(requirements), os.path.realpath(base), pip])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def ensure_env(
    name: str,
    requirements: Sequence[str] = (),
    *,
    imports: Sequence[str] = (),
    base: str | None = None,
    pip: bool | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> PythonEnv:
    """The env ``name`` holding ``requirements`` (pip specifiers), built if not cached.

    ``imports``: modules that must import once installed (else the build fails and is not
    kept). ``pip``: whether the env gets pip (default: only when there is something to
    install; an env without requirements is a bare interpreter, made in a second).
    """
    base = base or base_python()
    with_pip = bool(requirements) if pip is None else pip
    target = envs_dir() / f"{name}-{env_key(requirements, base, with_pip)}"
    env = PythonEnv(name, target, tuple(requirements))
    if (target / MANIFEST).is_file():
        return env
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # another process may be building it
        if (target / MANIFEST).is_file():
            return env
        started = time.monotonic()
        log(f"test env {name}: building {target} ({', '.join(requirements) or 'bare'})")
        _build(target, base, requirements, imports, with_pip)
        log(f"test env {name}: built in {time.monotonic() - started:.0f}s")
    return env


def _build(
    target: Path, base: str, requirements: Sequence[str], imports: Sequence[str], pip: bool
) -> None:
    if target.exists():  # a stale copy without its manifest: never finished
        shutil.rmtree(target)
    temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        command = [base, "-m", "venv", *([] if pip else ["--without-pip"]), str(temporary)]
        _run(command)
        python = str(temporary / "bin" / "python")
        if requirements:
            pip_install = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
            _run([*pip_install, *requirements], timeout=BUILD_TIMEOUT)
        if imports:
            _run([python, "-c", "\n".join(f"import {module}" for module in imports)])
        manifest = {"requirements": list(requirements), "base": base, "recipe": RECIPE}
        (temporary / MANIFEST).write_text(json.dumps(manifest) + "\n")
        temporary.chmod(0o755)
        os.rename(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _run(command: list[str], timeout: float = 120.0) -> str:
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")},
        )
    except subprocess.TimeoutExpired:
        raise EnvBuildError(f"{' '.join(command[:5])} ... took longer than {timeout:g}s") from None
    if result.returncode != 0:
        tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-6:])
        raise EnvBuildError(f"{' '.join(command[:5])} ... failed ({result.returncode}): {tail}")
    return result.stdout


EnvFactory = Callable[[EnvSpec], PythonEnv]


def declared_env(spec: EnvSpec, ensure: Callable[..., PythonEnv] = ensure_env) -> PythonEnv:
    """The env ``spec`` declares, which must be one of ENVS (so that `make test` built it);
    built here only when pytest runs without make (then its time counts against the
    test's)."""
    if spec not in ENVS:
        raise LookupError(f"{spec} is not in tests.envs.ENVS: declare it there, so make builds it")
    return ensure(spec.name, spec.requirements, imports=spec.imports)


@pytest.fixture(scope="session")
def python_env() -> EnvFactory:
    """A cached test virtualenv, by one of the declarations in ENVS (see this module)."""
    return declared_env


def main(argv: Sequence[str], ensure: Callable[..., PythonEnv] = ensure_env) -> list[PythonEnv]:
    """``--all``: build (or find) every env of ENVS; ``NAME REQUIREMENT...``: one by hand."""
    if list(argv) == ["--all"]:
        return [declared_env(spec, ensure) for spec in ENVS]
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m tests.envs --all | NAME [REQUIREMENT...]")
    return [ensure(argv[0], argv[1:])]


if __name__ == "__main__":
    for built in main(sys.argv[1:]):
        print(built.python)
