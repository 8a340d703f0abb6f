"""What the CLI prints is data: text from rooms, clients and jobs is never Rich markup."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from lkrun.cli import jobs, status

HOSTILE = "[link=https://example.invalid]click[/link] [/INST] [bold red]x"


def render(table: Any) -> str:
    console = Console(record=True, width=400)
    console.print(table)
    return console.export_text()


def test_jobs_table_shows_room_names_and_errors_as_they_are() -> None:
    job = {
        "id": "AJ_1",
        "agent": "echo",
        "room": HOSTILE,
        "status": "failed",
        "pid": 1,
        "age": 3,
        "dispatch_id": "AD_1",
        "error": "RuntimeError: [/INST] closing tag",
        "cpu_percent": 1.0,
        "memory_mb": 2.0,
    }
    for usage in (False, True):  # `jobs ls`, and the --watch table
        text = render(jobs._jobs_table([job], usage=usage))
        assert HOSTILE in text and "RuntimeError: [/INST] closing tag" in text


def test_status_shows_errors_as_they_are(capsys: Any) -> None:
    agent = {
        "agent": "echo",
        "dispatch": "explicit",
        "connected": False,
        "worker_id": "",
        "server_version": "",
        "jobs": 0,
        "max_jobs": 1,
        "idle_processes": 0,
        "load": 0.0,
        "reconnects": 1,
        "last_error": HOSTILE,
        "app": "lkrun function",
    }
    data = {"version": "x", "pid": 1, "uptime": 1, "ready": False, "not_ready_reason": "r",
            "url": "ws://x", "manifest": "m", "agents": [agent]}  # fmt: skip
    status._print_status(data)
    assert HOSTILE in capsys.readouterr().out


def test_help_keeps_text_in_square_brackets() -> None:
    from typer.testing import CliRunner

    from lkrun.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    assert "[manifest: 30m]" in result.output and "[default: manifest, then" in result.output
