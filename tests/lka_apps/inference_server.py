"""The same local model in an AgentServer app of its own module: a second agent of the same
environment, which imports the plugin that the first agent's module imported already."""

from __future__ import annotations

from livekit.agents import AgentServer, JobContext, cli

from tests.lka_apps import pid_runner  # noqa: F401  registers the runner, as a plugin import does
from tests.lka_apps.inference_app import serve_requests

server = AgentServer()


@server.rtc_session(agent_name="lka-inference")
async def entrypoint(ctx: JobContext) -> None:
    await serve_requests(ctx)


if __name__ == "__main__":
    cli.run_app(server)
