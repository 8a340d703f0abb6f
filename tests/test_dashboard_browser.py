"""The dashboard in a real headless browser (tests/browser.py) against a daemon serving
real jobs on the real livekit-server: what an operator sees and does.

Every check reads the page's data-testid elements (lkrun.dashboard's docstring lists them)
and, for what the page did, the daemon's own record (control API, history)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement

from tests.browser import console_errors, screenshot
from tests.conftest import livekit_api, unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room, status_is

pytestmark = pytest.mark.e2e  # a daemon, chromium and chromedriver, each a process

TICKER = "tests.agents.behaviours:ticker"
STUBBORN = "tests.agents.behaviours:ignores_shutdown"


def selector(name: str, **data: str) -> str:
    """The CSS selector of a data-testid element, with data-* attributes equal to ``data``."""
    extra = "".join(f'[data-{key.replace("_", "-")}="{value}"]' for key, value in data.items())
    return f'[data-testid="{name}"]{extra}'


def find(driver: WebDriver, name: str, **data: str) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, selector(name, **data))


async def until(
    driver: WebDriver, check: Callable[[WebDriver], Any], what: str, timeout: float = 20.0
) -> Any:
    """Wait, off the event loop's thread, for the page to show something: the daemon is a
    process of its own, but dispatches and the control API run on this loop."""

    def probe() -> Any:
        try:
            return check(driver)
        except StaleElementReferenceException:
            return None  # the view re-rendered between finding and reading: poll again

    async def poll() -> Any:
        return await asyncio.to_thread(probe)

    return await wait_for(poll, timeout, what=what)


async def open_view(driver: WebDriver, daemon: Any, path: str) -> str:
    port = (await daemon.status())["http_port"]
    base = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(driver.get, base + path)
    await until(driver, lambda d: find(d, "view", loaded="true"), f"the view at {path}")
    # A marker a reload would wipe out: the page must change without one.
    driver.execute_script("window.lkrunNoReload = true;")
    return base


def not_reloaded(driver: WebDriver) -> bool:
    return driver.execute_script("return window.lkrunNoReload === true;") is True


async def end_job(server: Any, dispatch_id: str, room: str) -> None:
    async with livekit_api(server) as lk:
        await lk.agent_dispatch.delete_dispatch(dispatch_id, room)


async def confirm(driver: WebDriver) -> None:
    await until(driver, lambda d: find(d, "confirm-dialog")[0].is_displayed(), "the dialog")
    find(driver, "confirm-ok")[0].click()


def agent_state(driver: WebDriver, name: str) -> tuple[str, str] | None:
    rows = find(driver, "agent-row", agent=name)
    if not rows:
        return None
    row = rows[0]
    return row.get_attribute("data-state") or "", row.get_attribute("data-full-reason") or ""


async def test_the_overview_lists_the_agents_and_turns_one_full_at_max_jobs(
    start_daemon: Any, livekit_server: Any, browser: WebDriver
) -> None:
    one, other, room = unique("one"), unique("other"), unique("full")
    daemon = await start_daemon(
        agent_table(one, TICKER, max_jobs=1) + agent_table(other, TICKER, max_jobs=3)
    )
    await open_view(browser, daemon, "/")
    await until(browser, lambda d: agent_state(d, one) == ("AVAILABLE", ""), "one AVAILABLE")
    row = find(browser, "agent-row", agent=other)[0]
    assert row.find_element(By.CSS_SELECTOR, selector("agent-jobs")).text == "0 / 3"
    assert row.find_element(By.CSS_SELECTOR, selector("agent-registration")).text == "registered"
    status = await daemon.status()
    assert find(browser, "daemon-name")[0].text == status["name"]
    assert find(browser, "daemon-url")[0].text == livekit_server.url

    dispatch_id = await dispatch(livekit_server, room, one)
    await until(browser, lambda d: agent_state(d, one) == ("FULL", "max_jobs"), "one FULL")
    assert find(browser, "agent-row", agent=one, jobs="1", max_jobs="1")
    assert agent_state(browser, other) == ("AVAILABLE", "")
    screenshot(browser, "overview")
    await end_job(livekit_server, dispatch_id, room)
    await until(browser, lambda d: agent_state(d, one) == ("AVAILABLE", ""), "one AVAILABLE again")
    assert not_reloaded(browser)
    assert console_errors(browser) == []  # no CSP violation, no script error


async def test_a_job_appears_on_the_live_page_and_goes_when_it_ends(
    start_daemon: Any, livekit_server: Any, browser: WebDriver
) -> None:
    name, room = unique("live"), unique("live-room")
    daemon = await start_daemon(agent_table(name, TICKER))
    await open_view(browser, daemon, "/live")
    assert find(browser, "live-count", count="0") and find(browser, "live-empty")[0].is_displayed()

    dispatch_id = await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    rows = await until(browser, lambda d: find(d, "live-row", job_id=job["id"]), "the live row")
    cells = {
        key: rows[0].find_element(By.CSS_SELECTOR, selector(f"live-{key}")).text
        for key in ("agent", "room", "status")
    }
    assert cells == {"agent": name, "room": room, "status": "running"}
    assert find(browser, "live-count", count="1")
    await until(
        browser,
        lambda d: (
            float(d.find_element(By.CSS_SELECTOR, selector("live-memory")).text.split()[0]) > 0
        ),
        "the job's memory sampled",
    )
    screenshot(browser, "live")

    await end_job(livekit_server, dispatch_id, room)
    await until(browser, lambda d: not find(d, "live-row"), "the row gone")
    assert find(browser, "live-empty")[0].is_displayed() and not_reloaded(browser)

    # The charts, reached by the menu (no reload): the daemon's samples since its start,
    # and the job's offer -> running latency.
    find(browser, "nav-charts")[0].click()
    await until(browser, lambda d: find(d, "view", view="charts", loaded="true"), "the charts")
    assert int(find(browser, "chart-jobs")[0].get_attribute("data-points")) >= 1
    assert find(browser, "chart-latency", points="1")
    assert not find(browser, "chart-empty")[0].is_displayed() and not_reloaded(browser)
    screenshot(browser, "charts")
    assert console_errors(browser) == []


async def test_the_job_page_shows_log_lines_as_they_are_written(
    start_daemon: Any, livekit_server: Any, browser: WebDriver
) -> None:
    name, room = unique("logs"), unique("log-room")
    daemon = await start_daemon(agent_table(name, TICKER))
    dispatch_id = await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    await open_view(browser, daemon, f"/jobs/{job['id']}")
    assert find(browser, "job-log-state", following="true")

    def ticks(driver: WebDriver) -> list[int]:
        """The numbers of the ticker's lines on the page (each line: a time, then the text)."""
        texts = driver.execute_script(
            "return [...document.querySelectorAll('[data-testid=\"log-line\"]')]"
            ".map((e) => e.textContent);"
        )
        return [int(m.group(1)) for t in texts if (m := re.search(r"tick (\d+)$", t))]

    first = await until(browser, lambda d: ticks(d) or None, "the first ticks")
    # The ticker writes ten lines a second: later ones arrive in the page while it is open.
    await until(browser, lambda d: max(ticks(d), default=0) >= max(first) + 10, "new ticks")
    seen = ticks(browser)
    assert seen == sorted(seen) and len(seen) == len(set(seen))  # in order, none twice
    timeline = {
        step: find(browser, f"timeline-{step}")[0].get_attribute("data-time")
        for step in ("offered", "assigned", "running", "ended")
    }
    assert all(timeline[s] for s in ("offered", "assigned", "running")) and not timeline["ended"]
    assert float(timeline["offered"]) <= float(timeline["assigned"]) <= float(timeline["running"])
    screenshot(browser, "job")

    await end_job(livekit_server, dispatch_id, room)
    await until(browser, lambda d: find(d, "job-status", status="success"), "the job ended")
    await until(browser, lambda d: find(d, "job-log-state", following="false"), "follow ended")
    assert find(browser, "timeline-ended")[0].get_attribute("data-time")
    assert not_reloaded(browser) and console_errors(browser) == []


async def test_killing_from_the_page_ends_the_job_as_killed(
    start_daemon: Any, livekit_server: Any, browser: WebDriver
) -> None:
    """Graceful first: the job stops itself (success, cause killed); a job that ignores the
    ask gets the force button, and dies (failed, cause killed)."""
    gentle, stubborn = unique("gentle"), unique("stubborn")
    r1, r2 = unique("kill-1"), unique("kill-2")
    daemon = await start_daemon(
        "[daemon]\nshutdown_timeout = '2m'\n"  # only the force button ends the stubborn one
        + agent_table(gentle, TICKER)
        + agent_table(stubborn, STUBBORN)
    )
    await dispatch(livekit_server, r1, gentle)
    await dispatch(livekit_server, r2, stubborn)
    first = await job_in_room(daemon, r1, "running")
    second = await job_in_room(daemon, r2, "running")

    base = await open_view(browser, daemon, f"/jobs/{first['id']}")
    find(browser, "kill-button")[0].click()
    await confirm(browser)
    await until(browser, lambda d: find(d, "action-result", ok="true"), "the kill answered")
    await wait_for(lambda: status_is(daemon, first["id"], "success"), 20, what="a clean stop")
    ended = await daemon.job(first["id"])
    assert (ended["cause"], ended["stop_reason"]) == ("killed", "stopped by the dashboard")
    await until(browser, lambda d: find(d, "job-cause", cause="killed"), "the cause shown")

    await asyncio.to_thread(browser.get, f"{base}/jobs/{second['id']}")
    await until(browser, lambda d: find(d, "view", loaded="true"), "the second job's page")
    find(browser, "kill-button")[0].click()
    await confirm(browser)
    await wait_for(lambda: status_is(daemon, second["id"], "stopping"), 20, what="stopping")
    force = await until(
        browser,
        lambda d: [b for b in find(d, "force-kill-button") if b.is_displayed()],
        "the force button",
    )
    force[0].click()
    await confirm(browser)
    await wait_for(lambda: status_is(daemon, second["id"], "failed"), 20, what="the kill")
    killed = await daemon.job(second["id"])
    assert (killed["cause"], killed["error"]) == ("killed", "killed by the dashboard (force)")

    # The history shows both, with their cause.
    await asyncio.to_thread(browser.get, f"{base}/history?since=1h")
    for job_id in (first["id"], second["id"]):
        await until(browser, lambda d, j=job_id: find(d, "history-row", job_id=j, cause="killed"),
                    f"{job_id} in the history")  # fmt: skip
    assert find(browser, "agent-count", agent=stubborn, failed="1")
    screenshot(browser, "history")
    assert console_errors(browser) == []


async def test_a_cancelled_confirmation_does_nothing(
    start_daemon: Any, livekit_server: Any, browser: WebDriver
) -> None:
    name, room = unique("keep"), unique("keep-room")
    daemon = await start_daemon(agent_table(name, TICKER))
    dispatch_id = await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    await open_view(browser, daemon, f"/jobs/{job['id']}")
    find(browser, "kill-button")[0].click()
    await until(browser, lambda d: find(d, "confirm-dialog")[0].is_displayed(), "the dialog")
    find(browser, "confirm-cancel")[0].click()
    find(browser, "drain-button")[0].click()
    await until(browser, lambda d: find(d, "confirm-dialog")[0].is_displayed(), "the dialog")
    find(browser, "confirm-cancel")[0].click()
    # Had anything been posted, its answer would show by the next status refresh (1 s).
    uptime = find(browser, "daemon-uptime")[0].text
    await until(browser, lambda d: find(d, "daemon-uptime")[0].text != uptime, "a refresh")
    assert not find(browser, "action-result")[0].is_displayed()
    assert (await daemon.job(job["id"]))["status"] == "running"
    assert (await daemon.status())["phase"] == "serving"
    await end_job(livekit_server, dispatch_id, room)


async def test_draining_from_the_page(
    start_daemon: Any, livekit_server: Any, browser: WebDriver
) -> None:
    name = unique("drain")
    daemon = await start_daemon(agent_table(name, TICKER))
    await open_view(browser, daemon, "/")
    find(browser, "drain-button")[0].click()
    await confirm(browser)
    await until(browser, lambda d: find(d, "action-result", ok="true"), "the drain answered")
    # No job runs: the drain is over at once and the daemon exits by itself.
    assert await daemon.wait_exit(30) == 0
