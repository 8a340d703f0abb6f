"""The lkrun agent under benchmark: it joins the room and stays.

Returning after ``connect()`` keeps the job alive while the room is connected, so the
job lasts until the bench deletes the room: the same shape as the official worker's
bench entrypoint (``tests/bench/official_worker.py``).
"""

from __future__ import annotations

from lkrun.context import JobContext


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
