"""`lkrun jobs ls|show|logs|kill`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from lkrun.api import control
from lkrun.cli.common import (
    EXIT_USAGE,
    JsonOpt,
    SocketOpt,
    age,
    ask_daemon,
    cell,
    duration_value,
    err,
    fail,
    jobs_app,
    out,
    run_async,
    say,
)
from lkrun.cli.memory import print_job_memory
from lkrun.jobs.fields import STATUSES
from lkrun.shared.text import printable


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _since(text: str) -> float:
    """A duration ago ("1h", "30m") or an ISO date/time ("2026-11-24T08:00")."""
    from datetime import datetime

    try:
        return time.time() - duration_value(text)
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
            age(job.get("age") or 0),
            job["dispatch_id"] or "-",
        ]
        if usage:
            row += [f"{job.get('cpu_percent') or 0:.0f}%", f"{job.get('memory_mb') or 0:.0f}M"]
        table.add_row(*(cell(value) for value in (*row, job["error"] or "")))
    return table


@jobs_app.command("ls")
def jobs_ls(
    show_all: Annotated[
        bool, typer.Option("--all", "-a", help="Search the whole history, not only running jobs.")
    ] = False,
    status_filter: Annotated[
        list[str] | None,
        typer.Option("--status", help=f"{', '.join(STATUSES[:-1])} or {STATUSES[-1]}."),
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
    jobs = ask_daemon(control_socket, "/v1/jobs", params)["jobs"]
    if as_json:
        sys.stdout.write(json.dumps(jobs, indent=2) + "\n")
    elif not jobs:
        out.print("no jobs" if params else "no running jobs (--all to search the history)")
    else:
        out.print(_jobs_table(jobs, usage=False))
        if params and 0 < limit <= len(jobs):
            err.print(f"the newest {limit} shown; --limit N for more, --limit 0 for all")


def _watch_jobs(control_socket: Path | None, params: dict[str, str]) -> None:
    """Redraw the table every second; piped, print one table per second instead."""
    from rich.live import Live

    def table() -> Table:
        jobs = ask_daemon(control_socket, "/v1/jobs", params)["jobs"]
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
    memory: Annotated[
        bool,
        typer.Option(
            "--memory",
            help="Where the running job's memory goes instead: its process tree by mapping "
            "kind (heap, arenas, stacks, anon, rtc, python, so, other; PSS, Priv dirty, RSS "
            "in MB) and its threads by name, read from /proc by the daemon.",
        ),
    ] = False,
    control_socket: SocketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Everything about one job, and its last log lines (or, with --memory, its memory)."""
    if memory:
        _show_memory(job_id, control_socket, as_json=as_json)
        return
    data = ask_daemon(control_socket, f"/v1/jobs/{job_id}", {"lines": str(lines)})
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    job = data["job"]
    fields = [
        ("job", job["id"]),
        ("agent", job["agent"]),
        ("room", job["room"]),
        ("status", job["status"]),
        ("cause", job.get("cause") or "-"),
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
        ("attempt", _attempt(job)),
        ("recovery", job.get("recovery") or "-"),
    ]
    for key, value in fields:
        say(f"{key + ':':<16}{value}")
    chain = data.get("chain") or []
    if len(chain) > 1:
        out.print(f"\nattempts at this call ({len(chain)}):", markup=False)
        for step in chain:
            mark = "*" if step["id"] == job["id"] else " "
            said = step.get("recovery") or step.get("error") or ""
            cause = f" ({step['cause']})" if step.get("cause") else ""
            line = f" {mark}{step['attempt']:>2}  {step['id']}  {step['status']}{cause}  {said}"
            say(line.rstrip())
    out.print(f"\nlast {len(data['log'])} log line(s):", markup=False)
    for line in data["log"]:
        say(f"  {line}")


def _show_memory(job_id: str, control_socket: Path | None, *, as_json: bool) -> None:
    data = ask_daemon(control_socket, f"/v1/jobs/{job_id}/memory")
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        print_job_memory(data, out)


def _attempt(job: dict[str, Any]) -> str:
    attempt = job.get("attempt") or 0
    if not job.get("recovered_from"):
        return str(attempt)
    return f"{attempt} (redispatch of {job['recovered_from']})"


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="The job id (AJ_...).")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the job ends.")
    ] = False,
    tail: Annotated[int, typer.Option(help="Start with this many of the last lines.")] = 100,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw", help="Print control characters (colours, escapes) as the job wrote them."
        ),
    ] = False,
    control_socket: SocketOpt = None,
) -> None:
    """Print (or follow) one job's own log; control characters are shown escaped (\\x1b)."""
    path = control_socket or control.default_socket_path()
    params = {"tail": str(tail), "follow": "1" if follow else "0"}
    shown = str if raw else printable

    async def run() -> None:
        async for line in control.stream(path, f"/v1/jobs/{job_id}/logs", params):
            sys.stdout.write(shown(line) + "\n")
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
    data = ask_daemon(control_socket, f"/v1/jobs/{job_id}/kill", params, method="POST")
    if as_json:
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        say(f"{job_id}: {data['action']}")
