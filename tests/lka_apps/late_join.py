"""A livekit-agents entrypoint that joins its room only when the test says so.

The dispatch's metadata names a file: the entrypoint waits for it to exist, then connects
and stays until the room ends. A test can change the room meanwhile (delete it).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from livekit.agents import JobContext

POLL = 0.05


def _wait_for_file(path: Path) -> None:
    while not path.exists():
        time.sleep(POLL)


async def entrypoint(ctx: JobContext) -> None:
    await asyncio.to_thread(_wait_for_file, Path(ctx.job.metadata))
    await ctx.connect()
    disconnected = asyncio.Event()
    ctx.room.on("disconnected", lambda *_: disconnected.set())
    if ctx.room.isconnected():
        await disconnected.wait()
