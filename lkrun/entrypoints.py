"""The entrypoint check: import every agent's code in a subprocess and learn what it is.

The daemon never imports user code itself: a broken or slow module must not take it down.
The subprocess (lkrun.importcheck) reports, per agent, whether its entrypoint and prewarm
load and what the entrypoint is (an lkrun function or a livekit-agents app, see
lkrun.apps). ``check_entrypoints`` turns that into the manifest the daemon runs: each agent
gets its ``app``, and a livekit-agents app's own settings (agent name, server type,
permissions, idle processes, limits, timeouts) fill in what the manifest leaves unset.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lkrun.manifest import (
    AgentSpec,
    AppInfo,
    FrozenMap,
    Manifest,
    ManifestError,
    Permissions,
    check_pools,
)

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


def check_entrypoints(manifest: Manifest, *, timeout: float = 60.0) -> Manifest:
    """Import every agent's entrypoint (and prewarm) in one fresh subprocess; raise
    ManifestError for the first failure, else return the manifest with each agent's app
    filled in and its settings applied."""
    agents = list(manifest.agents.values())
    entrypoints = list(dict.fromkeys((a.entrypoint, a.framework) for a in agents))
    callables = list(dict.fromkeys(a.prewarm for a in agents if a.prewarm))
    request = {"entrypoints": entrypoints, "callables": callables}
    results = _run_importcheck(manifest, request, timeout)
    found = dict(zip(entrypoints, _list(results.get("entrypoints")), strict=False))
    prewarms = results.get("callables")
    prewarms = prewarms if isinstance(prewarms, dict) else {}
    resolved: dict[str, AgentSpec] = {}
    for spec in agents:
        entry = found.get((spec.entrypoint, spec.framework)) or {"error": "was not checked"}
        if entry.get("error") is not None:
            raise ManifestError(
                manifest.path, str(entry["error"]), agent=spec.name, field="entrypoint"
            )
        if spec.prewarm and (error := prewarms.get(spec.prewarm, "was not checked")) is not None:
            raise ManifestError(manifest.path, str(error), agent=spec.name, field="prewarm")
        resolved[spec.name] = apply_app(manifest.path, spec, entry.get("app") or {})
    check_pools(manifest.path, resolved.values())
    return dataclasses.replace(manifest, agents=FrozenMap(resolved))


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def apply_app(path: Path, spec: AgentSpec, app: Mapping[str, Any]) -> AgentSpec:
    """``spec`` with ``app`` (what the import check found) and the app's settings applied
    wherever the manifest does not set the field itself."""
    settings = app.get("settings") or {}
    changes: dict[str, Any] = {}
    for name in APP_SETTINGS:
        if name in settings and name not in spec.explicit:
            value = settings[name]
            if name == "permissions":
                try:
                    value = Permissions(**value)
                except TypeError as exc:
                    raise ManifestError(
                        path,
                        f"unusable permissions {value!r}: {exc}",
                        agent=spec.name,
                        field="entrypoint",
                    ) from None
            if getattr(spec, name) != value:
                changes[name] = value
    warnings = list(app.get("warnings") or ())
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
    )
    return dataclasses.replace(spec, **changes, app=info)


def _importcheck_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([str(workdir), existing] if existing else [str(workdir)])
    return env


def _run_importcheck(manifest: Manifest, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    # stderr goes to a file, not a pipe: a process spawned by user code could hold a pipe open
    # long after the check has finished.
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lkrun.importcheck", json.dumps(request)],
            cwd=manifest.workdir,
            env=_importcheck_env(manifest.workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errors,
            start_new_session=True,  # so a timeout can kill whatever user code started too
        )
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
    return _parse_results(manifest, proc.returncode, out, stderr)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()  # no process groups (Windows) or the group is already gone
    proc.communicate()


def _parse_results(manifest: Manifest, code: int, out: bytes, stderr: str) -> dict[str, Any]:
    try:
        results = json.loads(out)
    except ValueError:
        results = None
    if code != 0 or not isinstance(results, dict):
        last = stderr.strip().splitlines()[-1:] or ["no output"]
        message = f"the entrypoint check failed (exit code {code}): {last[0]}"
        raise ManifestError(manifest.path, message)
    return results
