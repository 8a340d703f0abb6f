"""The browser harness itself (tests/browser.py): chromium starts headless from the
system's packages, runs a page's script, reports its console errors, and quits; `make
browser` says what to install where it cannot install it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from selenium.webdriver.common.by import By

from tests.browser import (
    REPO,
    WINDOW,
    console_errors,
    screenshot,
    serve_html,
    wait_js,
    wait_until,
)

PAGE = """<!doctype html><title>t</title><p id="out">waiting</p><script>
setTimeout(() => { document.getElementById("out").textContent = "ran"; }, 200);
console.error("harness-error-" + 42);
</script>"""


def test_browser_runs_a_page_and_reads_its_console(browser) -> None:
    browser.get("data:text/html," + quote(PAGE))
    out = wait_until(
        browser,
        lambda d: d.find_element(By.ID, "out").text == "ran" and d.find_element(By.ID, "out"),
        what="the page's script",
    )
    assert out.get_property("textContent") == "ran"
    assert wait_js(browser, "document.title") == "t"
    assert any("harness-error-42" in m for m in console_errors(browser))
    assert browser.get_window_size() == {"width": WINDOW[0], "height": WINDOW[1]}


INLINE = """<!doctype html><p id="out">static</p>
<img src="x" onerror="window.ranInline = 'handler'">
<script>window.ranInline = window.ranInline || "script";
document.getElementById("out").textContent = "script ran";</script>"""


def test_a_csp_blocks_inline_script_says_so_in_the_console_and_can_be_bypassed(browser) -> None:
    """What the dashboard's security tests rely on: under a CSP without 'unsafe-inline' no
    inline script or handler runs and each refusal is a console error; with the CSP
    bypassed (Page.setBypassCSP) the same markup runs, so a page that stays inert then
    is inert by its own rendering, not only by its CSP."""
    with serve_html(INLINE, {"Content-Security-Policy": "script-src 'self'"}) as url:
        browser.get(url)
        wait_js(browser, "document.readyState === 'complete'")
        assert browser.execute_script("return window.ranInline ?? null") is None
        errors = console_errors(browser)
        assert any("Content Security Policy" in m for m in errors), errors
        browser.execute_cdp_cmd("Page.setBypassCSP", {"enabled": True})
        browser.get(url)
        assert wait_js(browser, "window.ranInline") in ("script", "handler")


def test_screenshots_only_when_asked(browser, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LKRUN_SCREENSHOTS", raising=False)
    browser.get("data:text/html,<p>x</p>")
    assert screenshot(browser, "never-written") is None


def _make_browser(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed", pytrace=False)
    return subprocess.run(
        [make, "-s", "-C", str(REPO), "browser"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _path_without_chromium(tmp_path: Path) -> str:
    """A PATH with no chromium or chromedriver, and an `id` that says we are not root (so
    no apt-get)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_id = bin_dir / "id"
    fake_id.write_text("#!/bin/sh\necho 1000\n")
    fake_id.chmod(0o755)
    return str(bin_dir)


@pytest.mark.e2e
def test_make_browser_says_what_to_install(tmp_path: Path) -> None:
    result = _make_browser({"PATH": _path_without_chromium(tmp_path)})
    assert result.returncode != 0
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "apt-get install chromium chromium-driver" in error[0]


@pytest.mark.e2e
def test_make_browser_takes_lkrun_chromium_and_chromedriver(tmp_path: Path) -> None:
    env = {"PATH": _path_without_chromium(tmp_path)}
    for name in ("chromium", "chromedriver"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 0\n")
        (tmp_path / name).chmod(0o755)
        env[f"LKRUN_{name.upper()}"] = str(tmp_path / name)
    assert _make_browser(env).returncode == 0
    env["LKRUN_CHROMEDRIVER"] = str(tmp_path / "missing")
    assert _make_browser(env).returncode != 0
