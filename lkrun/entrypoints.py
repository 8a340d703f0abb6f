"""The entrypoint check: import every agent's code in a subprocess and learn what it is.

The daemon never imports user code itself: a broken or slow module must not take it down.
The subprocess (lkrun.child.importcheck) reports, per agent, whether its entrypoint and prewarm
load and what the entrypoint is (an lkrun function or a livekit-agents app, see
lkrun.child.apps). ``check_entrypoints`` turns that into the manifest the daemon runs: each agent
gets its ``app``, and a livekit-agents app's own settings (agent name, server type,
permissions, idle processes, limits, timeouts) fill in what the manifest leaves unset.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lkrun import __version__, interpreter
from lkrun.credentials import child_env
from lkrun.manifest import (
    COMMAND,
    JOB_LOG_LEVEL_ENV,
    AgentSpec,
    AppInfo,
    FrozenMap,
    Manifest,
    ManifestError,
    check_agent_field,
    check_pools,
    find_program,
    log_level_problem,
)
from lkrun.shared import DAEMON_PYTHON_ENV, pdeathsig
from lkrun.shared.text import last_lines

# What an agent's interpreter must have (as pyproject.toml requires of the daemon's): the
# child side uses Python 3.10's language, and the rtc API of livekit 1.0.
MINIMUM_PYTHON = (3, 10)
MINIMUM_LIVEKIT = (1, 0)

# How long LiveKit waits for the answer to an offer (psrpc's default timeout, less the
# time spent choosing a worker).
LIVEKIT_ANSWER_WAIT = 3.0

# Settings a livekit-agents app may carry, as the AgentSpec fields they become.
APP_SETTINGS = (
    "dispatch",
    "job_type",
    "permissions",
    "idle_processes",
    "memory_limit_mb",
    "prewarm_timeout",
    "shutdown_timeout",
)

# The framework's names for the settings that have one of their own (lkrun.child.framework.app).
APP_SETTING_NAMES = {
    "idle_processes": "num_idle_processes",
    "memory_limit_mb": "job_memory_limit_mb",
    "prewarm_timeout": "initialize_process_timeout",
    "shutdown_timeout": "shutdown_process_timeout",
}


def check_entrypoints(manifest: Manifest, *, timeout: float = 60.0) -> Manifest:
    """Import every agent's entrypoint (and prewarm) in fresh subprocesses; raise
    ManifestError for the first failure, else return the manifest with each agent's app
    filled in and its settings applied.

    The code is imported with the environment its jobs get (the agent's ``env``; no API
    secret unless ``pass_credentials``): an app may read its settings from there, and
    importing it must not hand it what its jobs would not have. Agents that share an
    environment share one subprocess.
    """
    agents = [spec for spec in manifest.agents.values() if not spec.command]
    groups: dict[tuple[Any, ...], list[AgentSpec]] = {}
    for spec in agents:
        key = (tuple(spec.env.items()), spec.pass_credentials, spec.python)
        groups.setdefault(key, []).append(spec)
    # A command agent runs no Python of ours: its program is looked up, not imported.
    checked = [
        {spec.name: check_command(manifest, spec)}
        for spec in manifest.agents.values()
        if spec.command
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(groups))) as pool:
        futures = [pool.submit(_check_group, manifest, group, timeout) for group in groups.values()]
        checked += [f.result() for f in futures]  # re-raises a failed check's ManifestError
    found: dict[str, AgentSpec] = {}
    for group in checked:
        found.update(group)
    resolved = {name: found[name] for name in manifest.agents}  # in file order
    try:
        check_pools(manifest.path, resolved.values())
    except ManifestError as exc:
        spec = resolved.get(exc.agent or "")
        if spec is not None and spec.app is not None and "dispatch" in spec.app.applied:
            exc.message += ' (its app names no agent: set dispatch = "explicit" here)'
        raise
    return dataclasses.replace(manifest, agents=FrozenMap(resolved))


def _check_group(
    manifest: Manifest, agents: list[AgentSpec], timeout: float
) -> dict[str, AgentSpec]:
    """Check agents that share one environment in one subprocess; first failure raises."""
    entrypoints = list(dict.fromkeys((a.entrypoint, a.framework) for a in agents))
    callables = list(dict.fromkeys(a.prewarm for a in agents if a.prewarm))
    request = {"entrypoints": entrypoints, "callables": callables}
    env = _check_env(manifest.path, manifest.workdir, agents[0])
    _check_log_level(manifest.path, agents[0], env)
    results = _run_importcheck(manifest, request, timeout, env, agents[0])
    runtime = results.get("env")
    runtime = runtime if isinstance(runtime, dict) else {}
    _check_runtime(manifest.path, agents[0], runtime, _own_lkrun(agents[0]))
    found = dict(zip(entrypoints, _list(results.get("entrypoints")), strict=False))
    prewarms = results.get("callables")
    prewarms = prewarms if isinstance(prewarms, dict) else {}
    resolved: dict[str, AgentSpec] = {}
    for spec in agents:
        entry = found.get((spec.entrypoint, spec.framework)) or {"error": "was not checked"}
        if entry.get("error") is not None:
            error = _without_framework(spec, str(entry["error"]), runtime)
            field = "python" if error != entry["error"] else "entrypoint"
            raise ManifestError(manifest.path, error, agent=spec.name, field=field)
        if spec.prewarm and (error := prewarms.get(spec.prewarm, "was not checked")) is not None:
            raise ManifestError(manifest.path, str(error), agent=spec.name, field="prewarm")
        resolved[spec.name] = apply_app(manifest.path, spec, entry.get("app") or {}, runtime)
    return resolved


def _own_lkrun(spec: AgentSpec) -> Path:
    """The lkrun package the agent's processes must import: the child side's copy for an
    agent on its own Python (put first on its PYTHONPATH), else the daemon's own."""
    if spec.python is not None:
        return interpreter.child_side_dir() / "lkrun"  # made already, by _check_env
    return interpreter.PACKAGE


def _check_runtime(
    path: Path, spec: AgentSpec, runtime: Mapping[str, Any], own_lkrun: Path
) -> None:
    """What every agent needs of its interpreter: Python 3.10 or later, this daemon's lkrun
    (``own_lkrun``: the copy the daemon put on its path, or the daemon's package; the
    version alone does not tell, it is the same across commits) and livekit's rtc 1.0 or
    later; one line naming what to install if not."""
    python = spec.interpreter
    if _older(str(runtime.get("python_version") or ""), MINIMUM_PYTHON):
        message = (
            f"python {python} is Python {runtime['python_version']}; lkrun's child side needs "
            f"{_dotted(MINIMUM_PYTHON)} or later: install a newer Python and make the agent's "
            "env with it"
        )
        raise ManifestError(path, message, agent=spec.name, field="python")
    version = runtime.get("lkrun")
    where = str(runtime.get("lkrun_path") or "?")
    if version != __version__ or os.path.realpath(where) != os.path.realpath(own_lkrun):
        cause = (
            "does the interpreter ignore PYTHONPATH (a wrapper with -E or -I)?"
            if spec.python is not None
            else "is there another lkrun in the manifest's directory or on PYTHONPATH?"
        )
        message = (
            f"python {python} imports lkrun {version} from {where}, not this daemon's "
            f"{__version__} from {own_lkrun}: {cause}"
        )
        field = "python" if spec.python is not None else None
        raise ManifestError(path, message, agent=spec.name, field=field)
    if runtime.get("livekit") is None:
        why = runtime.get("livekit_error") or "not found"
        message = (
            f"python {python} cannot import livekit (rtc): {why}; "
            f"{interpreter.install_hint(python, 'livekit')}"
        )
        raise ManifestError(path, message, agent=spec.name, field="python")
    if _older(str(runtime["livekit"]), MINIMUM_LIVEKIT):
        wanted = f"'livekit>={_dotted(MINIMUM_LIVEKIT)}'"
        message = (
            f"python {python} imports livekit {runtime['livekit']}; lkrun needs "
            f"{_dotted(MINIMUM_LIVEKIT)} or later: {interpreter.install_hint(python, wanted)}"
        )
        raise ManifestError(path, message, agent=spec.name, field="python")


def _older(version: str, minimum: tuple[int, int]) -> bool:
    """Whether ``version`` ("3.9.18", "0.18.1") is below ``minimum``; False if it does not
    start with two numbers (not known to be too old)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) < minimum


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def _without_framework(spec: AgentSpec, error: str, runtime: Mapping[str, Any]) -> str:
    """An entrypoint error that comes down to livekit-agents missing from an agent's own
    env, said in its terms: the child's hint (``pip install 'lkrun[agents]'``) is for the
    daemon's env. Any other error as it is."""
    missing = runtime.get("livekit_agents") is None and (
        "livekit.agents" in error or "livekit-agents" in error
    )
    if spec.python is None or not missing:
        return error
    python = spec.interpreter
    return (
        f"python {python} cannot import livekit.agents, which {spec.entrypoint} needs; "
        f"{interpreter.install_hint(python, 'livekit-agents')}"
    )


def check_command(manifest: Manifest, spec: AgentSpec) -> AgentSpec:
    """A command agent's program, found as its jobs will find it (a bare name on the job's
    PATH): ``spec`` with its app filled in, or ManifestError naming the program."""
    env = {**os.environ, **spec.env}
    program, problem = find_program(spec.command[0], env.get("PATH"))
    if problem:
        message = f"cannot run {spec.command[0]}: {problem}"
        raise ManifestError(manifest.path, message, agent=spec.name, field="command")
    info = AppInfo(framework=COMMAND, kind=COMMAND, command=(program, *spec.command[1:]))
    return dataclasses.replace(spec, app=info)


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def apply_app(
    path: Path,
    spec: AgentSpec,
    app: Mapping[str, Any],
    runtime: Mapping[str, Any] | None = None,
) -> AgentSpec:
    """``spec`` with ``app`` (what the import check found) and the app's settings applied
    wherever the manifest does not set the field itself; ``runtime`` is what the check
    found of the interpreter (its ``env`` report)."""
    runtime = runtime or {}
    settings = app.get("settings") or {}
    changes: dict[str, Any] = {}
    for name in APP_SETTINGS:
        if name in settings and name not in spec.explicit:
            try:
                value = check_agent_field(name, settings[name])
            except ValueError as exc:  # validated as strictly as the manifest's own values
                setting = APP_SETTING_NAMES.get(name, "setting for it")
                message = f"the app's {setting} is unusable: {exc}"
                raise ManifestError(path, message, agent=spec.name, field=name) from None
            if getattr(spec, name) != value:
                changes[name] = value
    warnings = list(app.get("warnings") or ())
    if app.get("on_request") and spec.request_timeout >= LIVEKIT_ANSWER_WAIT:
        warnings.append(
            f"request_timeout={spec.request_timeout:g}s: LiveKit waits about "
            f"{LIVEKIT_ANSWER_WAIT:g}s for an answer, so a slower on_request loses the offer"
        )
    agent_name = app.get("agent_name")
    if agent_name and agent_name != spec.name:
        warnings.append(
            f"the app's agent_name {agent_name!r} is not used: lkrun registers this agent as "
            f"{spec.name!r}, its key in the manifest"
        )
    info = AppInfo(
        framework=str(app.get("framework", spec.framework)),
        kind=str(app.get("kind", "function")),
        version=str(app.get("version", "")),
        agent_name=agent_name if isinstance(agent_name, str) else None,
        setup=bool(app.get("setup")) or bool(spec.prewarm),
        on_request=bool(app.get("on_request")),
        on_session_end=bool(app.get("on_session_end")),
        applied=tuple(changes),
        warnings=tuple(warnings),
        python_version=str(runtime.get("python_version") or ""),
        livekit_version=str(runtime.get("livekit") or ""),
        runners=_runners(app.get("runners")),
    )
    return dataclasses.replace(spec, **changes, app=info)


def _runners(found: Any) -> tuple[tuple[str, str], ...]:
    """The inference runners the check found, as (method, class) pairs."""
    return tuple(
        (str(r["method"]), str(r["class"]))
        for r in _list(found)
        if isinstance(r, dict) and r.get("method") and r.get("class")
    )


def _check_env(path: Path, workdir: Path, spec: AgentSpec) -> dict[str, str]:
    """The environment the agent's jobs get, as far as it is known before connecting."""
    env = child_env(os.environ, pass_credentials=spec.pass_credentials)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([str(workdir), existing] if existing else [str(workdir)])
    env[DAEMON_PYTHON_ENV] = sys.executable  # as job_env: its install hints
    env.update(spec.env)
    if spec.python is not None:  # as lkrun.supervision.agent_processes.job_env does
        try:
            interpreter.own_python_env(env, workdir=workdir, agent_env=spec.env)
        except interpreter.ChildSideError as exc:
            raise ManifestError(path, str(exc), agent=spec.name, field="python") from None
    return env


def _check_log_level(path: Path, spec: AgentSpec, env: Mapping[str, str]) -> None:
    """The manifest checks the level its ``env`` sets; jobs also inherit the daemon's."""
    level = env.get(JOB_LOG_LEVEL_ENV)
    if level is None or (problem := log_level_problem(level)) is None:
        return
    message = f"{JOB_LOG_LEVEL_ENV} in the daemon's environment {problem}; every job would fail"
    raise ManifestError(path, message, agent=spec.name, field="env")


def _run_importcheck(
    manifest: Manifest,
    request: dict[str, Any],
    timeout: float,
    env: dict[str, str],
    spec: AgentSpec,
) -> dict[str, Any]:
    """Run the check under ``spec``'s interpreter (that of every agent of the group)."""
    # stderr goes to a file, not a pipe: a process spawned by user code could hold a pipe open
    # long after the check has finished.
    with tempfile.TemporaryFile() as errors:
        try:
            proc = subprocess.Popen(
                [spec.interpreter, "-m", "lkrun.child.importcheck", json.dumps(request)],
                cwd=manifest.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=errors,
                start_new_session=True,  # so a timeout can kill whatever user code started too
            )
        except OSError as exc:  # e.g. not an executable format, or it vanished since parsing
            message = f"cannot run python {spec.interpreter}: {exc.strerror or exc}"
            raise ManifestError(manifest.path, message, agent=spec.name, field="python") from None
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            message = (
                f"importing the entrypoints took longer than {timeout:g}s; does a module block?"
            )
            raise ManifestError(manifest.path, message) from None
        errors.seek(0)
        stderr = errors.read().decode("utf-8", "replace")
    return _parse_results(manifest, proc.returncode, out, stderr, spec)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if not pdeathsig.signal_group(proc.pid, signal.SIGKILL):
        proc.kill()  # the group is already gone
    proc.communicate()


def _parse_results(
    manifest: Manifest, code: int, out: bytes, stderr: str, spec: AgentSpec
) -> dict[str, Any]:
    try:
        results = json.loads(out)
    except ValueError:
        results = None
    if code != 0 or not isinstance(results, dict):
        last = last_lines(stderr) or "no output"
        message = f"the entrypoint check failed (exit code {code}): {last}"
        if spec.python is None:
            raise ManifestError(manifest.path, message)
        # Under an agent's own interpreter, most likely the interpreter is the cause (a
        # Python older than lkrun's child side supports, one that ignores PYTHONPATH).
        message = (
            f"python {spec.interpreter}: {message} (lkrun's child side needs Python "
            f"{_dotted(MINIMUM_PYTHON)} or later)"
        )
        raise ManifestError(manifest.path, message, agent=spec.name, field="python")
    return results
