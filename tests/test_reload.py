"""Hot reload: editing the manifest of a running daemon, against the real livekit-server."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lkrun import daemon as daemon_module
from lkrun.child.appkind import LIVEKIT_AGENTS
from lkrun.dashboard.guard import Access
from lkrun.logs import JsonFormatter
from lkrun.manifest import Manifest, load_manifest
from tests.conftest import livekit_api, unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room, status_is
from tests.test_daemon_loops import make_daemon


async def agent_status(daemon: Any, name: str, retiring: bool = False) -> dict[str, Any] | None:
    for agent in (await daemon.status())["agents"]:
        if agent["agent"] == name and agent["retiring"] is retiring:
            return agent
    return None


async def test_add_and_remove_agents_while_a_job_runs(
    start_daemon: Any, livekit_server: Any
) -> None:
    a, b = unique("alpha"), unique("beta")
    room_a, room_b, room_a2 = unique("ra"), unique("rb"), unique("ra2")
    daemon = await start_daemon(agent_table(a))
    dispatch_a = await dispatch(livekit_server, room_a, a)
    job_a = await job_in_room(daemon, room_a, "running")

    # Add b and remove a in one edit.
    daemon.manifest_path.write_text(agent_table(b))
    # A new agent takes jobs once registered and loaded (FULL "starting" until then).
    await wait_for(lambda: _ready(daemon, b), 30, what="the new agent to be ready")
    await dispatch(livekit_server, room_b, b)
    await job_in_room(daemon, room_b, "running")

    retiring = await agent_status(daemon, a, retiring=True)
    assert retiring is not None and retiring["full"] is True
    assert (await daemon.job(job_a["id"]))["status"] == "running"  # the removed agent's job goes on
    await dispatch(livekit_server, room_a2, a)  # nobody takes new work for a

    async with livekit_api(livekit_server) as lk:
        await lk.agent_dispatch.delete_dispatch(dispatch_a, room_a)
    await wait_for(lambda: status_is(daemon, job_a["id"], "success"), 20, what="a's job to end")

    async def a_gone() -> bool:
        return all(x["agent"] != a for x in (await daemon.status())["agents"])

    await wait_for(a_gone, 20, what="the old registration to close")
    assert all(j["room"] != room_a2 for j in await daemon.jobs())
    assert "removed from the manifest" in daemon.log()


async def _ready(daemon: Any, name: str) -> bool:
    agent = await agent_status(daemon, name)
    return agent is not None and agent["connected"] and not agent["full"]


async def test_limit_change_applies_in_place(start_daemon: Any, livekit_server: Any) -> None:
    name = unique("echo")
    daemon = await start_daemon(agent_table(name, max_jobs=2))
    before = await agent_status(daemon, name)
    assert before is not None
    daemon.manifest_path.write_text(agent_table(name, max_jobs=5, rooms=["x-*"]))

    async def applied() -> dict[str, Any] | None:
        agent = await agent_status(daemon, name)
        return agent if agent and agent["max_jobs"] == 5 else None

    after = await wait_for(applied, 30, what="the new max_jobs")
    assert after["worker_id"] == before["worker_id"]  # same registration
    assert "changes applied in place: rooms, max_jobs" in daemon.log()


async def test_visible_change_reregisters_and_keeps_old_jobs(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room1, room2 = unique("echo"), unique("r1"), unique("r2")
    daemon = await start_daemon(agent_table(name))
    old = await agent_status(daemon, name)
    assert old is not None
    await dispatch(livekit_server, room1, name)
    job1 = await job_in_room(daemon, room1, "running")

    daemon.manifest_path.write_text(agent_table(name) + "permissions = { can_publish = false }\n")

    async def reregistered() -> dict[str, Any] | None:
        agent = await agent_status(daemon, name)
        fresh = agent and agent["connected"] and agent["worker_id"] != old["worker_id"]
        return agent if fresh else None

    new = await wait_for(reregistered, 30, what="a new registration")
    assert new["connected"]
    assert await agent_status(daemon, name, retiring=True) is not None
    assert (await daemon.job(job1["id"]))["status"] == "running"
    await dispatch(livekit_server, room2, name)
    await job_in_room(daemon, room2, "running")


async def test_invalid_edit_keeps_the_running_configuration(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room = unique("echo"), unique("room")
    daemon = await start_daemon(agent_table(name, max_jobs=3))
    before = await agent_status(daemon, name)
    daemon.manifest_path.write_text(agent_table(name, max_jobs=0))
    await wait_for(lambda: "manifest change rejected" in daemon.log(), 30, what="the rejection")
    line = next(x for x in daemon.log().splitlines() if "manifest change rejected" in x)
    assert f"agent '{name}': field 'max_jobs'" in line
    assert await agent_status(daemon, name) == before
    await dispatch(livekit_server, room, name)
    await job_in_room(daemon, room, "running")
    # A later valid edit still applies.
    daemon.manifest_path.write_text(agent_table(name, max_jobs=4))

    async def applied() -> bool:
        agent = await agent_status(daemon, name)
        return agent is not None and agent["max_jobs"] == 4

    await wait_for(applied, 30, what="the valid edit")


async def test_no_reload_ignores_edits(start_daemon: Any, livekit_server: Any) -> None:
    name, other = unique("echo"), unique("other")
    daemon = await start_daemon(agent_table(name), "--no-reload")
    daemon.manifest_path.write_text(agent_table(name) + agent_table(other))
    # Give a watcher, were there one, the time it needs; then check nothing happened.
    marker = unique("marker")
    daemon.manifest_path.with_name("unrelated.txt").write_text(marker)
    status = await daemon.status()
    assert [a["agent"] for a in status["agents"]] == [name]
    assert status["reloads"] == 0 and status["reload"] is False


# -- a reload that races a drain (issue 17, item 3): fast, with a fake import check ----------


class _FakeHost:
    """Stands for a running agent: counts the warm-process replacements asked of it."""

    def __init__(self) -> None:
        self.spec = SimpleNamespace(resolved_framework=LIVEKIT_AGENTS)
        self.code_changes = 0

    def code_changed(self) -> None:
        self.code_changes += 1

    # What a drain asks of a host.
    def job_count(self) -> int:
        return 0

    def drain(self) -> None:
        pass

    async def wait_idle(self) -> None:
        pass


class _BlockingCheck:
    """The import check (lkrun.daemon._load_checked), held until the test lets it finish."""

    def __init__(self, result: Manifest) -> None:
        self.result = result
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, path: Path) -> Manifest:
        self.started.set()
        assert self.release.wait(10), "the test never released the import check"
        return self.result


@pytest.mark.parametrize("edit", ["manifest", "code"])
async def test_a_drain_during_the_import_check_applies_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: str
) -> None:
    daemon = make_daemon(tmp_path)
    daemon.phase = "serving"
    host = _FakeHost()
    daemon.hosts = {"echo": host}  # type: ignore[dict-item]
    before = daemon.manifest
    (tmp_path / "agents.toml").write_text(agent_table("echo") + agent_table("added"))
    check = _BlockingCheck(load_manifest(tmp_path / "agents.toml"))
    monkeypatch.setattr(daemon_module, "_load_checked", check)
    applied: list[Manifest] = []
    monkeypatch.setattr(daemon, "_apply", applied.append)

    changed = str(before.path.resolve()) if edit == "manifest" else str(tmp_path / "agent.py")
    handling = asyncio.create_task(
        daemon._on_changes(before.path.resolve(), {(2, changed), (2, str(tmp_path / "x.py"))})
    )
    assert await asyncio.to_thread(check.started.wait, 10)
    await daemon._drain()  # what SIGTERM starts, while the check runs
    check.release.set()
    await asyncio.wait_for(handling, 10)

    assert applied == []  # no agent added, re-registered or updated in place
    assert host.code_changes == 0  # no warm pool replaced (regrown) while draining
    assert daemon.manifest is before and daemon.reloads == 0
    assert daemon.phase == "draining"


async def test_a_reload_while_serving_still_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = make_daemon(tmp_path)
    daemon.phase = "serving"
    (tmp_path / "agents.toml").write_text(agent_table("echo") + agent_table("added"))
    new = load_manifest(tmp_path / "agents.toml")
    monkeypatch.setattr(daemon_module, "_load_checked", lambda path: new)
    applied: list[Manifest] = []
    monkeypatch.setattr(daemon, "_apply", applied.append)
    assert await daemon.reload() is True
    assert applied == [new] and daemon.manifest is new and daemon.reloads == 1


OLD_TOKEN = "the-old-dashboard-token-0123"
NEW_TOKEN = "the-new-dashboard-token-4567"


async def test_a_reload_applies_the_dashboard_token_and_names_what_waits_for_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """[daemon] and [livekit] are read at start: of their edits the dashboard's token
    applies at once; the others are named (never their values) in one structured warning."""
    before = f'[daemon]\ndashboard_token = "{OLD_TOKEN}"\n' + agent_table("echo")
    daemon = make_daemon(tmp_path, before)
    daemon.phase = "serving"
    monkeypatch.delenv("LKRUN_DASHBOARD_TOKEN", raising=False)
    access = daemon.dashboard_access = Access("0.0.0.0", OLD_TOKEN)
    session = access.session
    (tmp_path / "agents.toml").write_text(
        '[livekit]\nurl = "ws://127.0.0.1:9"\n'
        f'[daemon]\ndashboard_token = "{NEW_TOKEN}"\ndrain_timeout = 60\ndashboard = false\n'
        + agent_table("echo")
    )
    new = load_manifest(tmp_path / "agents.toml")
    monkeypatch.setattr(daemon_module, "_load_checked", lambda path: new)
    monkeypatch.setattr(daemon, "_apply", lambda manifest: None)
    with caplog.at_level(logging.INFO, logger="lkrun"):
        assert await daemon.reload() is True
    assert access.token == NEW_TOKEN and access.session != session  # signed out
    assert access.token_matches(NEW_TOKEN) and not access.token_matches(OLD_TOKEN)
    entries = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    waiting = [e for e in entries if "restart_needed" in e]
    assert len(waiting) == 1 and waiting[0]["level"] == "warning"
    assert waiting[0]["restart_needed"] == [
        "[livekit] url",
        "[daemon] drain_timeout",
        "[daemon] dashboard",
    ]
    assert any("every dashboard session is signed out" in e["msg"] for e in entries)
    text = caplog.text
    assert OLD_TOKEN not in text and NEW_TOKEN not in text

    # A daemon serving no dashboard: the token is only one more field for the restart.
    caplog.clear()
    (tmp_path / "other").mkdir()
    other = make_daemon(tmp_path / "other", before)
    other.phase = "serving"
    monkeypatch.setattr(other, "_apply", lambda manifest: None)
    with caplog.at_level(logging.INFO, logger="lkrun"):
        assert await other.reload() is True
    assert other.dashboard_access is None
    assert "[daemon] dashboard_token" in caplog.text and NEW_TOKEN not in caplog.text
