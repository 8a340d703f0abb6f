"""What the CLI prints is data: text from rooms, clients and jobs is never Rich markup."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from rich.console import Console

from lkrun.cli import jobs, status
from lkrun.shared.text import printable

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


# --- control characters ---------------------------------------------------------------------

# What a participant could put in a room name, a job's error or its log: an OSC that retitles
# the terminal, an OSC 8 hyperlink, CSI cursor moves and erases, a C1 CSI (0x9b), a carriage
# return that overwrites the line, a bidi override, and an emoji code Rich would replace.
ESCAPES = (
    "\x1b]0;owned\x07"
    "\x1b]8;;https://evil.invalid\x1b\\link\x1b]8;;\x1b\\"
    "\x1b[2K\x1b[1A\x9b31m\rfake\u202e:warning:"
)
# Every control character but newline (between lines) and tab, as it would reach a terminal.
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]")


def hostile_job() -> dict[str, Any]:
    return {
        "id": "AJ_1",
        "agent": "echo" + ESCAPES,
        "room": "room" + ESCAPES,
        "status": "failed",
        "pid": 1,
        "age": 3,
        "dispatch_id": "AD_1" + ESCAPES,
        "error": "RuntimeError: " + ESCAPES,
        "identity": "id" + ESCAPES,
        "stop_reason": ESCAPES,
        "cpu_percent": 1.0,
        "memory_mb": 2.0,
    }


def assert_shown_escaped(output: str) -> None:
    assert not RAW_CONTROL.search(output), repr(output)
    assert "\\x1b]0;owned\\x07" in output and "\\x9b31m" in output and "\\x0dfake" in output
    assert ":warning:" in output  # not an emoji


def test_jobs_table_escapes_control_characters() -> None:
    for usage in (False, True):  # `jobs ls`, and the --watch table
        assert_shown_escaped(render(jobs._jobs_table([hostile_job()], usage=usage)))


def invoke(args: list[str]) -> Any:
    from typer.testing import CliRunner

    from lkrun.cli import app

    return CliRunner().invoke(app, args)


def test_jobs_ls_and_show_escape_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    replies = {
        "/v1/jobs": {"jobs": [hostile_job()]},
        "/v1/jobs/AJ_1": {"job": hostile_job(), "log": ["line " + ESCAPES]},
        "/v1/jobs/AJ_1/kill": {"action": "stopping" + ESCAPES},
    }
    monkeypatch.setattr(jobs, "ask_daemon", lambda _socket, route, *a, **k: replies[route])
    for args in (["jobs", "ls"], ["jobs", "show", "AJ_1"], ["jobs", "kill", "AJ_1"]):
        result = invoke(args)
        assert result.exit_code == 0, result.output
        assert_shown_escaped(result.output)


def test_status_escapes_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = {
        "agent": "echo" + ESCAPES,
        "dispatch": "explicit",
        "connected": False,
        "worker_id": "AW" + ESCAPES,
        "server_version": "1" + ESCAPES,
        "jobs": 0,
        "max_jobs": 1,
        "idle_processes": 0,
        "load": 0.0,
        "reconnects": 1,
        "last_error": ESCAPES,
        "app": "app" + ESCAPES,
    }
    data = {"version": "x", "pid": 1, "uptime": 1, "ready": True, "not_ready_reason": "",
            "url": "ws://x" + ESCAPES, "manifest": "m", "agents": [agent]}  # fmt: skip
    monkeypatch.setattr(status, "ask_daemon", lambda *a, **k: data)
    result = invoke(["status"])
    assert result.exit_code == 0, result.output
    assert_shown_escaped(result.output)


def fake_log_stream(monkeypatch: pytest.MonkeyPatch, lines: list[str]) -> None:
    from lkrun.api import control

    async def stream(_path: Any, _route: str, _params: Any) -> AsyncIterator[str]:
        for line in lines:
            yield line

    monkeypatch.setattr(control, "stream", stream)


def test_jobs_logs_escapes_control_characters_unless_raw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = ["plain", "\x1b[31mred\x1b[0m " + ESCAPES]
    fake_log_stream(monkeypatch, lines)
    result = invoke(["jobs", "logs", "AJ_1"])
    assert result.exit_code == 0, result.output
    assert_shown_escaped(result.output)
    assert result.output == "".join(printable(line) + "\n" for line in lines)
    raw = invoke(["jobs", "logs", "AJ_1", "--raw"])
    assert raw.exit_code == 0, raw.output
    assert raw.output == "".join(line + "\n" for line in lines)  # as the job wrote them


def test_dispatch_escapes_what_the_server_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    from lkrun import dispatch

    created = dispatch.Dispatch("AD_1" + ESCAPES, "echo", "room", "")
    started = dispatch.Started("AJ_1", "agent" + ESCAPES, "AW_1", 0.5, "this host", "d" + ESCAPES)

    async def create(*_a: Any, **_k: Any) -> dispatch.Dispatch:
        return created

    async def and_wait(*_a: Any, **_k: Any) -> tuple[Any, Any]:
        return created, started

    monkeypatch.setattr(dispatch, "create_dispatch", create)
    monkeypatch.setattr(dispatch, "dispatch_and_wait", and_wait)
    for args in ([], ["--wait"]):
        result = invoke(["dispatch", "--room", "room", "--agent", "echo", *args])
        assert result.exit_code == 0, result.output
        assert not RAW_CONTROL.search(result.output), repr(result.output)
        assert "AD_1\\x1b]0;owned\\x07" in result.output


def test_errors_escape_control_characters(monkeypatch: pytest.MonkeyPatch) -> None:
    from lkrun.api import control

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise control.ControlError("no job " + ESCAPES)

    monkeypatch.setattr(control, "request", refuse)
    result = invoke(["jobs", "show", "AJ_1"])
    assert result.exit_code == 1
    assert_shown_escaped(result.output)


def test_serve_pretty_log_escapes_job_output() -> None:
    """`lkrun serve` on a terminal prints its jobs' output lines through this formatter."""
    import logging

    from lkrun.logs import JsonFormatter, PrettyFormatter

    record = logging.LogRecord("lkrun.job", logging.INFO, __file__, 1, "%s", (ESCAPES,), None)
    record.agent, record.job_id = "echo", "AJ_1"
    assert_shown_escaped(PrettyFormatter().format(record))
    # JSON lines keep the text as it was: json.dumps escapes it, a collector gets it back.
    assert json.loads(JsonFormatter().format(record))["msg"] == ESCAPES
