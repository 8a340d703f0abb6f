"""A real headless browser for the dashboard's tests: Debian's chromium driven by Selenium.

The ``browser`` fixture (e2e: it starts chromedriver and chromium) yields a Selenium
``WebDriver`` on a fresh profile in the test's tmp_path, at a fixed window size so
screenshots are comparable, and always quits it. ``make browser`` (run by ``make test``)
installs the two system packages; a machine without them fails here with one line saying
what to install, never a skipped test::

    def test_page(browser):
        browser.get(url)
        wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "[data-testid=x]"))
        assert console_errors(browser) == []
        screenshot(browser, "overview")  # docs/screenshots/overview.png with LKRUN_SCREENSHOTS=1

The system's chromedriver is passed to Selenium explicitly, so selenium-manager (which
would download a driver and a browser) never runs: the fixture makes it raise if anything
calls it. ``LKRUN_CHROMIUM`` and ``LKRUN_CHROMEDRIVER`` point at other binaries.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.selenium_manager import SeleniumManager
from selenium.webdriver.support.wait import WebDriverWait

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "docs" / "screenshots"
WINDOW = (1280, 900)
T = TypeVar("T")


def _binary(env: str, names: tuple[str, ...]) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    for name in names:
        if found := shutil.which(name):
            return found
    return None


def binaries() -> tuple[str, str]:
    """(chromium, chromedriver), or a test failure that says how to get them."""
    chromium = _binary("LKRUN_CHROMIUM", ("chromium", "chromium-browser"))
    driver = _binary("LKRUN_CHROMEDRIVER", ("chromedriver",))
    if chromium is None or driver is None:
        pytest.fail(
            "chromium and chromedriver not found: run `make browser` (Debian/Ubuntu: "
            "apt-get install chromium chromium-driver) or set LKRUN_CHROMIUM and "
            "LKRUN_CHROMEDRIVER",
            pytrace=False,
        )
    return chromium, driver


def options(profile: Path) -> webdriver.ChromeOptions:
    chromium, _ = binaries()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    opts.add_argument("--headless=new")
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    opts.add_argument("--force-device-scale-factor=1")
    # /dev/shm is 64 MB in many containers: chromium's renderer crashes when it fills up.
    opts.add_argument("--disable-dev-shm-usage")
    # Nothing of the browser's own may reach the network: tests talk to 127.0.0.1 only.
    opts.add_argument("--no-first-run")
    opts.add_argument("--disable-background-networking")
    opts.add_argument("--disable-component-update")
    opts.add_argument("--disable-sync")
    if os.geteuid() == 0:
        # chromium refuses to start its sandbox as root (CI, containers).
        opts.add_argument("--no-sandbox")
    # The console (CSP violations, uncaught errors) readable through get_log("browser").
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return opts


def _no_selenium_manager(*_args: Any, **_kwargs: Any) -> Any:
    raise RuntimeError("selenium-manager must not run: pass the system's chromedriver")


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    """Headless chromium on a fresh profile, quit at teardown whatever the test did."""
    _, driver_path = binaries()
    monkeypatch.setattr(SeleniumManager, "binary_paths", _no_selenium_manager)
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options(tmp_path / "profile"))
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            # quit() asks chromedriver to close chromium; if that failed, end the driver
            # process ourselves (chromium is its child and goes with it).
            if service.process is not None and service.process.poll() is None:
                service.process.kill()
                service.process.wait(timeout=10)


def wait_until(
    driver: webdriver.Chrome,
    condition: Callable[[webdriver.Chrome], T],
    timeout: float = 15.0,
    what: str = "the condition",
) -> T:
    """Poll ``condition(driver)`` until it returns something truthy, which is returned;
    fails the test naming ``what`` and the page's URL after ``timeout`` seconds.

    An element found by one poll can be replaced before the condition reads it (a form
    POST navigating, a view re-rendering its rows): that poll counts as not met yet."""
    waiter = WebDriverWait(
        driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
    )
    try:
        return waiter.until(condition)
    except TimeoutException:
        pytest.fail(f"{what} not met within {timeout} s on {driver.current_url}", pytrace=False)


def wait_js(driver: webdriver.Chrome, expression: str, timeout: float = 15.0) -> Any:
    """Wait until the JavaScript ``expression`` is truthy in the page; return its value."""
    return wait_until(
        driver, lambda d: d.execute_script(f"return ({expression});"), timeout, expression
    )


def console(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The console entries since the last call (each read once): level, message, source."""
    return driver.get_log("browser")


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The console's errors since the last read (CSP violations, uncaught exceptions)."""
    return [e["message"] for e in console(driver) if e["level"] == "SEVERE"]


# A screenshot grows with its page up to this height, so a long table is not cut off.
SCREENSHOT_MAX_HEIGHT = 2000


def screenshot(driver: webdriver.Chrome, name: str) -> Path | None:
    """Save the page as docs/screenshots/<name>.png for the README, only when
    LKRUN_SCREENSHOTS=1, so ordinary runs leave the committed images alone. The picture is
    WINDOW wide and shows the whole page (up to SCREENSHOT_MAX_HEIGHT), the window's
    viewport at least."""
    if os.environ.get("LKRUN_SCREENSHOTS") != "1":
        return None
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # The window's height includes what headless chromium keeps for its own frame.
    page, frame = driver.execute_script(
        "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight]"
    )
    height = min(int(page), SCREENSHOT_MAX_HEIGHT) + int(frame)
    driver.set_window_size(WINDOW[0], max(WINDOW[1], height))
    try:
        driver.save_screenshot(str(path))
    finally:
        driver.set_window_size(*WINDOW)
    return path


@contextlib.contextmanager
def serve_html(body: str, headers: Mapping[str, str] | None = None) -> Iterator[str]:
    """Serve one HTML page at every path of http://127.0.0.1:PORT/ (a thread, so the page
    loads while the test blocks on the browser); yields that URL. For pages of another
    origin than the daemon's, and for checking what a header such as a CSP does."""
    raw = body.encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(raw)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # nothing on the test's output

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, name="serve_html", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
