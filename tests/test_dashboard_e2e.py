"""The dashboard's settings on a real daemon (no browser): turned off, and a token from the
environment that is too weak."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.helpers import agent_table

pytestmark = pytest.mark.e2e  # lkrun daemons, each a process


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}", allow_redirects=False) as resp,
    ):
        return resp.status, await resp.text()


async def test_dashboard_false_serves_health_and_metrics_only(start_daemon: Any) -> None:
    daemon = await start_daemon("[daemon]\ndashboard = false\n" + agent_table("plain"))
    port = (await daemon.status())["http_port"]
    assert (await get(port, "/"))[0] == 404
    assert (await get(port, "/api/v1/status"))[0] == 404
    assert (await get(port, "/healthz"))[0] == 200
    assert (await get(port, "/metrics"))[0] == 200


async def test_the_dashboard_is_on_by_default_and_the_page_reads_the_daemon(
    start_daemon: Any,
) -> None:
    daemon = await start_daemon(agent_table("shown"))
    port = (await daemon.status())["http_port"]
    status, page = await get(port, "/")
    assert status == 200 and 'src="/static/app.js"' in page
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/api/v1/status") as resp,
    ):
        seen = await resp.json()
    assert [a["agent"] for a in seen["agents"]] == ["shown"]
    assert seen["pid"] == daemon.pid


async def test_a_weak_token_in_the_environment_stops_the_start_in_one_line(
    start_daemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LKRUN_DASHBOARD_TOKEN", "short-secret")
    daemon = await start_daemon(agent_table("refused"), wait=False)
    assert await daemon.wait_exit(30) != 0
    errors = [line for line in daemon.log().splitlines() if "LKRUN_DASHBOARD_TOKEN" in line]
    assert errors and "must be at least 16 characters (value not shown)" in errors[-1]
    assert "short-secret" not in daemon.log()
