"""Who may see the dashboard and act through it: the rules of lkrun.dashboard's docstring.

Pure checks on a request's headers and cookies (no I/O), so they are tested without a
server; lkrun.dashboard.server applies them around every handler.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lkrun.credentials import DASHBOARD_TOKEN_ENV
from lkrun.manifest import dashboard_token_problem

ENV_TOKEN = DASHBOARD_TOKEN_ENV  # no child process gets it (lkrun.credentials.child_env)
COOKIE = "lkrun_dashboard"  # the session cookie's name: this, "_" and the daemon's port
CSRF_HEADER = "X-CSRF-Token"

# Every dashboard response carries these. No inline script or style anywhere: the page is
# static files and ES modules; charts are SVG elements with attributes, not style text.
SECURITY_HEADERS: Mapping[str, str] = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer a form POST (the login) carries
    # "Origin: null", which the Origin check must refuse; other sites still get nothing.
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


class DashboardError(Exception):
    """The dashboard's settings cannot be used (a bad token in the environment)."""


def resolve_token(manifest_token: str, env: Mapping[str, str]) -> str:
    """The token: the manifest's ``[daemon] dashboard_token``, else LKRUN_DASHBOARD_TOKEN
    (as the LiveKit secret: manifest over environment); "" for none."""
    if manifest_token:
        return manifest_token  # checked when the manifest was read
    token = env.get(ENV_TOKEN, "")
    if token and (problem := dashboard_token_problem(token)):
        raise DashboardError(f"{ENV_TOKEN} {problem}")
    return token


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name is this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def cookie_name(port: int | None) -> str:
    """The session cookie's name for a daemon listening on ``port``: a browser sends a
    host's cookies to each of its ports, so two daemons on one host need two names, or
    signing in to one would sign out of the other."""
    return f"{COOKIE}_{port}" if port else COOKIE


def over_https(secure: bool, headers: Mapping[str, str]) -> bool:
    """Whether the browser reached the dashboard over https: directly (``secure``), or
    through a TLS reverse proxy that says so (``X-Forwarded-Proto: https``); then the
    session cookie is ``Secure``."""
    forwarded = headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return secure or forwarded == "https"


def same_host(origin: str, host_header: str) -> bool:
    """Whether an Origin header names the Host's host[:port], whatever its scheme (behind a
    TLS proxy the page is https and the daemon's request http)."""
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.netloc or not host_header:
        return False
    return parts.netloc.lower() == host_header.strip().lower()


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port ("[::1]:8081" -> "[::1]")."""
    if host_header.startswith("["):
        return host_header.split("]", 1)[0] + "]"
    return host_header.rsplit(":", 1)[0] if ":" in host_header else host_header


@dataclass
class Access:
    """The dashboard's access rules for one bind address and token."""

    bind_host: str
    token: str = ""
    # Signs the CSRF token: new at every start, so a page from a previous daemon must
    # fetch it again (GET /api/v1/session).
    _secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    @property
    def disabled(self) -> bool:
        """No token and reachable from other machines: served disabled (403)."""
        return not self.token and not is_loopback(self.bind_host)

    @property
    def open(self) -> bool:
        """No token needed: loopback, no token configured."""
        return not self.token and is_loopback(self.bind_host)

    def disabled_reason(self) -> str:
        return (
            f"the lkrun dashboard is disabled: it listens on {self.bind_host}, not loopback, and "
            f"no token is set; set [daemon] dashboard_token or {ENV_TOKEN} (or listen on "
            "127.0.0.1)"
        )

    def host_allowed(self, host_header: str) -> bool:
        """Without a token, only loopback names: a page of another site whose name resolves
        to 127.0.0.1 (DNS rebinding) must not read or drive the dashboard."""
        if self.token:
            return True  # its cookie was never given to another name
        return is_loopback(host_name(host_header))

    @property
    def session(self) -> str:
        """The cookie value a login sets: derived from the token, not the token itself."""
        return _mac(self.token.encode(), "lkrun dashboard session") if self.token else ""

    def csrf(self) -> str:
        return _mac(self._secret, f"csrf {self.session}")

    def token_matches(self, given: str) -> bool:
        return bool(self.token) and _equal(given, self.token)

    def bearer(self, headers: Mapping[str, str]) -> bool:
        """Whether the request carries ``Authorization: Bearer TOKEN`` (scripts)."""
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def signed_in(
        self, headers: Mapping[str, str], cookies: Mapping[str, str], port: int | None = None
    ) -> bool:
        """Whether the request has the session cookie (of the daemon on ``port``: see
        cookie_name) or the bearer token."""
        if self.open:
            return True
        if self.disabled:
            return False
        cookie = cookies.get(cookie_name(port), "")
        return (bool(cookie) and _equal(cookie, self.session)) or self.bearer(headers)

    def action_refused(self, headers: Mapping[str, str]) -> str:
        """Why a POST (an action, or the login) is refused ("" if it may go on). A browser
        sends Sec-Fetch-Site, set by itself and not by the page: when it is there it alone
        decides (same-origin only). Else the Origin (when sent) must name the Host's
        host[:port]; its scheme is not compared, as behind a TLS reverse proxy the page is
        https while the daemon is asked over http."""
        site = headers.get("Sec-Fetch-Site")
        if site is not None:
            if site != "same-origin":
                return f"cross-site request refused (Sec-Fetch-Site: {site})"
            return ""
        origin = headers.get("Origin")
        if origin is not None and not same_host(origin, headers.get("Host", "")):
            return "cross-origin request refused (Origin does not match this page)"
        return ""

    def csrf_refused(self, headers: Mapping[str, str]) -> str:
        """Why an action without a bearer token is refused ("" if its CSRF token is right)."""
        given = headers.get(CSRF_HEADER, "")
        if not given:
            return f"missing {CSRF_HEADER} header (GET /api/v1/session gives it)"
        if not _equal(given, self.csrf()):
            return f"wrong {CSRF_HEADER} (the daemon restarted? reload the page)"
        return ""


def _equal(given: str, expected: str) -> bool:
    """A constant-time comparison of what a request sent with a secret. A header, cookie or
    form field that was not UTF-8 reaches here with lone surrogates (which do not encode):
    it is simply not the secret."""
    try:
        sent = given.encode()
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(sent, expected.encode())


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()
