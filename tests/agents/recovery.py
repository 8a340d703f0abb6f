"""Agents for the recovery tests (tests/test_recovery_e2e.py): each joins and says, as its
participant attributes, what its context says of recovery; the dispatch's metadata picks
how it then fails."""

from __future__ import annotations

from livekit import rtc

from lkrun.context import JobContext

# Attributes the agent sets once joined: what ctx.recovered_from and ctx.attempt say.
RECOVERED_FROM = "test.recovered_from"
ATTEMPT = "test.attempt"


async def reports(ctx: JobContext) -> None:
    """Joins and reports; then, by the dispatch's metadata:

    - ``raise``: raises (every attempt);
    - ``raise-first``: raises on the call's first attempt only;
    - ``eat-first``: grows past any small memory_limit_mb on the first attempt only;
    - anything else: stays until its job ends, and ends it when sent ``bye``.
    """
    first = ctx.attempt == 0

    def on_data(packet: rtc.DataPacket) -> None:
        if packet.data == b"bye":
            ctx.shutdown("the caller said bye")

    ctx.room.on("data_received", on_data)
    await ctx.connect(announce=False)  # the report below announces it
    await ctx.room.local_participant.set_attributes(
        {RECOVERED_FROM: ctx.recovered_from or "-", ATTEMPT: str(ctx.attempt)}
    )
    what = ctx.job.metadata
    if what == "raise" or (what == "raise-first" and first):
        raise RuntimeError(f"crash on attempt {ctx.attempt}")
    if what == "eat-first" and first:
        hog = bytearray(300 * 1024 * 1024)
        for i in range(0, len(hog), 4096):  # touch every page so it is resident
            hog[i] = 1
        ctx.userdata = hog
    # Returning keeps the job until the room disconnects or it is shut down.
