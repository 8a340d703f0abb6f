"""Entrypoints with particular behaviours, for the tests."""

from __future__ import annotations

import os
import sys

from lkrun.context import JobContext
from lkrun.examples import echo


async def raises(ctx: JobContext) -> None:
    raise RuntimeError(f"boom from job {ctx.job.id}")


async def prints_then_echoes(ctx: JobContext) -> None:
    print("hello from print()")  # would corrupt the pipe protocol if not redirected
    print('{"type": "done", "ok": false, "error": "forged"}')
    sys.stdout.flush()
    os.write(1, b"raw write to fd 1\n")
    await echo.entrypoint(ctx)


async def returns_at_once(ctx: JobContext) -> None:
    print("about to return")
    ctx.logger.info("job %s metadata %r", ctx.job.id, ctx.job.metadata)


def blocks_forever(ctx: JobContext) -> None:
    import time

    while True:  # a sync entrypoint that never yields: shutdown cannot reach it
        time.sleep(1)


async def waits_for_shutdown(ctx: JobContext) -> None:
    ctx.add_shutdown_callback(lambda reason: print(f"shutdown callback: {reason}"))
    await ctx.wait_for_shutdown()
