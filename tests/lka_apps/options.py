"""The older module shape: a module-level WorkerOptions for a publisher worker.

Fixture for "lkrun hosts unmodified livekit-agents apps": `opts` is a real
livekit.agents.WorkerOptions with a prewarm function and worker_type PUBLISHER.
"""

from __future__ import annotations

from livekit.agents import JobContext, JobProcess, WorkerOptions, WorkerType, cli


def prewarm(proc: JobProcess) -> None:
    proc.userdata["warm"] = True


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()


opts = WorkerOptions(
    entrypoint_fnc=entrypoint,
    prewarm_fnc=prewarm,
    agent_name="lka-options",
    worker_type=WorkerType.PUBLISHER,
)

if __name__ == "__main__":
    cli.run_app(opts)
