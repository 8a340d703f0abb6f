"""`lkrun check` refuses settings that pass validation elsewhere but fail every job
(issue 17 item 9), in one line naming the file, the agent and the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.e2e  # lkrun processes

APP = """\
from livekit.agents import AgentServer, JobContext

server = AgentServer(initialize_process_timeout=0)

@server.rtc_session(agent_name="a")
async def entrypoint(ctx: JobContext) -> None:
    pass
"""

CASES = {
    "log level in env": (
        'entrypoint = "lkrun.examples.echo:entrypoint"\n'
        'env = { LKRUN_JOB_LOG_LEVEL = "verbose" }\n',
        "env.LKRUN_JOB_LOG_LEVEL",
        "must be a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL), got 'verbose'",
    ),
    "prewarm_timeout 0": (
        'entrypoint = "lkrun.examples.echo:entrypoint"\nprewarm_timeout = 0\n',
        "prewarm_timeout",
        "must be a duration above 0, got 0",
    ),
    "app initialize_process_timeout 0": (
        'entrypoint = "zero_init:server"\n',
        "prewarm_timeout",
        "the app's initialize_process_timeout is unusable: must be a duration above 0, got 0.0",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_refuses_what_every_job_would_fail_with(case: str, tmp_path: Path) -> None:
    table, field, message = CASES[case]
    (tmp_path / "zero_init.py").write_text(APP)
    manifest = tmp_path / "agents.toml"
    manifest.write_text(f"[agents.a]\n{table}")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("LKRUN_JOB_LOG_LEVEL", None)
    result = run_cli("check", str(manifest), env=env)
    assert result.returncode == 2, result
    line = f"error: {manifest}: agent 'a': field {field!r}: {message}"
    assert result.stderr.splitlines() == [line]
