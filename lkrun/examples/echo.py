"""Echo: joins the room it was dispatched to and sends every data message back to its sender.

A programmatic participant with no AI in it: the smallest useful agent.
"""

from __future__ import annotations

import asyncio

from livekit import rtc

from lkrun.context import JobContext


async def entrypoint(ctx: JobContext) -> None:
    pending: set[asyncio.Task[None]] = set()

    def on_data(packet: rtc.DataPacket) -> None:
        if packet.participant is None:  # sent by a server SDK: nobody to answer
            return
        reply = ctx.room.local_participant.publish_data(
            packet.data,
            destination_identities=[packet.participant.identity],
            topic=packet.topic or "",
        )
        task = asyncio.ensure_future(reply)
        pending.add(task)
        task.add_done_callback(pending.discard)

    ctx.room.on("data_received", on_data)
    await ctx.connect()
    ctx.logger.info("echo ready in room %s (dispatch metadata: %r)", ctx.job.room, ctx.job.metadata)
    # Returning keeps the job alive until the room disconnects or the dispatch is deleted.
