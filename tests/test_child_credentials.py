"""A job that needs LiveKit's API key and was given none says how to fix it in lkrun's terms
(issue 17 item 21): its error names pass_credentials, not only the framework's variable."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lkrun.child.runner import CREDENTIALS_HINT, with_credentials_hint
from lkrun.shared import jobpipe
from tests.conftest import unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room, status_is

CPU_OFF = '[daemon]\nload_threshold = "off"\n'
USES_API = "tests.lka_apps.uses_api:entrypoint"
OURS = {"LIVEKIT_API_KEY": "key", "LIVEKIT_API_SECRET": "secret"}


@pytest.mark.parametrize(
    "error",
    [
        "ValueError: either token, or api_key and api_secret, must be set",  # LiveKitAPI()
        "ValueError: api_key is required, or set LIVEKIT_API_KEY environment variable",
        "ValueError: api_secret is required, either as argument or set LIVEKIT_API_SECRET "
        "environmental variable",  # livekit.agents.inference
        "prewarm failed: ValueError: api_key and api_secret must be set",  # AccessToken()
    ],
)
def test_livekit_key_errors_name_pass_credentials(error: str) -> None:
    assert with_credentials_hint(error, {}) == error + CREDENTIALS_HINT
    assert with_credentials_hint(error, OURS) == error  # it had them: something else


@pytest.mark.parametrize(
    "error",
    [
        "OpenAIError: The api_key client option must be set either by passing api_key to the "
        "client or by setting the OPENAI_API_KEY environment variable",
        "ValueError: api_key is required, or set ELEVEN_API_KEY environment variable",
        "APIStatusError: Deepgram API key is invalid",
        "RuntimeError: boom",
    ],
)
def test_other_errors_are_left_alone(error: str) -> None:
    assert with_credentials_hint(error, {}) == error


def test_the_hint_survives_the_cap() -> None:
    error = "ValueError: api_key is required " + "x" * 3 * jobpipe.MAX_TEXT
    hinted = with_credentials_hint(error, {})
    assert hinted.endswith(CREDENTIALS_HINT) and len(hinted) <= jobpipe.MAX_TEXT


async def test_framework_app_without_credentials_fails_naming_pass_credentials(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("uses-api"), unique("api")
    daemon = await start_daemon(CPU_OFF + agent_table(name, USES_API))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name)
    await wait_for(lambda: status_is(daemon, job["id"], "failed"), 30, what="a failure")
    listing = daemon.cli("jobs", "ls", "--all", "--json")
    [listed] = [j for j in json.loads(listing.stdout) if j["id"] == job["id"]]
    assert listed["error"].startswith("ValueError: ")
    assert listed["error"].endswith(CREDENTIALS_HINT)

    # With pass_credentials the same app does its work.
    name, room_name = unique("uses-api"), unique("api")
    daemon = await start_daemon(CPU_OFF + agent_table(name, USES_API, pass_credentials=True))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name)
    await wait_for(lambda: status_is(daemon, job["id"], "success"), 30, what="a success")
