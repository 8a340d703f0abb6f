"""Text a participant controls reaches `lkrun jobs ...` through a real daemon: shown with its
control characters escaped, and as the job wrote it with `jobs logs --raw`."""

from __future__ import annotations

from typing import Any

from tests.conftest import unique, wait_for
from tests.helpers import agent_table, dispatch, status_is
from tests.test_cli_render import ESCAPES, RAW_CONTROL

# The dispatch's metadata is the participant-controlled string: printed and raised by the job.
AGENT = """
from lkrun.context import JobContext


async def entrypoint(ctx: JobContext) -> None:
    print("metadata:", ctx.job.metadata, flush=True)
    raise RuntimeError(ctx.job.metadata)
"""


async def test_jobs_commands_escape_what_a_job_carries(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room = unique("hostile"), unique("room")
    daemon = await start_daemon(
        agent_table(name, "hostile_agent:entrypoint"), files={"hostile_agent.py": AGENT}
    )
    await dispatch(livekit_server, room, name, metadata=ESCAPES)

    async def failed() -> dict[str, Any] | None:
        jobs = [j for j in await daemon.jobs() if j["room"] == room]
        return jobs[0] if jobs and await status_is(daemon, jobs[0]["id"], "failed") else None

    job = await wait_for(failed, 30, what="the job to fail")
    assert "\x1b]0;owned" in job["error"]  # the record keeps the text as it was
    for args in (["jobs", "ls", "--all"], ["jobs", "show", job["id"]], ["jobs", "logs", job["id"]]):
        result = daemon.cli(*args)
        assert result.returncode == 0, result.stderr
        assert not RAW_CONTROL.search(result.stdout), (args, result.stdout)
        assert "\\x1b]0;owned\\x07" in result.stdout, (args, result.stdout)
    raw = daemon.cli("jobs", "logs", job["id"], "--raw")
    assert raw.returncode == 0, raw.stderr
    assert "metadata: \x1b]0;owned\x07\x1b]8;;https://evil.invalid" in raw.stdout
