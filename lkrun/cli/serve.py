"""`lkrun check` and `lkrun serve`."""

from __future__ import annotations

import dataclasses
import json
import socket
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer

from lkrun import credentials, interpreter, paths
from lkrun.api import control
from lkrun.cli.common import (
    EXIT_USAGE,
    JsonOpt,
    SocketOpt,
    app,
    duration_option,
    err,
    fail,
    out,
    run_async,
)
from lkrun.entrypoints import check_entrypoints
from lkrun.jobs.statelock import StateLock
from lkrun.manifest import (
    AgentSpec,
    DaemonSettings,
    Manifest,
    ManifestError,
    format_duration,
    load_manifest,
    parse_host_port,
)

_DEFAULTS = DaemonSettings()


def _load(manifest_path: Path, state_dir: Path | None = None) -> Manifest:
    """The manifest, its entrypoints checked; ``state_dir``: the daemon's (--state-dir)."""
    try:
        manifest = _configured(load_manifest(manifest_path), state_dir)
        manifest = check_entrypoints(manifest)
    except ManifestError as exc:
        fail(str(exc), EXIT_USAGE)
    return manifest


def _configured(manifest: Manifest, state_dir: Path | None = None) -> Manifest:
    """Before the first check: lkrun's child side is read from disk now, and its copy for
    agents on their own Python may go to the daemon's state directory."""
    interpreter.configure(state_dir or manifest.daemon.state_dir or paths.state_dir())
    return manifest


@app.command()
def check(
    manifest: Annotated[Path, typer.Argument(help="The agents manifest (TOML).")],
    as_json: JsonOpt = False,
) -> None:
    """Validate a manifest, importing each entrypoint in a subprocess, without connecting."""
    if as_json:
        _check_json(manifest)
        return
    loaded = _load(manifest)
    out.print(
        f"{manifest}: {len(loaded.agents)} agent(s) OK: {', '.join(loaded.agents)}", markup=False
    )
    for spec in loaded.agents.values():
        app_line = spec.app.summary() if spec.app is not None else spec.framework
        if not spec.command:  # a command agent runs no Python of ours
            app_line += f"; {python_line(spec)}"
        out.print(f"  {spec.name}: {app_line}", markup=False)
    _warn_app_settings(loaded)


def _check_json(manifest_path: Path) -> None:
    """`check --json`: one object, also for a refused manifest (then exit 2). The check
    stops at the first error, so agents it did not reach have "ok": null."""
    report: dict[str, Any] = {"manifest": str(manifest_path), "ok": True, "errors": []}
    try:
        loaded = _configured(load_manifest(manifest_path))
        # Listed before the import check, so that a refusal still names every agent.
        report["agents"] = [_agent_report(spec) for spec in loaded.agents.values()]
        checked = check_entrypoints(loaded)
        report["agents"] = [_agent_report(spec, ok=True) for spec in checked.agents.values()]
    except ManifestError as exc:
        error = {"agent": exc.agent, "field": exc.field, "message": exc.message, "text": str(exc)}
        report.update(ok=False, errors=[error])
        for agent in report.setdefault("agents", []):
            if agent["name"] == exc.agent:
                agent.update(ok=False, error=exc.message)
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    if not report["ok"]:
        raise typer.Exit(EXIT_USAGE)


def _agent_report(spec: AgentSpec, ok: bool | None = None) -> dict[str, Any]:
    info = spec.app
    return {
        "name": spec.name,
        "entrypoint": spec.entrypoint or None,
        "command": list(spec.command) or None,
        "dispatch": spec.dispatch,
        "framework": info.framework if info is not None else spec.framework,
        "kind": info.kind if info is not None else None,
        "version": (info.version or None) if info is not None else None,
        "app": info.summary() if info is not None else None,
        "python": None if spec.command else spec.interpreter,
        "python_version": (info.python_version or None) if info is not None else None,
        "livekit_version": (info.livekit_version or None) if info is not None else None,
        "warnings": list(info.warnings) if info is not None else [],
        # The inference runners its code registers (its env's inference process runs them).
        "runners": [
            {"method": method, "class": source}
            for method, source in (info.runners if info is not None else ())
        ],
        "ok": ok,
        "error": None,
    }


def python_line(spec: AgentSpec) -> str:
    """The interpreter an agent's code runs under, and the versions the check found."""
    info = spec.app
    details = ""
    if info is not None:
        found = [info.python_version, info.livekit_version and f"livekit {info.livekit_version}"]
        details = ", ".join(part for part in found if part)
    return f"python {spec.interpreter}" + (f" ({details})" if details else "")


def _warn_app_settings(manifest: Manifest) -> None:
    """What the import check found worth saying about the agents' apps, on stderr."""
    out.file.flush()
    for spec in manifest.agents.values():
        for warning in spec.app.warnings if spec.app is not None else ():
            err.print(f"warning: {manifest.path}: agent {spec.name!r}: {warning}", markup=False)


@app.command()
def serve(
    manifest: Annotated[Path, typer.Argument(help="The agents manifest (TOML).")],
    url: Annotated[
        str | None, typer.Option(help="LiveKit URL [default: manifest, then $LIVEKIT_URL].")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(help="LiveKit API key [default: manifest, then $LIVEKIT_API_KEY]."),
    ] = None,
    control_socket: SocketOpt = None,
    drain_timeout: Annotated[
        str | None,
        typer.Option(
            help="How long jobs may run on after SIGTERM, e.g. 30m "
            f"[manifest: {format_duration(_DEFAULTS.drain_timeout)}]."
        ),
    ] = None,
    shutdown_timeout: Annotated[
        str | None,
        typer.Option(
            help="How long a job gets after a shutdown request, e.g. 10s "
            f"[manifest: {format_duration(_DEFAULTS.shutdown_timeout)}]."
        ),
    ] = None,
    http_addr: Annotated[
        str | None,
        typer.Option(
            help="Health endpoint HOST:PORT, or '' to turn it off "
            f"[manifest: {_DEFAULTS.http_addr}]."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="This daemon's name in status, job listings, metrics and JSON logs, and on "
            "its agents' participants [manifest, else the host name]."
        ),
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            help="Directory for the job history and job logs; one per daemon when several "
            "run on one host [manifest, else $XDG_STATE_HOME/lkrun]."
        ),
    ] = None,
    reload: Annotated[
        bool, typer.Option("--reload/--no-reload", help="Apply manifest edits while running.")
    ] = True,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[
        str | None,
        typer.Option(help="pretty or json [default: pretty on a terminal, json otherwise]."),
    ] = None,
) -> None:
    """Run the daemon: register every agent of MANIFEST and run their jobs.

    With no LiveKit URL configured (flag, manifest or LIVEKIT_URL), a local
    livekit-server is installed and started in dev mode for the daemon's lifetime.
    """
    from lkrun.logs import FORMATS, name_daemon, setup_logging

    if log_format is not None and log_format not in FORMATS:
        fail(f"--log-format must be {' or '.join(FORMATS)}, got {log_format!r}", EXIT_USAGE)
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        fail(f"--log-level must be debug, info, warning or error, got {log_level!r}", EXIT_USAGE)
    setup_logging(log_level, log_format)
    loaded = _load(manifest, state_dir.absolute() if state_dir is not None else None)
    _warn_app_settings(loaded)
    settings = _daemon_settings(loaded, drain_timeout, shutdown_timeout, http_addr)
    if name is not None:
        settings = dataclasses.replace(settings, name=name)
    if state_dir is not None:
        settings = dataclasses.replace(settings, state_dir=state_dir.absolute())
    name_daemon(settings.name or socket.gethostname())
    with ExitStack() as stack:
        # First: a second daemon on this state directory starts nothing (not even a server).
        lock = _lock_state_dir(settings)
        stack.callback(lock.release)
        creds, children = _serve_credentials(loaded, url, api_key, stack)
        socket_path = (
            control_socket or loaded.daemon.control_socket or control.default_socket_path()
        )
        _run_daemon(
            loaded,
            creds,
            socket_path,
            settings,
            reload=reload,
            own_children=children,
            state_lock=lock,
        )


def _lock_state_dir(settings: DaemonSettings) -> StateLock:
    from lkrun.daemon import FatalError, lock_state_dir, state_dir_of

    try:
        return lock_state_dir(state_dir_of(settings))
    except FatalError as exc:
        fail(str(exc))


def _daemon_settings(
    manifest: Manifest, drain: str | None, shutdown: str | None, http_addr: str | None
) -> DaemonSettings:
    """The manifest's [daemon] settings, each overridden by its flag when given."""
    overrides: dict[str, Any] = {}
    if drain is not None:
        overrides["drain_timeout"] = duration_option("--drain-timeout", drain)
    if shutdown is not None:
        overrides["shutdown_timeout"] = duration_option("--shutdown-timeout", shutdown)
    if http_addr is not None:
        if http_addr:
            try:
                parse_host_port(http_addr)
            except ValueError as exc:
                fail(f"invalid option: {exc}", EXIT_USAGE)
        overrides["http_addr"] = http_addr
    return dataclasses.replace(manifest.daemon, **overrides)


def _serve_credentials(
    manifest: Manifest, url: str | None, api_key: str | None, stack: ExitStack
) -> tuple[credentials.Credentials, tuple[int, ...]]:
    """The credentials, and the pid of the dev server started for them (if one was)."""
    try:
        creds = credentials.resolve(
            url=url,
            api_key=api_key,
            manifest_url=manifest.livekit.url,
            manifest_key=manifest.livekit.api_key,
            manifest_secret=manifest.livekit.api_secret,
        )
    except credentials.CredentialsError as exc:
        fail(str(exc), EXIT_USAGE)
    if creds is not None:
        return creds, ()
    return _start_dev_server(stack)


def _start_dev_server(stack: ExitStack) -> tuple[credentials.Credentials, tuple[int, ...]]:
    from lkrun import devserver

    try:
        binary = devserver.ensure_server_binary(on_build=lambda msg: err.print(msg, markup=False))
        server = devserver.DevServer(binary)
        err.print(
            f"no LiveKit URL configured: starting livekit-server in dev mode at {server.url} "
            f"(log: {server.log_path or paths.cache_dir() / 'livekit-server.log'})",
            markup=False,
        )
        server.start()
    except devserver.DevServerError as exc:
        fail(str(exc))
    stack.callback(server.stop)
    creds = credentials.Credentials(server.url, server.api_key, server.api_secret)
    return creds, (server.pid,) if server.pid is not None else ()


def _run_daemon(
    manifest: Manifest,
    creds: credentials.Credentials,
    socket_path: Path,
    settings: DaemonSettings,
    *,
    reload: bool,
    own_children: tuple[int, ...],
    state_lock: StateLock,
) -> None:
    from lkrun.api.health import HealthError
    from lkrun.daemon import Daemon, DaemonConfig, FatalError

    config = DaemonConfig(
        manifest=manifest,
        credentials=creds,
        control_socket=socket_path,
        settings=settings,
        reload=reload,
        own_children=own_children,
    )
    try:
        run_async(Daemon(config, state_lock=state_lock).serve())
    except (FatalError, control.ControlError, HealthError) as exc:
        fail(str(exc))
