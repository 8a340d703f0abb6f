"""The dashboard's server side, fast: headers, CSP, the token and CSRF rules, JSON shapes,
the ring of samples. A fake daemon view stands in for the daemon (what it answers is the
control API's, tested elsewhere); the browser tests are in test_dashboard_browser.py."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from lkrun.api.control import ControlHandlers
from lkrun.api.health import HealthServer
from lkrun.dashboard import guard
from lkrun.dashboard.guard import Access, DashboardError, resolve_token
from lkrun.dashboard.samples import (
    LATENCY_EDGES_MS,
    AgentSample,
    Sample,
    Samples,
    latency_histogram,
    sample_of,
)
from lkrun.dashboard.server import (
    HISTORY_SCAN,
    MAX_LOG_LINES,
    PAGES,
    Dashboard,
    failure_groups,
    load_assets,
)
from lkrun.jobs.store import JobQuery
from lkrun.manifest import ManifestError, parse_manifest

STATIC = Path(__file__).resolve().parent.parent / "lkrun" / "dashboard" / "static"
TOKEN = "a-dashboard-token-0123456789"


def agent(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "agent": name,
        "retiring": False,
        "connected": True,
        "jobs": 1,
        "max_jobs": 4,
        "full": False,
        "full_reason": "",
        "load": 0.25,
        **extra,
    }


def job(job_id: str, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "agent": "echo",
        "room": "r",
        "status": status,
        "cause": "",
        "error": "",
        "offer_to_start_ms": None,
        **extra,
    }


class FakeView:
    """What the dashboard reads from the daemon (lkrun.api.control.DaemonView)."""

    def __init__(self) -> None:
        self.running = {"AJ_1": job("AJ_1", "running")}
        self.ended = [
            job("AJ_4", "failed", agent="echo", error="boom\ntraceback", cause="raised"),
            job("AJ_3", "failed", agent="other", error="boom", cause="raised"),
            job("AJ_2", "success", offer_to_start_ms=40.0),
            job("AJ_0", "lost", cause="lost"),
        ]
        self.kills: list[tuple[str, bool, str | None]] = []
        self.drains = 0
        self.queries: list[JobQuery | None] = []
        self.lines: list[int] = []  # what each log read asked for

    def status(self) -> dict[str, Any]:
        return {"name": "d1", "cpu": 0.5, "agents": [agent("echo")], "phase": "serving"}

    async def jobs(self, query: JobQuery | None) -> list[dict[str, Any]]:
        self.queries.append(query)
        if query is None:
            return list(self.running.values())
        rows = [*self.running.values(), *self.ended]
        if query.statuses:
            rows = [r for r in rows if r["status"] in query.statuses]
        if query.agent:
            rows = [r for r in rows if r["agent"] == query.agent]
        return rows

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return self.running.get(job_id) or next((j for j in self.ended if j["id"] == job_id), None)

    async def job_chain(self, job_id: str) -> list[dict[str, Any]]:
        return []

    def job_log_tail(self, job_id: str, lines: int) -> list[str]:
        self.lines.append(lines)
        return ["one", "<b>two</b>"][-lines:] if lines else []

    async def follow_job_log(self, job_id: str, lines: int) -> AsyncIterator[str]:
        self.lines.append(lines)
        for line in ("one", "<b>two</b>"):
            yield line

    def kill_job(self, job_id: str, *, force: bool, by: str | None = None) -> str | None:
        if job_id not in self.running:
            return None
        self.kills.append((job_id, force, by))
        return "killed" if force else "shutdown requested"

    def drain(self) -> str:
        self.drains += 1
        return "draining"


def dashboard_app(
    view: FakeView, access: Access, samples: Samples | None = None
) -> web.Application:
    app = web.Application()
    for method, path, handler in Dashboard(view, samples or Samples(), access).routes():  # type: ignore[arg-type]
        app.router.add_route(method, path, handler)
    return app


@pytest.fixture
def view() -> FakeView:
    return FakeView()


@pytest.fixture
async def open_client(view: FakeView) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(dashboard_app(view, Access("127.0.0.1")))) as client:
        yield client


@pytest.fixture
async def token_client(view: FakeView) -> AsyncIterator[TestClient[Any, Any]]:
    app = dashboard_app(view, Access("0.0.0.0", TOKEN))
    async with TestClient(TestServer(app)) as client:
        yield client


async def csrf(client: TestClient[Any, Any], **kwargs: Any) -> str:
    async with client.get("/api/v1/session", **kwargs) as resp:
        assert resp.status == 200
        return (await resp.json())["csrf"]


def same_origin(client: TestClient[Any, Any]) -> dict[str, str]:
    host = f"{client.host}:{client.port}"
    return {"Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin"}


# -- headers -------------------------------------------------------------------------------


def assert_strict_headers(headers: Any) -> None:
    csp = headers["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert "unsafe" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "same-origin"


@pytest.mark.parametrize("path", [p.replace("{job_id}", "AJ_1") for p in PAGES])
async def test_every_view_serves_the_page_with_strict_headers(
    open_client: TestClient[Any, Any], path: str
) -> None:
    async with open_client.get(path) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        assert_strict_headers(resp.headers)
        assert resp.headers["Cache-Control"] == "no-store"
        assert '<script type="module" src="/static/app.js">' in await resp.text()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/status", 200),
        ("/api/v1/jobs/nope", 404),
        ("/static/app.js", 200),
        ("/static/nope.js", 404),
        ("/static/..%2Fserver.py", 404),
        ("/api/v1/jobs/AJ_1/logs?follow=1", 200),
    ],
)
async def test_every_answer_has_the_headers_errors_too(
    open_client: TestClient[Any, Any], path: str, status: int
) -> None:
    async with open_client.get(path) as resp:
        assert resp.status == status
        assert_strict_headers(resp.headers)


async def test_assets_have_their_types(open_client: TestClient[Any, Any]) -> None:
    for name, expected in [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("icon.svg", "image/svg+xml"),
    ]:
        async with open_client.get(f"/static/{name}") as resp:
            assert resp.headers["Content-Type"] == expected
            assert resp.headers["Cache-Control"] == "no-cache"


def test_assets_are_all_packaged_and_none_loads_from_elsewhere_or_parses_html() -> None:
    """Every file of static/ is served; no CDN, no inline script or style (the CSP would
    block them), and no API that parses a string as HTML or code."""
    assets = load_assets()
    assert set(assets) == {p.name for p in STATIC.iterdir()}
    for name, asset in assets.items():
        text = asset.body.decode()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), name
        if name.endswith(".js"):
            for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
                assert banned not in text, (name, banned)
            assert not re.search(r"\beval\(|new Function\(", text), name
        if name.endswith(".html"):
            assert "style=" not in text and "<style" not in text, name
            assert not re.search(r"<script(?![^>]*\bsrc=)", text), name
            assert not re.search(r"\son[a-z]+=", text), name


# -- who may look --------------------------------------------------------------------------


async def test_a_token_less_loopback_dashboard_answers_loopback_names_only(
    open_client: TestClient[Any, Any],
) -> None:
    """DNS rebinding: another site's name resolving to 127.0.0.1 gets nothing."""
    for host, status in [
        ("127.0.0.1:8081", 200),
        ("localhost:8081", 200),
        ("[::1]:8081", 200),
        ("evil.example:8081", 421),
        ("127.0.0.1.evil.example", 421),
    ]:
        async with open_client.get("/api/v1/status", headers={"Host": host}) as resp:
            assert resp.status == status, host


async def test_no_token_and_not_loopback_serves_it_disabled_and_health_as_before(
    view: FakeView,
) -> None:
    health = HealthServer("127.0.0.1", 0, ready=lambda: (True, ""))
    access = Access("0.0.0.0")  # as a daemon listening on every interface would have it
    for method, path, handler in Dashboard(view, Samples(), access).routes():  # type: ignore[arg-type]
        health.add_route(path, handler, method)
    await health.start()
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{health.port}") as session:
            for path in ("/", "/live", "/static/app.js", "/api/v1/status", "/login"):
                async with session.get(path) as resp:
                    assert resp.status == 403, path
                    text = await resp.text()
                    assert "dashboard_token" in text and "LKRUN_DASHBOARD_TOKEN" in text
                    assert text.count("\n") == 1
            async with session.post("/api/v1/drain") as resp:
                assert resp.status == 403
            async with session.get("/healthz") as resp:
                assert resp.status == 200
    finally:
        await health.stop()
    assert view.drains == 0


async def test_with_a_token_nothing_is_shown_without_it(
    token_client: TestClient[Any, Any],
) -> None:
    async with token_client.get("/api/v1/status") as resp:
        assert resp.status == 401
        assert "error" in await resp.json()
    async with token_client.get("/live", allow_redirects=False) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "/login")
    async with token_client.get(
        "/api/v1/status", headers={"Authorization": "Bearer wrong-token-0123456789"}
    ) as resp:
        assert resp.status == 401
    async with token_client.get(
        "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as resp:
        assert resp.status == 200
    # A token guards against other names' pages already: no Host check then.
    async with token_client.get(
        "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}", "Host": "lk.example"}
    ) as resp:
        assert resp.status == 200
    async with token_client.get("/login") as resp:
        assert resp.status == 200 and 'data-testid="login-token"' in await resp.text()


async def test_signing_in_sets_a_strict_cookie_that_is_not_the_token(
    token_client: TestClient[Any, Any],
) -> None:
    origin = same_origin(token_client)
    async with token_client.post(
        "/login", data={"token": "wrong"}, headers=origin, allow_redirects=False
    ) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "/login?failed=1")
        assert not resp.cookies  # no session cookie, under any name
    async with token_client.post(
        "/login",
        data={"token": TOKEN},
        headers={"Origin": "http://evil.example"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 403
    async with token_client.post(
        "/login", data={"token": TOKEN}, headers=origin, allow_redirects=False
    ) as resp:
        assert (resp.status, resp.headers["Location"]) == (303, "/")
        # Named for the daemon's port: two daemons on one host keep their own sessions.
        name = guard.cookie_name(token_client.port)
        assert name == f"lkrun_dashboard_{token_client.port}" and list(resp.cookies) == [name]
        cookie = resp.cookies[name]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        assert not cookie["secure"]  # plain http: a Secure cookie would never come back
        assert TOKEN not in cookie.value
    async with token_client.get("/api/v1/status") as resp:  # the session carries the cookie
        assert resp.status == 200
    session = token_client.session.cookie_jar.filter_cookies(token_client.make_url("/"))
    value = session[name].value
    token_client.session.cookie_jar.clear()
    other_port = {guard.cookie_name(token_client.port + 1): value}
    async with token_client.get("/api/v1/status", cookies=other_port) as resp:
        assert resp.status == 401  # another daemon's cookie is not this one's session
    async with token_client.get("/api/v1/status", cookies={name: value}) as resp:
        assert resp.status == 200


async def test_the_cookie_is_secure_when_the_browser_came_over_https(
    token_client: TestClient[Any, Any],
) -> None:
    """Behind a TLS reverse proxy: the daemon is asked over http, the proxy says https."""
    origin = {"Origin": "https://lk.example", "Host": "lk.example", "Sec-Fetch-Site": "same-origin"}
    async with token_client.post(
        "/login",
        data={"token": TOKEN},
        headers={**origin, "X-Forwarded-Proto": "https"},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        assert resp.cookies[guard.cookie_name(token_client.port)]["secure"]
    assert guard.over_https(True, {}) and guard.over_https(False, {"X-Forwarded-Proto": "HTTPS"})
    assert guard.over_https(False, {"X-Forwarded-Proto": "https, http"})
    assert not guard.over_https(False, {"X-Forwarded-Proto": "http"})
    assert not guard.over_https(False, {})


def test_behind_a_tls_proxy_the_origin_check_ignores_the_scheme() -> None:
    """Sec-Fetch-Site, when sent, alone decides (the browser sets it, not the page); else
    the Origin's host[:port] must be the Host's, whatever the scheme."""
    access = Access("127.0.0.1", TOKEN)
    # A modern browser behind a proxy that rewrites Host: the page is https://lk.example.
    proxied = {"Host": "127.0.0.1:8081", "Origin": "https://lk.example"}
    assert access.action_refused({**proxied, "Sec-Fetch-Site": "same-origin"}) == ""
    for site in ("same-site", "cross-site", "none"):
        assert "Sec-Fetch-Site" in access.action_refused({**proxied, "Sec-Fetch-Site": site})
    # Without Sec-Fetch-Site: the Origin's host and port against the Host, any scheme.
    for host, origin in (
        ("lk.example", "https://lk.example"),
        ("lk.example:8443", "https://LK.example:8443"),
        ("127.0.0.1:8081", "http://127.0.0.1:8081"),
    ):
        assert access.action_refused({"Host": host, "Origin": origin}) == "", origin
    assert access.action_refused({"Host": "lk.example"}) == ""  # no Origin: a script
    for origin in (
        "https://evil.example",
        "https://lk.example:444",
        "https://lk.example.evil.example",
        "null",
        "lk.example",
        "ftp://lk.example",
        "https://[::1",
    ):
        assert "Origin" in access.action_refused({"Host": "lk.example", "Origin": origin}), origin
    assert access.action_refused(proxied) != ""  # a rewritten Host needs Sec-Fetch-Site
    # An action still needs the CSRF token, from either kind of browser.
    assert access.csrf_refused({"Sec-Fetch-Site": "same-origin"}) != ""


async def test_bytes_that_are_not_utf8_are_a_wrong_token_not_a_500(
    token_client: TestClient[Any, Any],
) -> None:
    """aiohttp hands such header bytes over as lone surrogates, which do not encode."""
    access = Access("0.0.0.0", TOKEN)
    bad = "\udcff\udcfe"
    assert not access.token_matches(bad) and not access.token_matches("é" * 20)
    assert not access.bearer({"Authorization": f"Bearer {bad}"})
    assert not access.signed_in({}, {guard.cookie_name(8081): bad}, 8081)
    assert access.csrf_refused({guard.CSRF_HEADER: bad}).startswith("wrong")
    raw = [
        (b"GET /api/v1/status", b"Authorization: Bearer \xff\xfe\xc3("),
        (b"GET /api/v1/status", b"Cookie: " + guard.cookie_name(token_client.port).encode()
         + b"=\xff\xfe"),
        (b"GET /api/v1/status", b"Authorization: Bearer \xc3\xa9\xc3\xa9"),  # UTF-8, not ASCII
    ]  # fmt: skip
    for request_line, header in raw:
        status, head = await raw_request(token_client, request_line, [header])
        assert status == 401, header
        assert_strict_headers(head)
    # The login form, its body not UTF-8: the form again, as for a wrong token.
    status, head = await raw_request(
        token_client,
        b"POST /login",
        [b"Content-Type: application/x-www-form-urlencoded", b"Sec-Fetch-Site: same-origin"],
        body=b"token=\xff\xfe\xfd",
    )
    assert (status, head["Location"]) == (303, "/login?failed=1")
    assert_strict_headers(head)


async def raw_request(
    client: TestClient[Any, Any], request_line: bytes, headers: list[bytes], body: bytes = b""
) -> tuple[int, dict[str, str]]:
    """Send bytes no HTTP client library would (headers that are not UTF-8)."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    try:
        lines = [
            request_line + b" HTTP/1.1",
            f"Host: {client.host}:{client.port}".encode(),
            b"Connection: close",
            f"Content-Length: {len(body)}".encode(),
            *headers,
        ]
        writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        await writer.drain()
        answer = await reader.read()
    finally:
        writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), fields


def test_without_a_token_login_is_not_needed() -> None:
    assert Access("127.0.0.1").open and not Access("127.0.0.1").disabled
    assert Access("[::1]").open and Access("localhost").open
    assert Access("0.0.0.0").disabled and Access("192.168.1.4").disabled
    assert not Access("0.0.0.0", TOKEN).disabled and not Access("127.0.0.1", TOKEN).open


# -- actions -------------------------------------------------------------------------------


async def test_an_action_needs_the_csrf_token_and_the_same_origin(
    open_client: TestClient[Any, Any], view: FakeView
) -> None:
    token = await csrf(open_client)
    ok = {**same_origin(open_client), guard.CSRF_HEADER: token}
    no_fetch_site = {"Origin": ok["Origin"], guard.CSRF_HEADER: token}
    refused = [
        {},  # no CSRF token
        {**ok, guard.CSRF_HEADER: "0" * 64},
        {**no_fetch_site, "Origin": "http://evil.example"},
        {**no_fetch_site, "Origin": "null"},
        {**ok, "Sec-Fetch-Site": "cross-site"},
        {**ok, "Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "same-origin"},  # same origin, but no CSRF token
    ]
    for headers in refused:
        async with open_client.post("/api/v1/jobs/AJ_1/kill", headers=headers) as resp:
            assert resp.status == 403, headers
            assert_strict_headers(resp.headers)
    assert view.kills == []
    async with open_client.get("/api/v1/jobs/AJ_1/kill") as resp:
        assert resp.status == 405  # GET never acts
    async with open_client.post("/api/v1/jobs/AJ_1/kill", headers=ok) as resp:
        assert resp.status == 200
        assert await resp.json() == {"job_id": "AJ_1", "action": "shutdown requested"}
    async with open_client.post("/api/v1/jobs/AJ_1/kill?force=1", headers=ok) as resp:
        assert (await resp.json())["action"] == "killed"
    assert view.kills == [("AJ_1", False, "the dashboard"), ("AJ_1", True, "the dashboard")]
    async with open_client.post("/api/v1/jobs/AJ_2/kill", headers=ok) as resp:
        assert resp.status == 409  # ended
    async with open_client.post("/api/v1/jobs/AJ_9/kill", headers=ok) as resp:
        assert resp.status == 404
    async with open_client.post("/api/v1/drain", headers=ok) as resp:
        assert await resp.json() == {"phase": "draining"}
    assert view.drains == 1


async def test_a_script_with_the_bearer_token_needs_no_csrf_token(
    token_client: TestClient[Any, Any], view: FakeView
) -> None:
    async with token_client.post(
        "/api/v1/drain", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as resp:
        assert resp.status == 200
    async with token_client.post("/api/v1/drain") as resp:
        assert resp.status == 401
    assert view.drains == 1


async def test_the_csrf_token_belongs_to_the_session_and_the_daemon() -> None:
    first, second = Access("0.0.0.0", TOKEN), Access("0.0.0.0", TOKEN)
    assert first.csrf() != second.csrf()  # a restarted daemon signs anew
    assert first.session == second.session  # but the login stays valid
    assert len(first.csrf()) == 64 and first.csrf_refused({guard.CSRF_HEADER: first.csrf()}) == ""


# -- token settings ------------------------------------------------------------------------


def test_the_manifests_token_wins_over_the_environment() -> None:
    other = "from-the-environment-0123"
    assert resolve_token(TOKEN, {guard.ENV_TOKEN: other}) == TOKEN
    assert resolve_token("", {guard.ENV_TOKEN: other}) == other
    assert resolve_token("", {}) == ""
    with pytest.raises(DashboardError, match="LKRUN_DASHBOARD_TOKEN must be at least 16") as e:
        resolve_token("", {guard.ENV_TOKEN: "short"})
    assert "short" not in str(e.value).split("must")[1]


@pytest.mark.parametrize("value", ['"short"', "12", '" padded-token-012345 "'])
def test_a_weak_token_in_the_manifest_is_refused_without_showing_it(value: str) -> None:
    text = f"[daemon]\ndashboard_token = {value}\n[agents.a]\nentrypoint = 'x:y'\n"
    with pytest.raises(ManifestError, match=r"daemon\.dashboard_token") as e:
        parse_manifest(text, "agents.toml")
    assert value.strip('"').strip() not in str(e.value)


def test_dashboard_settings_default_on_and_hide_the_token() -> None:
    text = f"[daemon]\ndashboard_token = '{TOKEN}'\n[agents.a]\nentrypoint = 'x:y'\n"
    settings = parse_manifest(text, "agents.toml").daemon
    assert settings.dashboard is True and settings.dashboard_token == TOKEN
    assert TOKEN not in repr(settings)
    off = parse_manifest("[daemon]\ndashboard = false\n[agents.a]\nentrypoint = 'x:y'\n", "a")
    assert off.daemon.dashboard is False


# -- JSON shapes ---------------------------------------------------------------------------


async def test_history_groups_failures_and_counts_per_agent(
    open_client: TestClient[Any, Any], view: FakeView
) -> None:
    async with open_client.get("/api/v1/history") as resp:
        data = await resp.json()
    assert [j["id"] for j in data["jobs"]] == ["AJ_4", "AJ_3", "AJ_2", "AJ_0"]  # ended only
    assert data["failures"] == [
        {"error": "boom", "count": 2, "agents": ["echo", "other"], "last_job": "AJ_4",
         "causes": ["raised"]},
        {"error": "(lost, no error text)", "count": 1, "agents": ["echo"], "last_job": "AJ_0",
         "causes": ["lost"]},
    ]  # fmt: skip
    echo = next(c for c in data["counts"] if c["agent"] == "echo")
    assert (echo["total"], echo["success"], echo["failed"], echo["lost"]) == (3, 1, 1, 1)
    assert echo["last_failure"]["id"] == "AJ_4"
    assert data["agents"] == ["echo", "other"]
    async with open_client.get("/api/v1/history?agent=other&status=failed&limit=1") as resp:
        data = await resp.json()
    assert [j["id"] for j in data["jobs"]] == ["AJ_3"] and data["matched"] == 1
    async with open_client.get("/api/v1/history?status=nope") as resp:
        assert resp.status == 400


async def test_charts_send_the_ring_and_the_latency_distribution(view: FakeView) -> None:
    samples = Samples(interval=10, span=60)
    now = time.time()
    samples.add(Sample(now - 20, 0.5, {"echo": AgentSample(1, 4, 0.25, False)}))
    samples.add(Sample(now - 10, 0.6, {"echo": AgentSample(4, 4, 1.0, True)}))
    app = dashboard_app(view, Access("127.0.0.1"), samples)
    async with TestClient(TestServer(app)) as client, client.get("/api/v1/charts") as resp:
        data = await resp.json()
    assert data["samples"]["agents"]["echo"]["jobs"] == [1, 4]
    assert data["samples"]["agents"]["echo"]["full"] == [False, True]
    assert data["latency"]["samples"] == 1 and data["latency"]["p50_ms"] == 40.0
    assert view.queries[-1] is not None and view.queries[-1].since is not None


async def test_the_log_streams_as_text_with_the_headers(open_client: TestClient[Any, Any]) -> None:
    async with open_client.get("/api/v1/jobs/AJ_1/logs?follow=1") as resp:
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert_strict_headers(resp.headers)
        assert resp.headers["X-Frame-Options"] == "DENY"
        assert resp.headers["Cache-Control"] == "no-store"  # sent before the guard's
        assert await resp.text() == "one\n<b>two</b>\n"
    async with open_client.get("/api/v1/jobs/AJ_1/logs") as resp:  # not followed: the guard's
        assert_strict_headers(resp.headers)
        assert resp.headers["Cache-Control"] == "no-store"


async def test_the_dashboard_caps_job_listings_and_log_lines(
    open_client: TestClient[Any, Any], view: FakeView
) -> None:
    """limit=0 means "no limit" on the control socket; on the dashboard it is the cap, as
    is any larger limit; a log's tail and a job's lines are capped the same way."""
    for limit, expected in (("0", HISTORY_SCAN), ("-1", HISTORY_SCAN), ("999999", HISTORY_SCAN),
                            ("50", 50)):  # fmt: skip
        async with open_client.get(f"/api/v1/jobs?all=1&limit={limit}") as resp:
            assert resp.status == 200
        query = view.queries[-1]
        assert query is not None and query.limit == expected, limit
    for path in ("/api/v1/jobs/AJ_1?lines=100000000", "/api/v1/jobs/AJ_1/logs?tail=100000000",
                 "/api/v1/jobs/AJ_1/logs?tail=100000000&follow=1"):  # fmt: skip
        async with open_client.get(path) as resp:
            assert resp.status == 200, path
            await resp.read()
        assert view.lines[-1] == MAX_LOG_LINES, path
    async with open_client.get("/api/v1/jobs/AJ_1/logs?tail=5") as resp:
        assert resp.status == 200 and view.lines[-1] == 5


async def test_the_control_socket_handlers_have_no_cap(view: FakeView) -> None:
    app = web.Application()
    ControlHandlers(view).add_to(app)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        async with client.get("/v1/jobs?all=1&limit=0") as resp:
            assert resp.status == 200
        async with client.get("/v1/jobs/AJ_1/logs?tail=100000000") as resp:
            assert resp.status == 200
    query = view.queries[-1]
    assert query is not None and query.limit == 0 and view.lines[-1] == 100000000


def test_failures_are_grouped_by_the_first_line_of_their_error() -> None:
    rows = [job("a", "failed", error="x\n1"), job("b", "failed", error="x\n2"), job("c", "success")]
    assert [(g["error"], g["count"]) for g in failure_groups(rows)] == [("x", 2)]


# -- the ring ------------------------------------------------------------------------------


def test_the_ring_keeps_its_span_and_forgets_the_rest() -> None:
    samples = Samples(interval=10, span=60)
    for i in range(20):
        samples.add(Sample(1000.0 + 10 * i, 0.0, {"a": AgentSample(i, 5, 0.1, False)}))
    assert len(samples) == 7  # 60 s of 10 s samples, both ends included
    data = samples.to_dict(now=1190.0)
    assert data["at"][0] == 1130.0 and data["agents"]["a"]["jobs"] == [13, 14, 15, 16, 17, 18, 19]


def test_an_agent_missing_from_a_sample_has_a_gap() -> None:
    samples = Samples(interval=10, span=60)
    samples.add(Sample(100.0, 0.1, {"a": AgentSample(1, 2, 0.5, False)}))
    samples.add(Sample(110.0, 0.1, {"b": AgentSample(2, 2, 1.0, True)}))
    data = samples.to_dict(now=110.0)
    assert data["agents"]["a"]["jobs"] == [1, None]
    assert data["agents"]["b"]["full"] == [None, True]


def test_a_retiring_registration_adds_its_jobs_to_its_agent() -> None:
    status = {
        "cpu": 0.3,
        "agents": [
            agent("a", jobs=2, max_jobs=8, load=0.25),
            agent("a", jobs=3, max_jobs=4, load=0.75, retiring=True),
            agent("b", jobs=0, full=True),
        ],
    }
    sample = sample_of(status, 5.0)
    assert sample.agents["a"] == AgentSample(5, 8, 0.25, False)  # the current one's settings
    assert sample.agents["b"].full and sample.cpu == 0.3


async def test_the_sampler_samples_every_interval() -> None:
    samples = Samples(interval=10, span=60)
    ticks = iter(range(3))
    now = [0.0]

    async def sleep(seconds: float) -> None:
        assert seconds == 10
        now[0] += seconds
        if next(ticks) == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        await samples.run(lambda: {"cpu": 0.0, "agents": [agent("a")]}, clock=lambda: now[0],
                          sleep=sleep)  # fmt: skip
    assert [s.at for s in samples.since(0)] == [0.0, 10.0, 20.0]


async def test_a_failing_sample_is_skipped_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    samples = Samples(interval=10, span=600)
    now = [0.0]
    calls = iter(range(100))

    def status() -> dict[str, Any]:
        n = next(calls)
        if n in (1, 2, 3, 5):
            raise KeyError("agents")  # the same error, four times
        if n == 4:
            raise ValueError("another")
        return {"cpu": 0.0, "agents": [agent("a")]}

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        if now[0] >= 80:
            raise asyncio.CancelledError

    with (
        caplog.at_level("WARNING", logger="lkrun.dashboard"),
        pytest.raises(asyncio.CancelledError),
    ):
        await samples.run(status, clock=lambda: now[0], sleep=sleep)
    # Sampling went on past the failures: every other tick has its sample.
    assert [s.at for s in samples.since(0)] == [0.0, 60.0, 70.0]
    skipped = [r for r in caplog.records if "sample skipped" in r.getMessage()]
    assert [r.getMessage() for r in skipped] == [
        "dashboard sample skipped: KeyError: 'agents'",
        "dashboard sample skipped: ValueError: another",
    ]
    assert skipped[0].exc_info is not None


def test_latency_histogram() -> None:
    found = latency_histogram([1, 5, 6, 30, 20000, 100])
    assert found["counts"][0] == 2  # <= 5 ms
    assert found["counts"][1] == 1 and found["counts"][3] == 1 and found["counts"][-1] == 1
    assert sum(found["counts"]) == 6 and len(found["counts"]) == len(LATENCY_EDGES_MS) + 1
    assert (found["p50_ms"], found["p95_ms"], found["max_ms"]) == (6, 20000, 20000)
    assert latency_histogram([])["p50_ms"] is None


def test_the_docstring_lists_every_testid_the_page_sets_and_only_those() -> None:
    """lkrun.dashboard's docstring is the browser tests' contract: every data-testid the
    page sets is listed there, and every name listed is set somewhere in the page."""
    import lkrun.dashboard

    assert lkrun.dashboard.__doc__ is not None
    listed = lkrun.dashboard.__doc__.split("data-testid attributes", 1)[1]
    sources = {p.name: p.read_text() for p in STATIC.iterdir() if p.suffix in (".js", ".html")}
    set_by_page = {
        name
        for text in sources.values()
        for name in re.findall(r'(?:data-testid="|testid: ")([a-z-]+)"', text)
    }
    assert set_by_page, "no data-testid found"
    for name in set_by_page:
        assert re.search(rf"(?<![\w-]){name}(?![\w-])", listed), f"{name} not in the docstring"
    names = set(re.findall(r"(?<![\w-])(?!data-)[a-z]+(?:-[a-z]+)+(?![\w-])", listed))
    for name in names:
        assert any(f'"{name}"' in text for text in sources.values()), f"{name} not in the page"
