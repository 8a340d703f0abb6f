"""`lkrun jobs show JOB --memory` (issue 20): the control API's /v1/jobs/{id}/memory over a
fake DaemonView on a real socket, the CLI's table and JSON, its errors, and names from the
job shown as data; and one e2e test: a daemon on the real livekit-server, a job in a room,
its breakdown through the CLI, then the error once it has ended."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from lkrun import memory_map
from lkrun.api import control
from lkrun.api.control import ControlServer
from lkrun.cli import jobs
from lkrun.cli import memory as memory_cli
from tests.conftest import livekit_api, unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room, status_is
from tests.test_cli_render import ESCAPES, HOSTILE, assert_shown_escaped


def breakdown(job_id: str = "AJ_run", names: dict[str, int] | None = None) -> dict[str, Any]:
    """What the daemon answers: kB per kind (as memory_map.report), the threads by name."""
    kinds = {kind: memory_map.empty() for kind in memory_map.KINDS}
    kinds["anon"].update(mappings=40, Pss=19 * 1024, Private_Dirty=18 * 1024, Rss=30 * 1024)
    kinds["heap"].update(mappings=1, Pss=5 * 1024, Private_Dirty=4 * 1024, Rss=6 * 1024)
    kinds["rtc"].update(mappings=5, Pss=512, Rss=40 * 1024, Shared_Clean=39 * 1024)
    names = names or {"python": 1, "AsyncResolver": 3}
    return {
        "job_id": job_id,
        "pid": 4242,
        "tree": True,
        "unit": "kB",
        "kinds": kinds,
        "total": memory_map.total(kinds),
        "threads": sum(names.values()),
        "thread_names": names,
        "processes": [
            {
                "pid": 4242,
                "name": "python",
                "threads": 4,
                "stack_pointers_read": 4,
                "Rss": 76 * 1024,
                "Pss": 24 * 1024 + 512,
            }
        ],
        "skipped": [],
    }


class View:
    """A DaemonView with one running job (AJ_run), one ended (AJ_done), one whose read is
    too slow (AJ_slow); any other id is unknown."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def job(self, job_id: str) -> dict[str, Any] | None:
        status = {"AJ_run": "running", "AJ_done": "success", "AJ_slow": "running"}
        return {"id": job_id, "status": status[job_id]} if job_id in status else None

    async def job_memory(self, job_id: str) -> dict[str, Any] | None:
        self.asked.append(job_id)
        if job_id == "AJ_slow":
            raise memory_map.TooSlow("reading pid 7's memory took over 5 s")
        return breakdown(job_id) if job_id == "AJ_run" else None


@pytest.fixture
async def socket_path(tmp_path: Path) -> Any:
    path = tmp_path / "run" / "control.sock"
    server = ControlServer(path, View())  # type: ignore[arg-type]
    await server.start()
    try:
        yield path
    finally:
        await server.stop()


async def test_the_endpoint_answers_a_running_jobs_breakdown(socket_path: Path) -> None:
    data = await control.get(socket_path, "/v1/jobs/AJ_run/memory")
    assert data["job_id"] == "AJ_run" and data["unit"] == "kB"
    assert data["kinds"]["anon"]["Pss"] == 19 * 1024
    assert data["total"]["Pss"] == 19 * 1024 + 5 * 1024 + 512
    assert data["thread_names"] == {"python": 1, "AsyncResolver": 3}


@pytest.mark.parametrize(
    ("job_id", "message"),
    [
        ("AJ_done", "job AJ_done has no running process to read (status success)"),
        ("AJ_nope", "no job AJ_nope"),
        ("AJ_slow", "job AJ_slow: reading pid 7's memory took over 5 s"),
    ],
)
async def test_the_endpoint_says_why_there_is_nothing_to_read(
    socket_path: Path, job_id: str, message: str
) -> None:
    with pytest.raises(control.ControlError) as refused:
        await control.get(socket_path, f"/v1/jobs/{job_id}/memory")
    assert str(refused.value) == message


def invoke(args: list[str]) -> Any:
    from typer.testing import CliRunner

    from lkrun.cli import app

    return CliRunner().invoke(app, args)


def test_show_memory_prints_kinds_in_mb_with_a_total_and_threads_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def ask(_socket: Any, route: str, *_a: Any, **_k: Any) -> Any:
        asked.append(route)
        return breakdown("AJ_1")

    monkeypatch.setattr(jobs, "ask_daemon", ask)
    result = invoke(["jobs", "show", "AJ_1", "--memory"])
    assert result.exit_code == 0, result.output
    assert asked == ["/v1/jobs/AJ_1/memory"]
    kinds_part, threads_part = result.output.split("\nthreads: 4\n")
    rows = {line.split()[0]: line.split() for line in kinds_part.splitlines() if line.strip()}
    assert rows["KIND"][:6] == ["KIND", "MAPS", "PSS", "PRIV", "DIRTY", "RSS"]
    # kind, mappings, PSS, Priv dirty, RSS in MB; kinds with no mapping are left out
    assert rows["anon"][:5] == ["anon", "40", "19.0", "18.0", "30.0"]
    assert rows["heap"][:5] == ["heap", "1", "5.0", "4.0", "6.0"]
    assert rows["rtc"][:5] == ["rtc", "5", "0.5", "0.0", "40.0"]
    assert "arenas" not in rows
    assert rows["total"][:5] == ["total", "46", "24.5", "22.0", "76.0"]
    assert "job AJ_1: 1 process(es): 4242 python" in kinds_part
    counts = [line.split() for line in threads_part.splitlines()]
    assert counts == [["THREAD", "NAME", "COUNT"], ["python", "1"], ["AsyncResolver", "3"],
                      ["total", "4"]]  # fmt: skip


def test_show_memory_json_is_the_daemons_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "ask_daemon", lambda *_a, **_k: breakdown("AJ_1"))
    result = invoke(["jobs", "show", "AJ_1", "--memory", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == breakdown("AJ_1")


def test_show_memory_of_an_ended_job_fails_with_the_daemons_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def refuse(*_a: Any, **_k: Any) -> Any:
        raise control.ControlError("job AJ_1 has no running process to read (status success)")

    monkeypatch.setattr(control, "request", refuse)
    result = invoke(["jobs", "show", "AJ_1", "--memory"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "error: job AJ_1 has no running process to read (status success)"
    )


def test_thread_and_process_names_are_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """A job names its threads and itself (prctl): neither markup nor terminal escapes."""
    data = breakdown("AJ_1", names={HOSTILE: 2, "t" + ESCAPES: 1})
    data["processes"][0]["name"] = "p" + ESCAPES
    monkeypatch.setattr(jobs, "ask_daemon", lambda *_a, **_k: data)
    result = invoke(["jobs", "show", "AJ_1", "--memory"])
    assert result.exit_code == 0, result.output
    assert HOSTILE in result.output
    assert_shown_escaped(result.output)
    console = Console(record=True, width=400)
    console.print(memory_cli.threads_table(data))
    assert HOSTILE in console.export_text()


async def test_a_running_jobs_memory_through_the_daemon(
    start_daemon: Any, livekit_server: Any
) -> None:
    """The echo example, connected to its room (the rtc runtime's threads running): its
    breakdown is the job's own process tree, read by the daemon; once the job has ended the
    CLI fails with the daemon's one line."""
    name, room = unique("mem"), unique("room")
    daemon = await start_daemon(agent_table(name))
    dispatch_id = await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")

    result = daemon.cli("jobs", "show", job["id"], "--memory", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["job_id"] == job["id"] and data["unit"] == "kB" and data["tree"] is True
    assert data["pid"] == job["pid"] and data["processes"][0]["pid"] == job["pid"]
    assert list(data["kinds"]) == list(memory_map.KINDS)
    total = data["total"]
    assert total["Pss"] > 0 and total["Private_Dirty"] > 0 and total["Rss"] >= total["Pss"]
    assert total["Pss"] == sum(row["Pss"] for row in data["kinds"].values())
    # A forked Python job: its objects, the interpreter, the rtc library it connected with.
    for kind in ("anon", "python", "rtc", "so"):
        assert data["kinds"][kind]["mappings"] > 0 and data["kinds"][kind]["Rss"] > 0, kind
    assert data["threads"] == sum(data["thread_names"].values()) > 1
    assert data["threads"] == sum(p["threads"] for p in data["processes"])

    table = daemon.cli("jobs", "show", job["id"], "--memory")
    assert table.returncode == 0, table.stderr
    # A second read: the figures move (threads come and go), the layout does not.
    assert table.stdout.startswith(f"job {job['id']}: 1 process(es): {job['pid']} ")
    assert re.search(r"^total +\d+ +\d+\.\d +\d+\.\d +\d+\.\d *$", table.stdout, re.M)
    assert re.search(r"^threads: \d+$", table.stdout, re.M)

    async with livekit_api(livekit_server) as lk:
        await lk.agent_dispatch.delete_dispatch(dispatch_id, room)
    await wait_for(lambda: status_is(daemon, job["id"], "success"), 20, what="the job to end")
    ended = daemon.cli("jobs", "show", job["id"], "--memory")
    assert ended.returncode == 1
    assert ended.stderr.strip() == (
        f"error: job {job['id']} has no running process to read (status success)"
    )
    unknown = daemon.cli("jobs", "show", "AJ_nosuchjob", "--memory", "--json")
    assert unknown.returncode == 1 and unknown.stderr.strip() == "error: no job AJ_nosuchjob"
