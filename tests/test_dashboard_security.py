"""The dashboard's safety in a real browser (tests/browser.py), against daemons serving real
jobs on the real livekit-server (lkrun.dashboard's rules):

- what a participant controls (a room name, a dispatch's metadata, the error text and log
  lines a job makes of it) is shown as text on every view: no element is made of it, no
  handler or script of it runs, with the page's CSP and with the CSP bypassed (so the
  rendering is safe by itself); no view of the page breaks its own CSP;
- a page of another origin cannot act: its fetch and its form POSTs to kill a job or drain
  the daemon are refused, the job runs on, the daemon keeps serving;
- a daemon listening beyond loopback serves its dashboard disabled without a token, and
  with one only after the login, whose cookie another origin's page cannot ride.

The aiohttp-level rules (every header, each refused CSRF variant) are in test_dashboard.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement

from tests.browser import console, console_errors, serve_html, wait_js, wait_until
from tests.conftest import unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room

# The room name, and a text with markup for the metadata, error and log line. An
# onerror or a script that ran would set window.lkrunXss; alert() is replaced (below) by
# one that sets window.lkrunAlerted instead of blocking the page on a dialog.
HTML_ROOM = "<img src=x onerror=alert(1)>"
HTML_TEXT = (
    '<img src=x onerror="window.lkrunXss=1"><script>window.lkrunXss=2</script>'
    "<b>lkrun-bold</b><a href=javascript:window.lkrunXss=3>link</a>"
)
CATCH_ALERT = "window.alert = () => { window.lkrunAlerted = true; };"

# Prints its metadata (a log line), runs until the test creates the release file, then
# raises it (the error text).
HOSTILE = """
import asyncio
from pathlib import Path

from lkrun.context import JobContext

RELEASE = Path({release!r})


async def entrypoint(ctx: JobContext) -> None:
    print(ctx.job.metadata, flush=True)
    while not RELEASE.exists():
        await asyncio.sleep(0.1)
    raise RuntimeError(ctx.job.metadata)
"""

WAITS = "tests.agents.behaviours:waits_for_shutdown"


def url(daemon_port: int, path: str) -> str:
    return f"http://127.0.0.1:{daemon_port}{path}"


def by_testid(testid: str, extra: str = "") -> tuple[str, str]:
    return By.CSS_SELECTOR, f'[data-testid="{testid}"]{extra}'


def open_view(browser: Any, address: str, view: str) -> None:
    browser.get(address)
    wait_until(
        browser,
        lambda d: d.find_elements(*by_testid("view", f'[data-view="{view}"][data-loaded="true"]')),
        what=f"the {view} view to load",
    )


def text_of(browser: Any, testid: str, extra: str = "", contains: str = "") -> WebElement:
    """The first element of that testid whose textContent contains ``contains``, once
    there (a view fills itself from the API after loading)."""

    def find(d: Any) -> WebElement | bool:
        for element in d.find_elements(*by_testid(testid, extra)):
            if contains in element.get_property("textContent"):
                return element
        return False

    return wait_until(browser, find, what=f"{testid}{extra} showing {contains!r}")


def assert_nothing_ran(browser: Any, where: str) -> None:
    """No element was made of the markup and nothing of it ran."""
    found = browser.execute_script(
        """return {
            flag: window.lkrunXss ?? null,
            alerted: window.lkrunAlerted ?? null,
            imgs: [...document.querySelectorAll("img")]
                .filter((i) => i.getAttribute("src") === "x").length,
            bold: [...document.querySelectorAll("b")]
                .filter((b) => b.textContent === "lkrun-bold").length,
            links: document.querySelectorAll('a[href^="javascript:"]').length,
            inline: [...document.scripts].filter((s) => !s.src).length,
        };"""
    )
    assert found == {
        "flag": None,
        "alerted": None,
        "imgs": 0,
        "bold": 0,
        "links": 0,
        "inline": 0,
    }, where


def assert_csp_kept(browser: Any, where: str, csp_on: bool) -> None:
    errors = console_errors(browser)
    if csp_on:
        assert errors == [], f"{where}: console errors {errors}"


async def test_participant_text_is_shown_as_text_and_nothing_of_it_runs(
    start_daemon: Any, livekit_server: Any, browser: Any, tmp_path: Path
) -> None:
    name = unique("hostile")
    release = tmp_path / "release"
    daemon = await start_daemon(
        agent_table(name, "hostile_agent:entrypoint"),
        files={"hostile_agent.py": HOSTILE.format(release=str(release))},
    )
    port = (await daemon.status())["http_port"]
    await dispatch(livekit_server, HTML_ROOM, name, metadata=HTML_TEXT)
    job = await job_in_room(daemon, HTML_ROOM, "running")
    job_page = url(port, f"/jobs/{job['id']}")
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CATCH_ALERT})

    # Each pass with the page's CSP, then with it bypassed: then an element made of the
    # markup would run, so only the rendering (text nodes) keeps it inert.
    for csp_on in (True, False):
        browser.execute_cdp_cmd("Page.setBypassCSP", {"enabled": not csp_on})
        where = f"running job, CSP {'on' if csp_on else 'bypassed'}"

        open_view(browser, url(port, "/live"), "live")
        row = f'[data-job-id="{job["id"]}"]'
        wait_until(browser, lambda d, row=row: d.find_elements(*by_testid("live-row", row)))
        room = browser.find_element(By.CSS_SELECTOR, f'{row} [data-testid="live-room"]')
        assert room.get_property("textContent") == HTML_ROOM
        assert_nothing_ran(browser, f"live view, {where}")
        assert_csp_kept(browser, f"live view, {where}", csp_on)

        open_view(browser, job_page, "job")
        assert text_of(browser, "job-room").get_property("textContent") == HTML_ROOM
        assert text_of(browser, "job-metadata").get_property("textContent") == HTML_TEXT
        line = text_of(browser, "log-line", contains=HTML_TEXT)
        # The line as the job wrote it, after the log's timestamp.
        assert line.get_property("textContent").strip().endswith(" " + HTML_TEXT)
        assert_nothing_ran(browser, f"job view, {where}")
        assert_csp_kept(browser, f"job view, {where}", csp_on)

    release.touch()

    async def failed() -> dict[str, Any] | None:
        ended = await daemon.job(job["id"])
        return ended if ended and ended["status"] == "failed" else None

    ended = await wait_for(failed, 30, what="the job to fail with the text as its error")
    assert HTML_TEXT in ended["error"]

    for csp_on in (True, False):
        browser.execute_cdp_cmd("Page.setBypassCSP", {"enabled": not csp_on})
        where = f"failed job, CSP {'on' if csp_on else 'bypassed'}"

        open_view(browser, job_page, "job")
        text_of(browser, "job-status", '[data-status="failed"]')
        assert HTML_TEXT in text_of(browser, "job-error", contains=HTML_TEXT).text
        assert_nothing_ran(browser, f"job view, {where}")
        assert_csp_kept(browser, f"job view, {where}", csp_on)

        open_view(browser, url(port, "/history"), "history")
        row = f'[data-job-id="{job["id"]}"]'
        wait_until(browser, lambda d, row=row: d.find_elements(*by_testid("history-row", row)))
        cells = {
            testid: browser.find_element(
                By.CSS_SELECTOR, f'{row} [data-testid="{testid}"]'
            ).get_property("textContent")
            for testid in ("history-room", "history-error")
        }
        assert cells["history-room"] == HTML_ROOM
        assert HTML_TEXT in cells["history-error"]
        text_of(browser, "failure-error", contains=HTML_TEXT)
        assert_nothing_ran(browser, f"history view, {where}")
        assert_csp_kept(browser, f"history view, {where}", csp_on)

        open_view(browser, url(port, "/"), "overview")
        text_of(browser, "agent-last-failure", contains=HTML_TEXT)
        assert_nothing_ran(browser, f"overview, {where}")
        assert_csp_kept(browser, f"overview, {where}", csp_on)


def test_the_checks_see_markup_rendered_as_html(browser: Any) -> None:
    """What the test above would see of a page that put the same texts in with innerHTML:
    the checks fail (an onerror ran or alert was called, elements made of the text)."""
    markup = json.dumps(HTML_ROOM + HTML_TEXT).replace("</", "<\\/")  # stays in the script
    page = f"""<!doctype html><main id="m"></main><script>
    document.getElementById("m").innerHTML = {markup};
    </script>"""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CATCH_ALERT})
    with serve_html(page) as address:
        browser.get(address)
        wait_js(browser, "window.lkrunXss !== undefined && window.lkrunAlerted === true")
        with pytest.raises(AssertionError):
            assert_nothing_ran(browser, "innerHTML")


def attacker_page(daemon_port: int, job_id: str) -> str:
    """A page of another origin (127.0.0.1 on another port: same site, so a SameSite
    cookie would go along) that tries what a CSRF would: a fetch of each action, with
    and without a made-up CSRF token, then a plain form POST (no script needed)."""
    base = f"http://127.0.0.1:{daemon_port}"
    kill = f"{base}/api/v1/jobs/{job_id}/kill?force=1"
    script = f"""
    const tries = [
      fetch({json.dumps(kill)}, {{method: "POST", mode: "no-cors", credentials: "include"}}),
      fetch({json.dumps(base + "/api/v1/drain")},
            {{method: "POST", mode: "no-cors", credentials: "include"}}),
      fetch({json.dumps(kill)}, {{method: "POST", credentials: "include",
                                 headers: {{"X-CSRF-Token": "0".repeat(64)}}}}),
    ];
    Promise.allSettled(tries).then(() => {{ window.lkrunTried = true; }});
    """
    return f"""<!doctype html><title>elsewhere</title>
    <form id="drain" method="post" action="{base}/api/v1/drain"></form>
    <script>{script}</script>"""


async def assert_attack_refused(daemon: Any, browser: Any, port: int, job_id: str) -> None:
    with serve_html(attacker_page(port, job_id)) as elsewhere:
        browser.get(elsewhere)
        wait_js(browser, "window.lkrunTried === true")
        browser.execute_script("document.getElementById('drain').submit();")
        body = wait_until(
            browser,
            lambda d: (
                d.current_url.startswith(url(port, "/api/v1/drain"))
                and d.find_element(By.TAG_NAME, "body").text
            ),
            what="the form POST's answer",
        )
    assert "refused" in json.loads(body)["error"]
    status = await daemon.status()
    assert status["phase"] == "serving"
    job = await daemon.job(job_id)
    assert job is not None and job["status"] == "running"


async def test_a_page_of_another_origin_cannot_kill_or_drain(
    start_daemon: Any, livekit_server: Any, browser: Any
) -> None:
    name, room = unique("victim"), unique("room")
    daemon = await start_daemon(agent_table(name, WAITS))
    port = (await daemon.status())["http_port"]
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    open_view(browser, url(port, "/live"), "live")  # the operator has the dashboard open
    await assert_attack_refused(daemon, browser, port, job["id"])


async def test_beyond_loopback_without_a_token_the_dashboard_is_refused(
    start_daemon: Any, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LKRUN_DASHBOARD_TOKEN", raising=False)
    # Every interface; the test still talks to 127.0.0.1 only.
    daemon = await start_daemon(agent_table(unique("a")), "--http-addr", "0.0.0.0:0")
    port = (await daemon.status())["http_port"]
    for path in ("/", "/live", "/login", "/api/v1/status", "/static/app.js"):
        browser.get(url(port, path))
        text = browser.find_element(By.TAG_NAME, "body").text
        assert "dashboard_token" in text and "LKRUN_DASHBOARD_TOKEN" in text, path
        assert browser.execute_script("return document.querySelectorAll('main').length") == 0
    async with aiohttp.ClientSession() as session:
        for path, expected in (("/", 403), ("/api/v1/status", 403), ("/healthz", 200)):
            async with session.get(url(port, path)) as resp:
                assert resp.status == expected, path
        async with session.post(url(port, "/api/v1/drain")) as resp:
            assert resp.status == 403
    assert (await daemon.status())["phase"] == "serving"


async def test_beyond_loopback_with_a_token_only_the_login_opens_it(
    start_daemon: Any, livekit_server: Any, browser: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "dashboard-token-" + unique("t")
    monkeypatch.setenv("LKRUN_DASHBOARD_TOKEN", token)
    name, room = unique("victim"), unique("room")
    daemon = await start_daemon(agent_table(name, WAITS), "--http-addr", "0.0.0.0:0")
    port = (await daemon.status())["http_port"]
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")

    browser.get(url(port, "/live"))
    wait_until(browser, lambda d: d.current_url == url(port, "/login"), what="the login page")
    browser.find_element(*by_testid("login-token")).send_keys("wrong-token-0123456789")
    browser.find_element(*by_testid("login-submit")).click()
    wait_until(
        browser, lambda d: d.current_url == url(port, "/login?failed=1"), what="the refusal page"
    )
    wait_until(
        browser,
        lambda d: d.find_element(*by_testid("login-error")).is_displayed(),
        what="the wrong token refused",
    )
    async with aiohttp.ClientSession() as session, session.get(url(port, "/api/v1/status")) as r:
        assert r.status == 401

    browser.find_element(*by_testid("login-token")).send_keys(token)
    browser.find_element(*by_testid("login-submit")).click()
    wait_until(browser, lambda d: d.current_url == url(port, "/"), what="the login to open /")
    assert all(token not in c["value"] for c in browser.get_cookies())
    console(browser)  # the login page's entries: the checks below are the dashboard's
    open_view(browser, url(port, "/live"), "live")
    text_of(browser, "live-row", f'[data-job-id="{job["id"]}"]')
    assert console_errors(browser) == []

    # Signed in, the browser holds the session cookie: another origin's page on the same
    # site (which a SameSite cookie does not stop) still cannot act.
    await assert_attack_refused(daemon, browser, port, job["id"])
