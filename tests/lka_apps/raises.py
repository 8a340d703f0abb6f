"""An entrypoint that raises before connecting.

Fixture for "lkrun hosts unmodified livekit-agents apps": a crashing job must be reported as
failed with this message, and must not take the host down.
"""

from __future__ import annotations

from livekit.agents import JobContext


async def entrypoint(ctx: JobContext) -> None:
    raise RuntimeError(f"boom from {ctx.job.room.name}")
