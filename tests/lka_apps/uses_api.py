"""An entrypoint that uses LiveKit's server API at job start (ctx.api: a LiveKitAPI made
from the environment), as the docs' examples do to create a SIP call or delete the room.

Fixture: without credentials in its environment the framework raises its own ValueError.
"""

from __future__ import annotations

from livekit import api
from livekit.agents import JobContext


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    await ctx.api.room.list_participants(api.ListParticipantsRequest(room=ctx.room.name))
    ctx.shutdown("listed the participants")
