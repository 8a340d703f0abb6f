"""`lkrun status`."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.table import Table

from lkrun.api.control import DaemonStatus
from lkrun.cli.common import (
    EXIT_FAILURE,
    JsonOpt,
    SocketOpt,
    age,
    app,
    ask_daemon,
    cell,
    out,
    say,
)


@app.command()
def status(control_socket: SocketOpt = None, as_json: JsonOpt = False) -> None:
    """Show the daemon's agents and registrations; exit 0 only when it is ready."""
    data: DaemonStatus = ask_daemon(control_socket, "/v1/status")
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        _print_status(data)
    if not data.get("ready", False):
        raise typer.Exit(EXIT_FAILURE)


def _print_status(data: DaemonStatus) -> None:
    ready = "ready" if data.get("ready") else f"NOT READY ({data.get('not_ready_reason')})"
    say(
        f"lkrun {data['version']} pid {data['pid']}, up {age(data['uptime'])}, {ready}; "
        f"LiveKit {data['url']}, manifest {data['manifest']}"
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
        values = (
            a["agent"],
            a["dispatch"],
            reg,
            a["worker_id"] or "-",
            a["server_version"] or "-",
            f"{a['jobs']}/{a['max_jobs']}",
            str(a.get("idle_processes", 0)),
            f"FULL ({a.get('full_reason') or '?'})" if a.get("full") else f"{a['load']:.2f}",
            str(a["reconnects"]),
            a["last_error"] or a.get("warm_error") or a.get("request_process_error") or "",
        )
        table.add_row(*(cell(value) for value in values))
    out.print(table)
    for a in data["agents"]:
        found = [a.get("python_version"), a.get("livekit_version")]
        found[1] = found[1] and f"livekit {found[1]}"
        details = ", ".join(part for part in found if part)
        python = ""
        if a.get("python"):  # "" for a command agent
            python = f"python {a['python']}" + (f" ({details})" if details else "")
        say(f"{a['agent']}: " + "; ".join(part for part in (a.get("app"), python) if part))
    for inf in data.get("inference") or ():
        say(_inference_line(inf))


def _inference_line(inf: dict[str, Any]) -> str:
    """One inference process: whose, its state, memory and request latency."""
    state = f"pid {inf['pid']}" if inf.get("ready") else "NOT UP"
    restarts = f"{inf['restarts']} restart(s)"
    if inf.get("last_error"):
        restarts += f" (last: {inf['last_error']})"
    latency = inf.get("latency_ms")
    timing = f", p50 {latency['p50']:g} ms, p95 {latency['p95']:g} ms" if latency else ""
    failed = inf.get("failed_runners") or {}
    broken = f"; failed runners: {', '.join(failed)}" if failed else ""
    return (
        f"inference process for {inf['interpreter']} ({', '.join(inf['agents'])}): {state}, "
        f"runners {', '.join(inf['runners'])}{broken}; RSS {inf['rss_mb']:g} MB, "
        f"PSS {inf['pss_mb']:g} MB; {inf['requests']} request(s), {inf['errors']} error(s)"
        f"{timing}; {restarts}"
    )
