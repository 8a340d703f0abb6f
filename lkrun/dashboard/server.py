"""The dashboard's routes, mounted on the daemon's health server (lkrun.api.health).

The JSON it serves is the control API's (lkrun.api.control.ControlHandlers, under
/api/v1/), plus what only the page needs: the CSRF token, the history summary and the
charts. Every route goes through ``Dashboard._guarded`` (lkrun.dashboard.guard's rules).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from aiohttp import web

from lkrun.api.control import ControlHandlers, DaemonView, parse_query
from lkrun.dashboard.guard import SECURITY_HEADERS, Access, cookie_name, over_https
from lkrun.dashboard.samples import Samples, latency_histogram
from lkrun.jobs.fields import ENDED_STATUSES
from lkrun.jobs.store import JobQuery

log = logging.getLogger("lkrun.dashboard")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Kind = Literal["page", "static", "login", "api", "action"]

# The views: each path serves the page shell; app.js draws what the path names.
PAGES = ("/", "/live", "/history", "/charts", "/jobs/{job_id}")
# History: the newest this many matching jobs are grouped and counted.
HISTORY_SCAN = 5000
# The most log lines a page or script gets in one answer (a job's tail, a log's ?tail=).
MAX_LOG_LINES = 10000
HISTORY_ROWS = 200
FAILED = ("failed", "lost")

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_STATIC_NAME = re.compile(r"[a-z0-9_-]+\.(html|js|css|svg)")


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


def load_assets() -> dict[str, Asset]:
    """Every file of lkrun/dashboard/static, read once: what /static/NAME may serve."""
    assets: dict[str, Asset] = {}
    for entry in resources.files("lkrun.dashboard").joinpath("static").iterdir():
        name = entry.name
        if entry.is_file() and _STATIC_NAME.fullmatch(name):
            suffix = name[name.rindex(".") :]
            assets[name] = Asset(entry.read_bytes(), _CONTENT_TYPES[suffix])
    return assets


class Dashboard:
    def __init__(self, view: DaemonView, samples: Samples, access: Access) -> None:
        self.view = view
        self.samples = samples
        self.access = access
        # The followed log is sent before _guarded could add headers: it gets them here.
        self.control = ControlHandlers(
            view,
            by="the dashboard",
            headers={**SECURITY_HEADERS, "Cache-Control": "no-store"},
            max_jobs=HISTORY_SCAN,
            max_lines=MAX_LOG_LINES,
        )
        self.assets = load_assets()

    def routes(self) -> list[tuple[str, str, Handler]]:
        """(method, path, handler) for every route, each guarded."""
        routes: list[tuple[str, str, Handler, Kind]] = [
            *(("GET", path, self._page, "page") for path in PAGES),
            ("GET", "/login", self._login_page, "login"),
            ("POST", "/login", self._login, "login"),
            ("GET", "/static/{name}", self._static, "static"),
            ("GET", "/api/v1/session", self._session, "api"),
            ("GET", "/api/v1/history", self._history, "api"),
            ("GET", "/api/v1/charts", self._charts, "api"),
        ]
        for method, route, handler in self.control.routes():
            kind: Kind = "action" if method == "POST" else "api"
            routes.append((method, "/api" + route, handler, kind))
        return [(m, p, self._guarded(h, kind)) for m, p, h, kind in routes]

    # -- the guard -----------------------------------------------------------------------

    def _guarded(self, handler: Handler, kind: Kind) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                response = await self._checked(request, handler, kind)
            except web.HTTPException as exc:
                response = _error(exc.status, exc.text or exc.reason, api=kind != "page")
            except Exception:  # a bug: still an answer with the headers, not aiohttp's 500
                log.exception("dashboard: %s %s failed", request.method, request.path)
                response = _error(500, "internal error (in the daemon's log)", api=kind != "page")
            if not response.prepared:
                response.headers.update(SECURITY_HEADERS)
                if kind != "static":
                    response.headers.setdefault("Cache-Control", "no-store")
            return response

        return guarded

    async def _checked(self, request: web.Request, handler: Handler, kind: Kind) -> Any:
        access = self.access
        if access.disabled:
            return web.Response(status=403, text=access.disabled_reason() + "\n")
        if not access.host_allowed(request.headers.get("Host", "")):
            # 421: this server does not answer for that name.
            return web.Response(status=421, text="this dashboard answers on loopback names only\n")
        if kind in ("static", "login"):
            return await handler(request)
        if not access.signed_in(request.headers, request.cookies, _port(request)):
            if kind == "page":
                return _redirect("/login")
            return _error(401, "sign in first: the dashboard needs its token", api=True)
        if kind == "action" and not access.bearer(request.headers):
            refused = access.action_refused(request.headers)
            refused = refused or access.csrf_refused(request.headers)
            if refused:
                return _error(403, refused, api=True)
        return await handler(request)

    # -- pages and assets ----------------------------------------------------------------

    def _asset_response(self, name: str) -> web.Response:
        asset = self.assets[name]
        return web.Response(body=asset.body, headers={"Content-Type": asset.content_type})

    async def _page(self, request: web.Request) -> web.Response:
        return self._asset_response("index.html")

    async def _static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.assets:
            raise web.HTTPNotFound(text=f"no asset {name}")
        response = self._asset_response(name)
        # Revalidated each time: a daemon upgrade must not leave old modules cached.
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def _login_page(self, request: web.Request) -> web.Response:
        if not self.access.token:
            return _redirect("/")
        return self._asset_response("login.html")

    async def _login(self, request: web.Request) -> web.Response:
        if not self.access.token:
            return _redirect("/")
        if refused := self.access.action_refused(request.headers):
            return _error(403, refused, api=True)
        try:
            form = await request.post()
        except ValueError:  # not UTF-8 (UnicodeDecodeError), or no form: not the token
            form = {}
        given = form.get("token", "")
        if not isinstance(given, str) or not self.access.token_matches(given):
            log.warning("dashboard sign-in refused from %s: wrong token", request.remote)
            return _redirect("/login?failed=1")
        response = _redirect("/")
        # HttpOnly: no script reads it; Strict: no other site's request carries it; Secure
        # when the browser came over https (directly or through a TLS proxy).
        response.set_cookie(
            cookie_name(_port(request)),
            self.access.session,
            httponly=True,
            samesite="Strict",
            path="/",
            secure=over_https(request.secure, request.headers),
        )
        return response

    # -- the dashboard's own JSON --------------------------------------------------------

    async def _session(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"csrf": self.access.csrf(), "auth": "open" if self.access.open else "token"}
        )

    async def _history(self, request: web.Request) -> web.Response:
        params = dict(request.query)
        params.setdefault("status", ",".join(ENDED_STATUSES))
        rows_wanted = _limit(params.pop("limit", None))
        query = parse_query({**params, "all": "1", "limit": str(HISTORY_SCAN)})
        assert query is not None  # all=1
        rows = await self.view.jobs(query)
        # The agents for the filter: every agent this daemon has, and any in the history.
        names = {a["agent"] for a in self.view.status()["agents"]} | {r["agent"] for r in rows}
        return web.json_response(
            {
                "jobs": rows[:rows_wanted],
                "matched": len(rows),
                "scanned_limit": HISTORY_SCAN,
                "failures": failure_groups(rows),
                "counts": agent_counts(rows),
                "agents": sorted(names),
            }
        )

    async def _charts(self, request: web.Request) -> web.Response:
        now = time.time()
        since = now - self.samples.span
        query = JobQuery(since=since, limit=HISTORY_SCAN)
        jobs = await self.view.jobs(query)
        latencies = [j["offer_to_start_ms"] for j in jobs if j.get("offer_to_start_ms") is not None]
        return web.json_response(
            {"samples": self.samples.to_dict(now), "latency": latency_histogram(latencies)}
        )


def _port(request: web.Request) -> int | None:
    """The port the daemon answered on (not the Host's: a proxy may rewrite that)."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sockname, tuple) and len(sockname) >= 2 and isinstance(sockname[1], int):
        return sockname[1]
    return None


def _limit(value: str | None) -> int:
    try:
        return max(1, min(HISTORY_SCAN, int(value))) if value else HISTORY_ROWS
    except ValueError as exc:
        raise web.HTTPBadRequest(text=f"bad number for limit: {exc}") from exc


def _error(status: int, message: str, *, api: bool) -> web.Response:
    if api:
        return web.json_response({"error": message}, status=status)
    return web.Response(status=status, text=message + "\n")


def failure_key(job: dict[str, Any]) -> str:
    """What failures are grouped by: the error's first line, else the cause."""
    error = (job.get("error") or "").strip()
    if error:
        return error.splitlines()[0][:300]
    return f"({job.get('cause') or job.get('status')}, no error text)"


def failure_groups(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Failed and lost jobs grouped by error text, the most frequent first."""
    groups: dict[str, dict[str, Any]] = {}
    for job in rows:
        if job["status"] not in FAILED:
            continue
        key = failure_key(job)
        group = groups.setdefault(
            key, {"error": key, "count": 0, "agents": [], "last_job": job["id"], "causes": []}
        )
        group["count"] += 1
        if job["agent"] not in group["agents"]:
            group["agents"].append(job["agent"])
        if job.get("cause") and job["cause"] not in group["causes"]:
            group["causes"].append(job["cause"])
    return sorted(groups.values(), key=lambda g: -g["count"])


def agent_counts(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per agent: jobs by status, and its latest failure (rows come newest first)."""
    counts: dict[str, dict[str, Any]] = {}
    for job in rows:
        entry = counts.setdefault(
            job["agent"],
            {
                "agent": job["agent"],
                "total": 0,
                "success": 0,
                "failed": 0,
                "lost": 0,
                "last_failure": None,
            },
        )
        entry["total"] += 1
        if job["status"] in ("success", "failed", "lost"):
            entry[job["status"]] += 1
        if job["status"] in FAILED and entry["last_failure"] is None:
            entry["last_failure"] = {
                "id": job["id"],
                "error": failure_key(job),
                "cause": job.get("cause", ""),
                "ended_at": job.get("ended_at"),
            }
    return sorted(counts.values(), key=lambda c: c["agent"])


def _redirect(location: str) -> web.Response:
    # Returned, not raised: the guard turns raised HTTP errors into its own answers.
    return web.Response(status=303, headers={"Location": location})
