"""Greeter: sent automatically to every new room; announces itself and greets whoever joins."""

from __future__ import annotations

import asyncio

from livekit import rtc

from lkrun.context import JobContext

TOPIC = "greeting"


async def entrypoint(ctx: JobContext) -> None:
    pending: set[asyncio.Task[None]] = set()

    def greet(participant: rtc.RemoteParticipant) -> None:
        hello = f"hello {participant.identity}, I am {ctx.identity}"
        task = asyncio.ensure_future(
            ctx.room.local_participant.publish_data(
                hello, destination_identities=[participant.identity], topic=TOPIC
            )
        )
        pending.add(task)
        task.add_done_callback(pending.discard)

    ctx.room.on("participant_connected", greet)
    await ctx.connect()
    await ctx.room.local_participant.set_attributes({"greeter.status": "ready"})
    await ctx.room.local_participant.publish_data(f"{ctx.identity} joined", topic=TOPIC)
    for participant in ctx.room.remote_participants.values():
        greet(participant)
    ctx.logger.info("greeter ready in room %s", ctx.job.room)
