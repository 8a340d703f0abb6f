"""An lkrun entrypoint that joins its room only when the test says so.

The dispatch's metadata names a file: the entrypoint waits for it to exist, then connects
and stays until the job ends. A test can change the room meanwhile (delete it).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from lkrun.context import JobContext

POLL = 0.05


def _wait_for_file(path: Path) -> None:
    while not path.exists():
        time.sleep(POLL)


async def connects_when_told(ctx: JobContext) -> None:
    await asyncio.to_thread(_wait_for_file, Path(ctx.job.metadata))
    await ctx.connect()
    await ctx.wait_for_shutdown()
