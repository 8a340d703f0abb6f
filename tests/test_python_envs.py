"""Agents on their own Python (manifest ``python``): validation, the child side's delivery,
and, against a real livekit-server, an agent in a venv whose packages conflict with the
daemon's served beside one on the daemon's env, each reporting what it imported."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy
import pytest
from livekit import rtc

import lkrun
from lkrun import interpreter
from lkrun.child import appkind, apps
from lkrun.child.framework import compat
from lkrun.credentials import Credentials
from lkrun.entrypoints import apply_app
from lkrun.manifest import ManifestError, parse_manifest
from lkrun.shared import CHILD_SIDE, DAEMON_PYTHON_ENV
from lkrun.supervision.agent_processes import _loaded_fields, _process_fields, job_env
from lkrun.supervision.job_process import AppSpec, python_command
from tests.conftest import Server, observer, run_cli, unique, wait_for, wait_for_participant
from tests.envs import BARE, FRAMEWORKS, OLD, OLD_LIVEKIT, OLD_NUMPY, EnvFactory, PythonEnv
from tests.helpers import agent_table, dispatch

REPORTER = Path(__file__).parent / "agents" / "env_report.py"


def old_env(python_env: EnvFactory) -> PythonEnv:
    return python_env(OLD)


def manifest_at(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agents.toml"
    path.write_text(text)
    return path


def parse(tmp_path: Path, python: str) -> ManifestError | Path | None:
    path = manifest_at(tmp_path, agent_table("a", "m:f", python=python))
    try:
        spec = parse_manifest(path.read_text(), path).agents["a"]
    except ManifestError as exc:
        return exc
    return spec.python


def executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


# -- the manifest field ------------------------------------------------------------------


def test_python_is_relative_to_the_manifest_and_keeps_the_symlink(tmp_path: Path) -> None:
    real = executable(tmp_path / "base" / "python3.11")
    link = tmp_path / "venv" / "bin" / "python"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    # A venv's python is a link to the base interpreter: resolving it would leave the venv.
    assert parse(tmp_path, "venv/bin/python") == link
    assert parse(tmp_path, str(link)) == link


def test_python_expands_the_home_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    python = executable(tmp_path / "envs" / "x" / "bin" / "python")
    assert parse(tmp_path, "~/envs/x/bin/python") == python


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda p: None, "no such file: venv/bin/python (looked for {p})"),
        (lambda p: p.mkdir(parents=True), "a directory, not an interpreter"),
        (lambda p: (p.parent.mkdir(parents=True), p.write_text("")), "not executable: "),
        (lambda p: (p.parent.mkdir(parents=True), p.symlink_to(p.parent / "gone")), "a broken"),
    ],
    ids=["missing", "directory", "not-executable", "broken-link"],
)
def test_a_bad_python_is_refused_in_one_line(tmp_path: Path, make: object, problem: str) -> None:
    target = tmp_path / "venv" / "bin" / "python"
    make(target)
    error = parse(tmp_path, "venv/bin/python")
    assert isinstance(error, ManifestError)
    assert (error.agent, error.field) == ("a", "python")
    assert problem.format(p=target) in error.message
    assert "\n" not in str(error) and str(error).startswith(f"{tmp_path / 'agents.toml'}: ")


# -- the child side's delivery -----------------------------------------------------------


def test_the_child_side_is_copied_whole_and_alone(tmp_path: Path) -> None:
    directory = interpreter.child_side_dir(roots=[tmp_path])
    assert directory.parent == tmp_path / "child"
    assert directory.name.startswith(f"{lkrun.__version__}-")
    package = Path(lkrun.__file__).parent
    copied = sorted(p.relative_to(directory / "lkrun") for p in directory.rglob("*.py"))
    expected = sorted(
        p.relative_to(package)
        for member in CHILD_SIDE
        for p in (
            (package / member).rglob("*.py") if (package / member).is_dir() else [package / member]
        )
    )
    assert copied == expected
    assert not (directory / "lkrun" / "daemon.py").exists()  # the daemon side stays out
    for rel in copied:
        assert (directory / "lkrun" / rel).read_bytes() == (package / rel).read_bytes()
    # Nobody else may write to any of it, whatever the umask; the interpreters' __pycache__
    # directories are made with it, so that none makes them writable by others.
    for path in [directory, *directory.rglob("*")]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path
    assert (directory / "lkrun" / "child" / "framework" / "__pycache__").is_dir()
    # Reused as it is: nothing is written twice, and no temporary directory is left.
    marker = directory / "lkrun" / "__pycache__" / "context.cpython-311.pyc"
    marker.write_bytes(b"")
    assert interpreter.child_side_dir(roots=[tmp_path]) == directory and marker.exists()
    assert sorted(p.name for p in (tmp_path / "child").iterdir()) == [
        directory.name,
        f"{directory.name}.lock",  # held while this process lives: no other prunes it
    ]


def plant_copy(root: Path) -> Path:
    """A directory where the child side's copy for this build goes, filled by someone else
    (before any daemon made it): the daemon's files, as a start."""
    name, contents = interpreter._read(interpreter.PACKAGE)
    target = root / "child" / name
    for rel, data in contents.items():
        (target / "lkrun" / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / "lkrun" / rel).write_bytes(data)
    return target


def is_intact(directory: Path) -> bool:
    package = Path(lkrun.__file__).parent
    copied = sorted(
        p.relative_to(directory / "lkrun")
        for p in directory.rglob("*.py")
        if "__pycache__" not in p.parts
    )
    return copied == interpreter.child_files() and all(
        (directory / "lkrun" / rel).read_bytes() == (package / rel).read_bytes() for rel in copied
    )


@pytest.mark.parametrize(
    "tamper",
    [
        lambda t: (t / "lkrun" / "__init__.py").write_text("import os  # runs first\n"),
        lambda t: (t / "lkrun" / "child" / "sitecustomize.py").write_text("pass\n"),
        lambda t: (t / "lkrun" / "context.py").unlink(),
        lambda t: (t / "lkrun" / "context.py").chmod(0o666),
        lambda t: (t / "lkrun" / "shared").chmod(0o777),
        lambda t: (
            (t / "lkrun" / "context.py").unlink(),
            (t / "lkrun" / "context.py").symlink_to(Path(lkrun.__file__).parent / "context.py"),
        ),
    ],
    ids=["changed", "extra-file", "missing-file", "writable-file", "writable-dir", "symlink"],
)
def test_a_copy_found_in_place_is_used_only_if_intact(tmp_path: Path, tamper: Any) -> None:
    planted = plant_copy(tmp_path)
    tamper(planted)
    directory = interpreter.child_side_dir(roots=[tmp_path])
    assert directory == planted and is_intact(directory)
    assert not (directory / "lkrun" / "child" / "sitecustomize.py").exists()
    # What was found there is gone, not kept beside it.
    assert sorted(p.name for p in (tmp_path / "child").iterdir()) == [
        directory.name,
        f"{directory.name}.lock",
    ]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make files of another user")
def test_a_copy_of_another_user_is_replaced_and_their_directory_refused(tmp_path: Path) -> None:
    planted = plant_copy(tmp_path / "cache")
    os.chown(planted / "lkrun" / "child" / "runner.py", 4242, 4242)
    directory = interpreter.child_side_dir(roots=[tmp_path / "cache"])
    assert is_intact(directory)
    assert (directory / "lkrun" / "child" / "runner.py").stat().st_uid == os.getuid()
    # A child/ directory another user made: they could swap the copy after it was checked.
    theirs = tmp_path / "theirs"
    (theirs / "child").mkdir(parents=True)
    os.chown(theirs / "child", 4242, 4242)
    directory = interpreter.child_side_dir(roots=[theirs, tmp_path / "state"])
    assert directory.parent == tmp_path / "state" / "child"
    with pytest.raises(interpreter.ChildSideError) as caught:
        interpreter.child_side_dir(roots=[theirs])
    assert f"refusing {theirs / 'child'}: it belongs to uid 4242" in str(caught.value)


@pytest.mark.parametrize("where", ["root", "child"])
def test_a_copy_root_others_may_write_to_is_refused(tmp_path: Path, where: str) -> None:
    shared = tmp_path / "shared"
    (shared / "child").mkdir(parents=True)
    (shared if where == "root" else shared / "child").chmod(0o777)
    directory = interpreter.child_side_dir(roots=[shared, tmp_path / "state"])
    assert directory.parent == tmp_path / "state" / "child"
    assert not any((shared / "child").iterdir())  # nothing was written there
    with pytest.raises(interpreter.ChildSideError, match="others may write to it"):
        interpreter.child_side_dir(roots=[shared])


def test_the_copy_goes_to_the_cache_else_the_daemons_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LKRUN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)  # the runtime dir would be in /tmp
    monkeypatch.setattr(interpreter, "_state_dir", [])
    assert interpreter._roots() == [tmp_path / "cache"]
    interpreter.configure(tmp_path / "state")  # as `lkrun serve --state-dir` and `check` do
    assert interpreter._roots() == [tmp_path / "cache", tmp_path / "state"]


def test_a_new_copy_prunes_what_other_builds_left(tmp_path: Path) -> None:
    home = tmp_path / "child"
    day = interpreter.PRUNE_AFTER

    def made(name: str, ago: float) -> Path:
        path = home / name
        (path / "lkrun").mkdir(parents=True)
        os.utime(path, (time.time() - ago, time.time() - ago))
        return path

    old = made("0.0.9-00000000000000aa", 2 * day)
    recent = made("0.0.9-00000000000000bb", 60)  # perhaps a daemon of an older build
    held = made("0.0.9-00000000000000cc", 2 * day)
    stale = made(".0.0.9-00000000000000dd.x1y2z3", 2 * interpreter.STALE_TEMPORARY)
    writing = made(".0.0.9-00000000000000ee.a1b2c3", 1)  # another daemon writing now
    unrelated = made("notes", 2 * day)
    lock = home / f"{held.name}.lock"
    interpreter._hold(lock)  # as a running daemon of that build holds its copy
    try:
        directory = interpreter.child_side_dir(roots=[tmp_path])
    finally:
        os.close(interpreter._held.pop(lock))
    left = {p.name for p in home.iterdir()}
    assert left == {
        directory.name,
        f"{directory.name}.lock",
        recent.name,
        held.name,
        lock.name,
        writing.name,
        unrelated.name,
    }
    assert old.name not in left and stale.name not in left


def test_the_copy_is_named_by_its_content(tmp_path: Path) -> None:
    package = Path(lkrun.__file__).parent
    first, second = tmp_path / "one" / "lkrun", tmp_path / "two" / "lkrun"
    for copy in (first, second):
        for rel in interpreter.child_files(package):
            (copy / rel).parent.mkdir(parents=True, exist_ok=True)
            (copy / rel).write_bytes((package / rel).read_bytes())
    (second / "context.py").write_text("# changed\n")
    roots = [tmp_path / "cache"]
    one = interpreter.child_side_dir(first, roots)
    two = interpreter.child_side_dir(second, roots)
    assert one != two and (two / "lkrun" / "context.py").read_text() == "# changed\n"


def test_the_copy_falls_back_when_the_cache_is_not_writable(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")  # cannot hold a child/ directory, whoever we run as
    directory = interpreter.child_side_dir(roots=[blocked, tmp_path / "state"])
    assert directory.parent == tmp_path / "state" / "child"
    with pytest.raises(interpreter.ChildSideError, match="cannot write lkrun's child side"):
        interpreter.child_side_dir(roots=[blocked])


def test_own_python_jobs_get_the_child_side_first_and_not_the_daemons_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LKRUN_CACHE_DIR", str(tmp_path / "cache"))
    python = executable(tmp_path / "venv" / "bin" / "python")
    path = manifest_at(tmp_path, agent_table("a", "m:f", python=str(python)))
    spec = parse_manifest(path.read_text(), path).agents["a"]
    base = {"PYTHONPATH": "/daemon/site", "PYTHONHOME": "/daemon/home", "HOME": "/h"}
    credentials = Credentials("ws://x", "key", "secret")
    env = job_env(spec, credentials, base, tmp_path)
    child = interpreter.child_side_dir()
    assert child.parent == tmp_path / "cache" / "child"
    assert env["PYTHONPATH"] == os.pathsep.join([str(child), str(tmp_path)])
    assert "PYTHONHOME" not in env and env["HOME"] == "/h"
    assert env[DAEMON_PYTHON_ENV] == sys.executable  # for the job's install hints
    # The agent's own PYTHONPATH comes after the child side.
    path.write_text(agent_table("a", "m:f", python=str(python), env={"PYTHONPATH": "/lib"}))
    spec = parse_manifest(path.read_text(), path).agents["a"]
    env = job_env(spec, credentials, base, tmp_path)
    assert env["PYTHONPATH"] == os.pathsep.join([str(child), "/lib"])
    # Its processes (fork server, jobs, request process) start under its interpreter.
    app = AppSpec(spec.entrypoint, python=str(spec.python))
    assert python_command("lkrun.child.zygote", app)[0] == str(python)
    assert python_command("lkrun.child.runner", AppSpec("m:f"))[0] == sys.executable
    # An agent on the daemon's python keeps the daemon's path, as before.
    path.write_text(agent_table("a", "m:f"))
    spec = parse_manifest(path.read_text(), path).agents["a"]
    env = job_env(spec, credentials, base, tmp_path)
    assert env["PYTHONPATH"] == os.pathsep.join([str(tmp_path), "/daemon/site"])


def test_install_hints_name_the_pip_of_an_agents_own_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plugin = ModuleNotFoundError("No module named 'livekit.plugins.x'", name="livekit.plugins.x")
    # A process under the daemon's interpreter: its env is the daemon's.
    monkeypatch.setenv(DAEMON_PYTHON_ENV, sys.executable)
    assert apps.import_error_hint(plugin).endswith(": pip install livekit-plugins-x")
    assert appkind.framework_install_hint() == "install it with: pip install 'lkrun[agents]'"
    # Under an agent's own python: that interpreter's pip, and no lkrun (the env needs none).
    monkeypatch.setenv(DAEMON_PYTHON_ENV, "/opt/lkrun/venv/bin/python")
    assert apps.import_error_hint(plugin).endswith(
        f"install it with: {sys.executable} -m pip install livekit-plugins-x"
    )
    assert appkind.framework_install_hint() == (
        f"install it with: {sys.executable} -m pip install livekit-agents"
    )


# -- against real interpreters and a real livekit-server ---------------------------------


def check_json(manifest: Path) -> tuple[int, dict[str, Any]]:
    result = run_cli("check", "--json", str(manifest), cwd=manifest.parent)
    return result.returncode, json.loads(result.stdout)


def test_an_env_without_livekit_fails_check_in_one_line(
    python_env: EnvFactory, tmp_path: Path
) -> None:
    bare = python_env(BARE)
    manifest = manifest_at(
        tmp_path,
        agent_table("fine", f"{REPORTER}:entrypoint")
        + agent_table("lacking", f"{REPORTER}:entrypoint", python=str(bare.python)),
    )
    code, report = check_json(manifest)
    assert code == 2 and report["ok"] is False
    [error] = report["errors"]
    hint = f"run {bare.python} -m pip install livekit"
    assert error["agent"] == "lacking" and error["field"] == "python"
    assert error["message"].startswith(f"python {bare.python} cannot import livekit (rtc): ")
    assert error["message"].endswith(hint) and "\n" not in error["text"]
    agents = {a["name"]: a for a in report["agents"]}
    assert agents["lacking"]["python"] == str(bare.python)
    # The same line, plain, from `lkrun check`.
    result = run_cli("check", str(manifest), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {error['text']}"


def old_python() -> Path:
    """An interpreter older than 3.10 that runs (pyenv's, or on PATH: a pyenv shim may not
    run); the test skips without one."""
    candidates = [
        *sorted(Path.home().glob(".pyenv/versions/3.[89].*/bin/python3.[89]")),
        *(Path(p) for name in ("python3.9", "python3.8") if (p := shutil.which(name))),
    ]
    for python in candidates:
        probe = subprocess.run([str(python), "-c", "pass"], capture_output=True, check=False)
        if probe.returncode == 0:
            return python
    pytest.skip("no Python older than 3.10 here (python3.9, python3.8, ~/.pyenv/versions)")


@pytest.mark.e2e  # lkrun check
def test_a_python_older_than_3_10_fails_check_in_one_line(tmp_path: Path) -> None:
    python = old_python()
    manifest = manifest_at(
        tmp_path, agent_table("legacy", f"{REPORTER}:entrypoint", python=str(python))
    )
    code, report = check_json(manifest)
    assert code == 2
    [error] = report["errors"]
    assert (error["agent"], error["field"]) == ("legacy", "python")
    version = run_python(python, "import platform; print(platform.python_version())")
    assert error["message"] == (
        f"python {python} is Python {version}; lkrun's child side needs 3.10 or later: "
        "install a newer Python and make the agent's env with it"
    )


def test_a_livekit_older_than_1_0_fails_check_in_one_line(
    python_env: EnvFactory, tmp_path: Path
) -> None:
    bare = python_env(BARE)
    # What the env's livekit says of itself is all the check reads of it.
    rtc_dir = tmp_path / "site" / "livekit" / "rtc"
    rtc_dir.mkdir(parents=True)
    (rtc_dir / "__init__.py").write_text('__version__ = "0.18.1"\n')
    manifest = manifest_at(
        tmp_path,
        agent_table(
            "legacy",
            f"{REPORTER}:entrypoint",
            python=str(bare.python),
            env={"PYTHONPATH": str(tmp_path / "site")},
        ),
    )
    code, report = check_json(manifest)
    assert code == 2
    [error] = report["errors"]
    assert (error["agent"], error["field"]) == ("legacy", "python")
    assert error["message"] == (
        f"python {bare.python} imports livekit 0.18.1; lkrun needs 1.0 or later: "
        f"run {bare.python} -m pip install 'livekit>=1.0'"
    )


def run_python(python: Path, code: str) -> str:
    result = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout.strip()


def test_a_framework_app_in_an_env_without_livekit_agents_says_what_to_install(
    python_env: EnvFactory, tmp_path: Path
) -> None:
    env = old_env(python_env)  # livekit, but no livekit-agents
    app = tmp_path / "voice.py"
    app.write_text("from livekit.agents import AgentServer\n\nserver = AgentServer()\n")
    manifest = manifest_at(
        tmp_path, agent_table("voice", "voice.py:server", python=str(env.python))
    )
    code, report = check_json(manifest)
    assert code == 2
    [error] = report["errors"]
    assert (error["agent"], error["field"]) == ("voice", "python")
    assert error["message"] == (
        f"python {env.python} cannot import livekit.agents, which {app}:server needs; "
        f"run {env.python} -m pip install livekit-agents"
    )


def test_a_missing_plugin_in_an_agents_env_says_to_install_it_there(
    python_env: EnvFactory, tmp_path: Path
) -> None:
    env = python_env(FRAMEWORKS[compat.TESTED[-1]])
    (tmp_path / "voice.py").write_text(
        "from livekit.agents import AgentServer\nimport livekit.plugins.silero_x\n\n"
        "server = AgentServer()\n"
    )
    manifest = manifest_at(
        tmp_path, agent_table("voice", "voice.py:server", python=str(env.python))
    )
    code, report = check_json(manifest)
    assert code == 2
    [error] = report["errors"]
    assert (error["agent"], error["field"]) == ("voice", "entrypoint")
    assert (
        f"a livekit-agents plugin is missing; install it with: {env.python} -m pip install "
        in (error["message"])
    )


def test_an_interpreter_that_imports_another_lkrun_is_refused(
    python_env: EnvFactory, tmp_path: Path
) -> None:
    bare = python_env(BARE)
    # An lkrun of another version, which a wrapper puts on the path instead of the daemon's.
    other = copy_of_lkrun(tmp_path / "other", "0.0.1").parent
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={other} exec {bare.python} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    manifest = manifest_at(tmp_path, agent_table("a", f"{REPORTER}:entrypoint", python="python"))
    code, report = check_json(manifest)
    assert code == 2
    [error] = report["errors"]
    assert error["field"] == "python"
    assert error["message"].startswith(
        f"python {wrapper} imports lkrun 0.0.1 from {other / 'lkrun'}, "
        f"not this daemon's {lkrun.__version__}"
    )


def copy_of_lkrun(directory: Path, version: str = lkrun.__version__) -> Path:
    """An lkrun package (the child side) of ``version`` under ``directory``."""
    for rel in interpreter.child_files():
        (directory / "lkrun" / rel).parent.mkdir(parents=True, exist_ok=True)
        (directory / "lkrun" / rel).write_bytes((Path(lkrun.__file__).parent / rel).read_bytes())
    if version != lkrun.__version__:
        (directory / "lkrun" / "__init__.py").write_text(f'__version__ = "{version}"\n')
    return directory / "lkrun"


def test_an_interpreter_that_imports_another_lkrun_of_the_same_version_is_refused(
    python_env: EnvFactory, tmp_path: Path
) -> None:
    # lkrun's version is the same across commits: an older checkout's child side, which a
    # wrapper puts first on the path, says 0.1.0 too.
    bare = python_env(BARE)
    other = copy_of_lkrun(tmp_path / "other")
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={other.parent} exec {bare.python} "$@"\n')
    wrapper.chmod(0o755)
    manifest = manifest_at(tmp_path, agent_table("a", f"{REPORTER}:entrypoint", python="python"))
    code, report = check_json(manifest)
    assert code == 2
    [error] = report["errors"]
    assert (error["agent"], error["field"]) == ("a", "python")
    assert error["message"].startswith(
        f"python {wrapper} imports lkrun {lkrun.__version__} from {other}, not this daemon's "
        f"{lkrun.__version__} from {interpreter.child_side_dir() / 'lkrun'}"
    )


@pytest.mark.e2e  # lkrun check
def test_an_agent_on_the_daemons_python_must_import_the_daemons_lkrun(tmp_path: Path) -> None:
    # An lkrun package on the path the agent's env sets comes first on its jobs' path: its
    # child side, not the daemon's, would run the jobs.
    other = copy_of_lkrun(tmp_path / "lib")
    manifest = manifest_at(
        tmp_path, agent_table("a", f"{REPORTER}:entrypoint", env={"PYTHONPATH": str(other.parent)})
    )
    code, report = check_json(manifest)
    assert code == 2
    [error] = report["errors"]
    assert (error["agent"], error["field"]) == ("a", None)
    assert error["message"] == (
        f"python {sys.executable} imports lkrun {lkrun.__version__} from {other}, not this "
        f"daemon's {lkrun.__version__} from {interpreter.PACKAGE}: is there another lkrun in "
        "the manifest's directory or on PYTHONPATH?"
    )


def test_the_child_side_is_read_when_the_daemon_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An lkrun upgraded on disk under a running daemon reaches no agent's processes, not
    # even those of an agent a reload adds later (the daemon's side is still the old one).
    package = copy_of_lkrun(tmp_path / "installed")
    monkeypatch.setattr(interpreter, "PACKAGE", package)
    monkeypatch.setattr(interpreter, "_state_dir", [])
    interpreter.configure(tmp_path / "state")  # the daemon starts (serve, check, Daemon)
    started_with = (package / "context.py").read_bytes()
    (package / "context.py").write_text("# upgraded on disk\n")
    (package / "child" / "new_module.py").write_text("# upgraded on disk\n")
    directory = interpreter.child_side_dir(package, roots=[tmp_path / "cache"])
    assert (directory / "lkrun" / "context.py").read_bytes() == started_with
    assert not (directory / "lkrun" / "child" / "new_module.py").exists()


async def attributes_of(room: rtc.Room, prefix: str) -> dict[str, str]:
    participant = await wait_for_participant(room, prefix, timeout=60)
    await wait_for(lambda: participant.attributes.get("python"), 30, what=f"{prefix} reporting")
    return dict(participant.attributes)


async def test_agents_on_conflicting_envs_serve_side_by_side(
    python_env: EnvFactory, start_daemon: Callable[..., Any], livekit_server: Server
) -> None:
    env = old_env(python_env)
    manifest = (
        agent_table("old", f"{REPORTER}:entrypoint", python=str(env.python))
        + agent_table(
            "cold", f"{REPORTER}:entrypoint", python=str(env.python), start_method="spawn"
        )
        + agent_table("here", f"{REPORTER}:entrypoint")
    )
    daemon = await start_daemon(manifest)
    status = {a["agent"]: a for a in (await daemon.status())["agents"]}
    assert status["old"]["python"] == str(env.python)
    assert status["old"]["livekit_version"] == OLD_LIVEKIT
    assert status["here"]["python"] == sys.executable
    assert status["here"]["livekit_version"] == rtc.__version__
    room = unique("envs")
    async with observer(livekit_server, room) as lk:
        for agent in ("old", "cold", "here"):
            await dispatch(livekit_server, room, agent)
        old = await attributes_of(lk, "old-")
        spawned = await attributes_of(lk, "cold-")
        here = await attributes_of(lk, "here-")
        # All three are in the room at once, each on what its own env holds.
        identities = [p.identity for p in lk.remote_participants.values()]
        for prefix in ("old-", "cold-", "here-"):
            assert any(identity.startswith(prefix) for identity in identities), identities
    # The env's versions are not the daemon's: pip could not have installed them beside it.
    assert rtc.__version__ != OLD_LIVEKIT and numpy.__version__ != OLD_NUMPY
    for reported in (old, spawned):
        assert reported["python"] == str(env.python)
        assert (reported["livekit"], reported["numpy"]) == (OLD_LIVEKIT, OLD_NUMPY)
        # lkrun's child side came from the daemon's copy, and the daemon's packages are
        # out of sight.
        assert reported["lkrun"].startswith(str(lkrun_cache() / "child"))
        assert reported["sees_daemon_packages"] == "false"
    assert here["python"] == sys.executable
    assert (here["livekit"], here["numpy"]) == (rtc.__version__, numpy.__version__)
    assert here["lkrun"] == lkrun.__file__ and here["sees_daemon_packages"] == "true"
    # `lkrun status` names each agent's interpreter.
    text = daemon.cli("status").stdout
    assert f"old: lkrun function; python {env.python} (" in text
    assert f"livekit {OLD_LIVEKIT}" in text


def program_of(pid: int) -> str:
    """The program a process was started as (its argv[0]); "" if it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def lkrun_cache() -> Path:
    from lkrun import paths

    return paths.cache_dir()


async def test_a_changed_python_restarts_the_agents_processes(
    python_env: EnvFactory, start_daemon: Callable[..., Any]
) -> None:
    env = old_env(python_env)
    daemon = await start_daemon(agent_table("a", f"{REPORTER}:entrypoint"))

    async def fork_server() -> tuple[int, str] | None:
        [agent] = (await daemon.status())["agents"]
        pid = agent["fork_server_pid"]
        if pid is None:
            return None
        command = program_of(pid)
        return (pid, command) if command else None

    before = await wait_for(fork_server, 30, what="the fork server")
    assert before[1] == sys.executable
    daemon.manifest_path.write_text(
        agent_table("a", f"{REPORTER}:entrypoint", python=str(env.python))
    )
    after = await wait_for(
        lambda: _changed(fork_server, before), 60, what="a fork server under the env's python"
    )
    assert after[1] == str(env.python)
    [agent] = (await daemon.status())["agents"]
    assert agent["python"] == str(env.python) and agent["livekit_version"] == OLD_LIVEKIT
    # The old fork server (it had no jobs to finish) is gone, not left beside the new one.
    await wait_for(lambda: program_of(before[0]) == "", 30, what="the old fork server to exit")


async def _changed(
    probe: Callable[[], Awaitable[tuple[int, str] | None]], before: tuple[int, str]
) -> tuple[int, str] | None:
    now = await probe()
    return now if now is not None and now != before else None


def test_a_changed_env_under_the_same_python_is_a_change_that_replaces_processes(
    tmp_path: Path,
) -> None:
    python = executable(tmp_path / "venv" / "bin" / "python")
    path = manifest_at(tmp_path, agent_table("a", "m:server", python=str(python)))
    spec = parse_manifest(path.read_text(), path).agents["a"]
    app = {"framework": "livekit-agents", "kind": "AgentServer", "version": "1.8.9"}
    runtime = {"python_version": "3.11.7", "livekit": "1.1.0"}
    before = apply_app(path, spec, app, runtime)
    # What a pip install into the env (or a rebuilt one) changes under the same ``python``.
    for after in (
        apply_app(path, spec, {**app, "version": "1.8.10"}, runtime),
        apply_app(path, spec, app, {**runtime, "python_version": "3.11.9"}),
        apply_app(path, spec, app, {**runtime, "livekit": "1.1.1"}),
    ):
        assert after != before  # the daemon applies it (Daemon._apply: host.update_spec)
        assert _loaded_fields(after) != _loaded_fields(before)  # a new fork server
        assert _process_fields(after) != _process_fields(before)  # new warm processes
    assert _loaded_fields(apply_app(path, spec, app, runtime)) == _loaded_fields(before)


def swap_to(wrapper: Path, python: Path | str) -> None:
    """``wrapper`` runs ``python``: one ``python`` path of the manifest whose packages change
    under it, as with a pip install into the env."""
    wrapper.write_text(f'#!/bin/sh\nexec {python} "$@"\n')
    wrapper.chmod(0o755)


async def test_new_packages_in_an_agents_env_replace_its_processes_on_reload(
    python_env: EnvFactory, start_daemon: Callable[..., Any], tmp_path: Path
) -> None:
    env = old_env(python_env)
    wrapper = tmp_path / "agent-python"
    swap_to(wrapper, env.python)
    manifest = agent_table("a", f"{REPORTER}:entrypoint", python=str(wrapper))
    daemon = await start_daemon(manifest)

    async def fork_server() -> tuple[int, str] | None:
        [agent] = (await daemon.status())["agents"]
        pid = agent["fork_server_pid"]
        command = program_of(pid) if pid is not None else ""
        return (pid, command) if command else None

    before = await wait_for(fork_server, 30, what="the fork server")
    assert before[1] == str(env.python)
    [agent] = (await daemon.status())["agents"]
    assert agent["livekit_version"] == OLD_LIVEKIT
    swap_to(wrapper, sys.executable)  # livekit and numpy of the daemon's env, same Python
    daemon.manifest_path.write_text(manifest)  # unchanged: only saved again, a reload
    after = await wait_for(
        lambda: _changed(fork_server, before), 60, what="a fork server on the new packages"
    )
    assert after[1] == sys.executable
    [agent] = (await daemon.status())["agents"]
    assert agent["python"] == str(wrapper) and agent["livekit_version"] == rtc.__version__
    await wait_for(lambda: program_of(before[0]) == "", 30, what="the old fork server to exit")


def test_installing_into_an_env_beside_the_manifest_is_no_code_change(tmp_path: Path) -> None:
    from lkrun.daemon import _relevant_to

    manifest = manifest_at(tmp_path, agent_table("a", "m:f"))
    relevant = _relevant_to(manifest)
    venv = tmp_path / "envs" / "support"
    venv.mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    assert relevant(2, str(tmp_path / "agents" / "support.py"))  # the agent's own code
    assert not relevant(2, str(venv / "lib" / "python3.11" / "site-packages" / "x" / "m.py"))
    assert not relevant(2, str(venv / "bin" / "tool.py"))
    assert not relevant(2, str(tmp_path / "conda" / "lib" / "site-packages" / "m.py"))
    assert relevant(2, str(manifest))


def test_a_manifest_inside_a_site_packages_still_reloads_its_code(tmp_path: Path) -> None:
    from lkrun.daemon import _relevant_to

    # Only the part of a path below the manifest's directory says whether it is an env's.
    project = tmp_path / "lib" / "site-packages" / "myagents"
    project.mkdir(parents=True)
    manifest = manifest_at(project, agent_table("a", "m:f"))
    relevant = _relevant_to(manifest)
    assert relevant(2, str(project / "support.py"))
    assert not relevant(2, str(project / "env" / "lib" / "site-packages" / "x.py"))
