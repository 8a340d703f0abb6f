"""Where the LiveKit URL, API key and secret come from.

Precedence, highest first: command-line flag, the manifest's [livekit] table, the
environment (LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET). The secret has no
flag: process arguments are visible to every user of the machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

# What user code (jobs, the import check) does not get unless an agent asks for it.
SECRET_ENV = ("LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")
# The web dashboard's token (lkrun.dashboard.guard reads it): named here, where every place
# that starts a child process can see it without importing the dashboard.
DASHBOARD_TOKEN_ENV = "LKRUN_DASHBOARD_TOKEN"
# What no child process (job, fork server, import check, inference process) ever gets from
# the daemon's environment, whatever an agent asks for.
DAEMON_ONLY_ENV = (DASHBOARD_TOKEN_ENV,)


def withheld_env(*, pass_credentials: bool = False) -> tuple[str, ...]:
    """The variables of the daemon's environment a child process starts without: the
    dashboard's token always, the LiveKit key and secret unless ``pass_credentials``."""
    return DAEMON_ONLY_ENV if pass_credentials else (*SECRET_ENV, *DAEMON_ONLY_ENV)


def child_env(base: Mapping[str, str], *, pass_credentials: bool = False) -> dict[str, str]:
    """``base`` (the daemon's environment) without what ``withheld_env`` names."""
    withheld = withheld_env(pass_credentials=pass_credentials)
    return {k: v for k, v in base.items() if k not in withheld}


class CredentialsError(Exception):
    """The URL is known but the key or secret is not."""


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str
    api_secret: str

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(url={self.url!r}, api_key={self.api_key!r})"

    @property
    def http_url(self) -> str:
        if self.url.startswith("ws://"):
            return "http://" + self.url[len("ws://") :]
        if self.url.startswith("wss://"):
            return "https://" + self.url[len("wss://") :]
        return self.url


def resolve(
    *,
    url: str | None = None,
    api_key: str | None = None,
    manifest_url: str | None = None,
    manifest_key: str | None = None,
    manifest_secret: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Credentials | None:
    """The effective credentials, or None when no URL is configured anywhere."""
    env = os.environ if env is None else env
    final_url = url or manifest_url or env.get("LIVEKIT_URL")
    if not final_url:
        return None
    key = api_key or manifest_key or env.get("LIVEKIT_API_KEY")
    secret = manifest_secret or env.get("LIVEKIT_API_SECRET")
    if not key:
        raise CredentialsError(
            f"LiveKit URL is {final_url} but no API key is set: "
            "set LIVEKIT_API_KEY, [livekit].api_key or --api-key"
        )
    if not secret:
        raise CredentialsError(
            f"LiveKit URL is {final_url} but no API secret is set: "
            "set LIVEKIT_API_SECRET or [livekit].api_secret"
        )
    return Credentials(url=final_url, api_key=key, api_secret=secret)
