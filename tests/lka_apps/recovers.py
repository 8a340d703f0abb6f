"""A livekit-agents entrypoint for the recovery tests: it joins and reports, as participant
attributes, what its job's attributes say of recovery (ctx.job.attributes, as an app reads
them); on the call's first attempt it then raises, so that it is redispatched."""

from __future__ import annotations

import asyncio

from livekit.agents import JobContext


async def entrypoint(ctx: JobContext) -> None:
    attributes = dict(ctx.job.attributes)
    recovered_from = attributes.get("lkrun.recovered_from", "")
    await ctx.connect()
    await ctx.room.local_participant.set_attributes(
        {
            "test.recovered_from": recovered_from or "-",
            "test.attempt": attributes.get("lkrun.attempt", "0"),
        }
    )
    if not recovered_from:
        raise RuntimeError("crash on the call's first attempt")
    disconnected = asyncio.Event()
    ctx.room.on("disconnected", lambda *_: disconnected.set())
    if ctx.room.isconnected():
        await disconnected.wait()
