"""The `lkrun` command line."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from lkrun import __version__, control, credentials
from lkrun.manifest import Manifest, ManifestError, check_entrypoints, load_manifest

app = typer.Typer(
    help="Host many LiveKit agents from one manifest, one subprocess per job.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
jobs_app = typer.Typer(help="Inspect the jobs of the running daemon.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")

err = Console(stderr=True, highlight=False, soft_wrap=True)
# Piped output is read by scripts and grep: don't wrap it at 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 400)

EXIT_USAGE = 2  # bad manifest or bad configuration
EXIT_FAILURE = 1

UrlOpt = Annotated[
    str | None, typer.Option("--url", envvar="LIVEKIT_URL", show_envvar=True, help="LiveKit URL.")
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LIVEKIT_API_KEY", show_envvar=True, help="LiveKit API key."),
]
SocketOpt = Annotated[
    Path | None,
    typer.Option(
        "--control-socket",
        envvar=control.ENV_SOCKET,
        show_envvar=True,
        help="The daemon's control socket [default: $XDG_RUNTIME_DIR/lkrun/control.sock].",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    err.print(f"error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"lkrun {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    pass


def _load(manifest_path: Path) -> Manifest:
    try:
        manifest = load_manifest(manifest_path)
        check_entrypoints(manifest)
    except ManifestError as exc:
        fail(str(exc), EXIT_USAGE)
    return manifest


@app.command()
def check(manifest: Annotated[Path, typer.Argument(help="The agents manifest (TOML).")]) -> None:
    """Validate a manifest, importing each entrypoint in a subprocess, without connecting."""
    loaded = _load(manifest)
    out.print(f"{manifest}: {len(loaded.agents)} agent(s) OK: {', '.join(loaded.agents)}")


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
        typer.Option(help="How long jobs may run on after SIGTERM, e.g. 30m [manifest: 30m]."),
    ] = None,
    shutdown_timeout: Annotated[
        str | None,
        typer.Option(
            help="How long a job gets after a shutdown request, e.g. 10s [manifest: 10s]."
        ),
    ] = None,
    http_addr: Annotated[
        str | None,
        typer.Option(
            help="Health endpoint HOST:PORT, or '' to turn it off [manifest: 127.0.0.1:8081]."
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
    from lkrun.logs import setup_logging

    if log_format not in (None, "pretty", "json"):
        fail(f"--log-format must be pretty or json, got {log_format!r}", EXIT_USAGE)
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        fail(f"--log-level must be debug, info, warning or error, got {log_level!r}", EXIT_USAGE)
    setup_logging(log_level, log_format)
    loaded = _load(manifest)
    options = _daemon_options(loaded, drain_timeout, shutdown_timeout, http_addr)
    with ExitStack() as stack:
        creds = _serve_credentials(loaded, url, api_key, stack)
        socket_path = (
            control_socket or loaded.daemon.control_socket or control.default_socket_path()
        )
        _run_daemon(loaded, creds, socket_path, reload=reload, **options)


def _daemon_options(
    manifest: Manifest, drain: str | None, shutdown: str | None, http_addr: str | None
) -> dict[str, Any]:
    """[daemon] settings, each overridden by its flag when given."""
    from lkrun.manifest import parse_host_port

    daemon = manifest.daemon
    try:
        addr = daemon.http_addr if http_addr is None else http_addr
        return {
            "drain_timeout": (
                daemon.drain_timeout
                if drain is None
                else _duration_option("--drain-timeout", drain)
            ),
            "shutdown_timeout": (
                daemon.shutdown_timeout
                if shutdown is None
                else _duration_option("--shutdown-timeout", shutdown)
            ),
            "http_addr": parse_host_port(addr) if addr else None,
            "load_threshold": daemon.load_threshold,
            "database": daemon.database,
            "log_dir": daemon.log_dir,
            "history_retention": daemon.history_retention,
            "job_log_max_bytes": daemon.job_log_max_mb * 1024 * 1024,
        }
    except ValueError as exc:
        fail(f"invalid option: {exc}", EXIT_USAGE)


def _serve_credentials(
    manifest: Manifest, url: str | None, api_key: str | None, stack: ExitStack
) -> credentials.Credentials:
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
        return creds
    return _start_dev_server(stack)


def _start_dev_server(stack: ExitStack) -> credentials.Credentials:
    from lkrun import devserver

    try:
        binary = devserver.ensure_server_binary(on_build=lambda msg: err.print(msg, markup=False))
        server = devserver.DevServer(binary)
        err.print(
            f"no LiveKit URL configured: starting livekit-server in dev mode at {server.url} "
            f"(log: {server.log_path or devserver.cache_dir() / 'livekit-server.log'})",
            markup=False,
        )
        server.start()
    except devserver.DevServerError as exc:
        fail(str(exc))
    stack.callback(server.stop)
    return credentials.Credentials(server.url, server.api_key, server.api_secret)


def _run_daemon(
    manifest: Manifest, creds: credentials.Credentials, socket_path: Path, **options: Any
) -> None:
    from lkrun.daemon import Daemon, DaemonConfig, FatalError
    from lkrun.health import HealthError

    config = DaemonConfig(
        manifest=manifest, credentials=creds, control_socket=socket_path, **options
    )
    try:
        run_async(Daemon(config).serve())
    except (FatalError, control.ControlError, HealthError) as exc:
        fail(str(exc))


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _client_credentials(url: str | None, api_key: str | None) -> credentials.Credentials:
    try:
        creds = credentials.resolve(url=url, api_key=api_key)
    except credentials.CredentialsError as exc:
        fail(str(exc), EXIT_USAGE)
    if creds is not None:
        return creds
    from lkrun import devserver

    # Like `lk --dev`: with nothing configured, talk to the dev server `lkrun serve` starts.
    return credentials.Credentials(
        "http://127.0.0.1:7880", devserver.DEV_API_KEY, devserver.DEV_API_SECRET
    )


@app.command()
def dispatch(
    room: Annotated[str, typer.Option("--room", help="Room to send the agent to.")],
    agent: Annotated[str, typer.Option("--agent", help="Agent name, as registered.")],
    metadata: Annotated[str, typer.Option(help="Metadata passed to the job.")] = "",
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until a job of the dispatch is running.")
    ] = False,
    timeout: Annotated[str, typer.Option(help="With --wait: how long, e.g. 30s.")] = "30s",
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    control_socket: SocketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask LiveKit to send AGENT to ROOM (creating the room if needed)."""
    from lkrun.dispatch import DispatchError, WaitTimeout, create_dispatch, wait_running

    creds = _client_credentials(url, api_key)
    limit = _duration_option("--timeout", timeout)

    async def run() -> tuple[Any, Any]:
        started = asyncio.get_running_loop().time()
        created = await create_dispatch(creds, room=room, agent=agent, metadata=metadata)
        if not wait:
            return created, None
        try:
            return created, await wait_running(creds, created, started=started, timeout=limit)
        except WaitTimeout:
            return created, None

    try:
        created, running = run_async(run())
    except DispatchError as exc:
        fail(str(exc))
    result: dict[str, Any] = {
        "dispatch_id": created.id,
        "agent": created.agent,
        "room": created.room,
        "metadata": created.metadata,
    }
    if running is not None:
        result.update(
            job_id=running.job_id,
            participant_identity=running.participant_identity,
            worker_id=running.worker_id,
            seconds=round(running.seconds, 3),
        )
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    elif running is None:
        out.print(created.id)
    else:
        out.print(
            f"{created.id}: job {running.job_id} running after {running.seconds:.2f}s "
            f"(participant {running.participant_identity})"
        )
    if wait and running is None:
        _explain_timeout(agent, room, created.id, limit, control_socket)


def _explain_timeout(
    agent: str, room: str, dispatch_id: str, limit: float, socket_path: Path | None
) -> NoReturn:
    from lkrun.dispatch import diagnose

    try:
        local = control.request(socket_path or control.default_socket_path(), "/v1/status")
    except control.ControlError:
        local = None
    err.print(
        f"error: no job of dispatch {dispatch_id} was running after {limit:g}s; most likely:",
        markup=False,
    )
    for reason in diagnose(agent, room, local):
        err.print(f"  - {reason}", markup=False)
    raise typer.Exit(EXIT_FAILURE)


def _duration_value(text: str) -> float:
    from lkrun.manifest import parse_duration

    try:
        return parse_duration(float(text))  # a bare number means seconds
    except ValueError:
        return parse_duration(text)


def _duration_option(flag: str, text: str) -> float:
    try:
        return _duration_value(text)
    except ValueError as exc:
        fail(f"{flag}: {exc}", EXIT_USAGE)


def _ask_daemon(
    socket_path: Path | None,
    route: str,
    params: dict[str, str] | None = None,
    *,
    method: str = "GET",
) -> Any:
    try:
        return control.request(
            socket_path or control.default_socket_path(), route, params, method=method
        )
    except control.ControlError as exc:
        fail(str(exc))


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _since(text: str) -> float:
    """A duration ago ("1h", "30m") or an ISO date/time ("2026-11-24T08:00")."""
    from datetime import datetime

    try:
        return time.time() - _duration_value(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        fail(
            f"--since: expected a duration such as 1h or a date such as 2026-11-24T08:00, "
            f"got {text!r}",
            EXIT_USAGE,
        )


def _jobs_table(jobs: list[dict[str, Any]], *, usage: bool) -> Table:
    table = Table(box=None, pad_edge=False)
    columns = ["JOB ID", "AGENT", "ROOM", "STATUS", "PID", "AGE", "DISPATCH ID"]
    if usage:
        columns += ["CPU", "MEM"]
    for column in columns:
        table.add_column(column, no_wrap=True)
    table.add_column("ERROR", overflow="fold")
    for job in jobs:
        row = [
            job["id"],
            job["agent"],
            job["room"],
            job["status"],
            str(job["pid"] or "-"),
            _age(job.get("age") or 0),
            job["dispatch_id"] or "-",
        ]
        if usage:
            row += [f"{job.get('cpu_percent') or 0:.0f}%", f"{job.get('memory_mb') or 0:.0f}M"]
        table.add_row(*row, job["error"] or "")
    return table


@jobs_app.command("ls")
def jobs_ls(
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Search the whole history, not only running jobs.")
    ] = False,
    status_filter: Annotated[
        list[str] | None,
        typer.Option("--status", help="starting, running, stopping, success, failed or lost."),
    ] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent's jobs.")] = None,
    room: Annotated[str | None, typer.Option(help="Only jobs in this room.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Accepted since: a duration ago (1h) or a date.")
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 100,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Keep a live table of running jobs.")
    ] = False,
    control_socket: SocketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the daemon's running jobs, or search its job history."""
    params: dict[str, str] = {}
    if show_all or status_filter or agent or room or since:
        params = {"all": "1", "limit": str(limit)}
        if status_filter:
            params["status"] = ",".join(status_filter)
        if agent:
            params["agent"] = agent
        if room:
            params["room"] = room
        if since:
            params["since"] = str(_since(since))
    if watch:
        _watch_jobs(control_socket, params)
        return
    jobs = _ask_daemon(control_socket, "/v1/jobs", params)["jobs"]
    if as_json:
        sys.stdout.write(json.dumps(jobs, indent=2) + "\n")
    elif not jobs:
        out.print("no jobs" if params else "no running jobs (--all to search the history)")
    else:
        out.print(_jobs_table(jobs, usage=False))


def _watch_jobs(control_socket: Path | None, params: dict[str, str]) -> None:
    """Redraw the table every second; piped, print one table per second instead."""
    from rich.live import Live

    def table() -> Table:
        jobs = _ask_daemon(control_socket, "/v1/jobs", params)["jobs"]
        drawn = _jobs_table(jobs, usage=True)
        drawn.title = f"{len(jobs)} job(s) at {time.strftime('%H:%M:%S')} (Ctrl-C to stop)"
        return drawn

    try:
        if not out.is_terminal:
            while True:
                out.print(table())
                sys.stdout.flush()
                time.sleep(1.0)
        with Live(console=out, auto_refresh=False) as live:
            while True:
                live.update(table(), refresh=True)
                time.sleep(1.0)
    except KeyboardInterrupt:
        pass


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(help="The job id (AJ_...).")],
    lines: Annotated[int, typer.Option(help="How many of its last log lines.")] = 20,
    control_socket: SocketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Everything about one job, and its last log lines."""
    data = _ask_daemon(control_socket, f"/v1/jobs/{job_id}", {"lines": str(lines)})
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    job = data["job"]
    fields = [
        ("job", job["id"]),
        ("agent", job["agent"]),
        ("room", job["room"]),
        ("status", job["status"]),
        ("error", job.get("error") or "-"),
        ("stop reason", job.get("stop_reason") or "-"),
        ("dispatch", job.get("dispatch_id") or "-"),
        ("identity", job.get("identity") or "-"),
        ("worker", job.get("worker_id") or "-"),
        ("pid", str(job.get("pid") or "-")),
        ("warm process", "yes" if job.get("warm") else "no"),
        ("offered", _when(job.get("offered_at"))),
        ("accepted", _when(job.get("accepted_at"))),
        ("started", _when(job.get("started_at"))),
        ("ended", _when(job.get("ended_at"))),
        (
            "offer to start",
            f"{job['offer_to_start_ms']} ms" if job.get("offer_to_start_ms") is not None else "-",
        ),
        ("exit code", str(job.get("exit_code")) if job.get("exit_code") is not None else "-"),
        ("peak memory", f"{job.get('peak_memory_mb') or 0:.0f} MB"),
    ]
    for key, value in fields:
        out.print(f"{key + ':':<16}{value}", markup=False)
    out.print(f"\nlast {len(data['log'])} log line(s):", markup=False)
    for line in data["log"]:
        out.print(f"  {line}", markup=False)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="The job id (AJ_...).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the job ends.")
    ] = False,
    tail: Annotated[int, typer.Option(help="Start with this many of the last lines.")] = 100,
    control_socket: SocketOpt = None,
) -> None:
    """Print (or follow) one job's own log."""
    path = control_socket or control.default_socket_path()
    params = {"tail": str(tail), "follow": "1" if follow else "0"}

    async def run() -> None:
        async for line in control.stream(path, f"/v1/jobs/{job_id}/logs", params):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    try:
        run_async(run())
    except control.ControlError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


@jobs_app.command("kill")
def jobs_kill(
    job_id: Annotated[str, typer.Argument(help="The job id (AJ_...).")],
    force: Annotated[
        bool, typer.Option("--force", help="Kill at once instead of asking it to shut down.")
    ] = False,
    control_socket: SocketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask a running job to shut down (killed after shutdown_timeout), or kill it at once."""
    params = {"force": "1" if force else "0"}
    data = _ask_daemon(control_socket, f"/v1/jobs/{job_id}/kill", params, method="POST")
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        out.print(f"{job_id}: {data['action']}", markup=False)


@app.command()
def status(control_socket: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """Show the daemon's agents and registrations; exit 0 only when it is ready."""
    data = _ask_daemon(control_socket, "/v1/status")
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        _print_status(data)
    if not data.get("ready", False):
        raise typer.Exit(EXIT_FAILURE)


def _print_status(data: dict[str, Any]) -> None:
    ready = "ready" if data.get("ready") else f"NOT READY ({data.get('not_ready_reason')})"
    out.print(
        f"lkrun {data['version']} pid {data['pid']}, up {_age(data['uptime'])}, {ready}; "
        f"LiveKit {data['url']}, manifest {data['manifest']}",
        markup=False,
    )
    table = Table(box=None, pad_edge=False)
    for column in (
        "AGENT",
        "DISPATCH",
        "REGISTRATION",
        "WORKER ID",
        "SERVER",
        "JOBS",
        "IDLE",
        "LOAD",
        "RECONNECTS",
        "LAST ERROR",
    ):
        table.add_column(column, overflow="fold")
    for a in data["agents"]:
        reg = "connected" if a["connected"] else "down"
        if a.get("retiring"):
            reg += " (retiring)"
        table.add_row(
            a["agent"],
            a["dispatch"],
            reg,
            a["worker_id"] or "-",
            a["server_version"] or "-",
            f"{a['jobs']}/{a['max_jobs']}",
            str(a.get("idle_processes", 0)),
            f"{a['load']:.2f}",
            str(a["reconnects"]),
            a["last_error"] or a.get("warm_error", ""),
        )
    out.print(table)


def main() -> None:
    # PyJWT warns on every token signed with a short secret, such as the dev server's;
    # the secret's length is the server's configuration, not something to repeat per token.
    warnings.filterwarnings("ignore", message="The HMAC key is", category=UserWarning)
    app()
