"""Every view of the dashboard, in a real browser, on a daemon with a small scene of real jobs
on the real livekit-server: three agents (one FULL at max_jobs, one whose jobs succeed, one
whose jobs fail), running calls, history and an hour's charts starting. Each view loads,
shows the scene, and breaks nothing of its CSP (no console error).

With LKRUN_SCREENSHOTS=1 the test saves each view as docs/screenshots/<view>.png, the
README's images (Dashboard)::

    LKRUN_SCREENSHOTS=1 .venv/bin/pytest tests/test_dashboard_screens.py
"""

from __future__ import annotations

import os
from typing import Any

from selenium.webdriver.common.by import By

from tests.browser import SCREENSHOTS, WINDOW, console_errors, screenshot, wait_until
from tests.conftest import wait_for
from tests.helpers import agent_table, dispatch, job_in_room

SCENE = """
from lkrun.context import JobContext


async def support(ctx: JobContext) -> None:
    print(f"call from {ctx.job.metadata}: greeting the caller", flush=True)
    ctx.logger.info("caller asked about an invoice; looking it up")
    await ctx.wait_for_shutdown()


async def greeter(ctx: JobContext) -> None:
    print("said hello, leaving the room", flush=True)


async def billing(ctx: JobContext) -> None:
    print("looking up the invoice", flush=True)
    raise RuntimeError("payment service unreachable: timed out after 5 s")
"""

# Readable names for the pictures; no other test registers these agents.
SUPPORT, GREETER, BILLING = "support", "greeter", "billing"
SUPPORT_ROOMS = ("call-4711", "call-4712", "call-4713")
GREETER_ROOMS = ("lobby-17", "lobby-18", "lobby-19")
BILLING_ROOMS = ("invoice-88", "invoice-89")


def manifest() -> str:
    return "\n".join(
        [
            '[daemon]\nname = "agents-1"\n',
            agent_table(SUPPORT, "scene:support", max_jobs=3),
            agent_table(GREETER, "scene:greeter"),
            agent_table(BILLING, "scene:billing"),
        ]
    )


def by_testid(name: str, extra: str = "") -> tuple[str, str]:
    return By.CSS_SELECTOR, f'[data-testid="{name}"]{extra}'


def show(browser: Any, address: str, view: str) -> None:
    browser.get(address)
    wait_until(
        browser,
        lambda d: d.find_elements(*by_testid("view", f'[data-view="{view}"][data-loaded="true"]')),
        what=f"the {view} view to load",
    )


def count(browser: Any, name: str, extra: str = "") -> int:
    return len(browser.find_elements(*by_testid(name, extra)))


def shot(browser: Any, name: str, saved: list[str]) -> None:
    assert console_errors(browser) == [], name
    if screenshot(browser, name) is not None:
        saved.append(name)


async def test_every_view_on_a_scene_of_real_jobs(
    start_daemon: Any, livekit_server: Any, browser: Any
) -> None:
    daemon = await start_daemon(manifest(), files={"scene.py": SCENE})
    port = (await daemon.status())["http_port"]
    base = f"http://127.0.0.1:{port}"
    for n, room in enumerate(SUPPORT_ROOMS):
        await dispatch(livekit_server, room, SUPPORT, metadata=f"+1 555 01{n:02d}")
    for room in (*GREETER_ROOMS, *BILLING_ROOMS):
        await dispatch(livekit_server, room, GREETER if room in GREETER_ROOMS else BILLING)
    running = [await job_in_room(daemon, room, "running") for room in SUPPORT_ROOMS]

    async def all_ended() -> bool:
        ended = [j for j in await daemon.jobs() if j["status"] in ("success", "failed")]
        return len(ended) == len(GREETER_ROOMS) + len(BILLING_ROOMS)

    await wait_for(all_ended, 60, what="the greeter's and the billing jobs to end")
    failed = next(j for j in await daemon.jobs() if j["status"] == "failed")
    saved: list[str] = []

    show(browser, base + "/", "overview")
    wait_until(
        browser,
        lambda d: (
            count(d, "agent-row", f'[data-agent="{SUPPORT}"][data-state="FULL"]')
            and count(d, "agent-last-failure", "")
            and "payment service" in d.find_element(*by_testid("view")).text
        ),
        what="support FULL at max_jobs and billing's last failure",
    )
    assert count(browser, "agent-row") == 3
    shot(browser, "overview", saved)

    show(browser, base + "/live", "live")
    wait_until(browser, lambda d: count(d, "live-row") == len(SUPPORT_ROOMS), what="3 live rows")
    shot(browser, "live", saved)

    show(browser, f"{base}/jobs/{running[0]['id']}", "job")
    wait_until(
        browser,
        lambda d: (
            count(d, "log-line") >= 2 and count(d, "job-log-state", '[data-following="true"]')
        ),
        what="the running job's log, followed",
    )
    shot(browser, "job", saved)

    show(browser, f"{base}/jobs/{failed['id']}", "job")
    wait_until(
        browser,
        lambda d: "payment service unreachable" in d.find_element(*by_testid("job-error")).text,
        what="the failed job's error",
    )
    shot(browser, "job-failed", saved)

    show(browser, base + "/history", "history")
    wait_until(
        browser,
        lambda d: (
            count(d, "history-row") == len(GREETER_ROOMS) + len(BILLING_ROOMS)
            and count(d, "failure-group", f'[data-count="{len(BILLING_ROOMS)}"]')
        ),
        what="the ended jobs and billing's failures grouped",
    )
    shot(browser, "history", saved)

    # The ring samples every 10 s: wait for a few points so the lines are lines.
    show(browser, base + "/charts", "charts")
    wait_until(
        browser,
        lambda d: (
            int(d.find_element(*by_testid("chart-jobs")).get_attribute("data-points") or 0) >= 3
        ),
        timeout=60,
        what="three samples in the jobs chart",
    )
    assert int(browser.find_element(*by_testid("chart-latency")).get_attribute("data-points")) >= 3
    shot(browser, "charts", saved)

    if os.environ.get("LKRUN_SCREENSHOTS") == "1":
        assert_pictures(saved)


def assert_pictures(names: list[str]) -> None:
    """Each view saved, a PNG as wide as the window."""
    assert len(names) == 6
    for name in names:
        png = (SCREENSHOTS / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        assert int.from_bytes(png[16:20], "big") == WINDOW[0]  # IHDR width
