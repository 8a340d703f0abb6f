"""Entrypoints with particular behaviours, for the tests."""

from __future__ import annotations

import asyncio
import contextlib
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


async def drain_aware(ctx: JobContext) -> None:
    """Echoes, and tells the room when the daemon starts draining."""

    async def announce() -> None:
        await ctx.room.local_participant.publish_data(b"draining", topic="lkrun")

    ctx.add_drain_callback(announce)
    await echo.entrypoint(ctx)


async def ignores_shutdown(ctx: JobContext) -> None:
    """Joins, then blocks the event loop forever once asked to stop: only a kill ends it."""
    import time

    def block(reason: str) -> None:
        while True:
            time.sleep(1)

    ctx.add_shutdown_callback(block)
    await echo.entrypoint(ctx)


async def eats_memory(ctx: JobContext) -> None:
    """Grows well past any sensible small limit, then waits."""
    hog = bytearray(300 * 1024 * 1024)
    for i in range(0, len(hog), 4096):  # touch every page so it is resident
        hog[i] = 1
    ctx.userdata = hog
    await echo.entrypoint(ctx)


async def spawns_grandchild(ctx: JobContext) -> None:
    """Starts a long-lived child process and logs its pid."""
    child = await asyncio.create_subprocess_exec("sleep", "300")
    ctx.userdata = child
    ctx.logger.info("grandchild pid %d", child.pid)
    await echo.entrypoint(ctx)


async def brief(ctx: JobContext) -> None:
    """Joins, stays as long as the dispatch metadata says (seconds), then ends the job."""
    await ctx.connect()
    stay = float(ctx.job.metadata or "1")
    try:
        await asyncio.wait_for(ctx.wait_for_shutdown(), stay)
    except asyncio.TimeoutError:
        ctx.shutdown("stayed long enough")


def prewarm_model() -> dict[str, object]:
    """Stands in for loading a model: its result reaches ctx.userdata."""
    return {"model": "loaded", "pid": os.getpid()}


def prewarm_fails() -> None:
    raise RuntimeError("model file missing")


async def prewarm_hangs() -> None:
    await asyncio.sleep(3600)


async def shows_userdata(ctx: JobContext) -> None:
    ctx.logger.info("userdata=%r", ctx.userdata)
    await echo.entrypoint(ctx)


async def ticker(ctx: JobContext) -> None:
    """Logs a numbered line ten times a second until the job is stopped."""
    count = 0
    while not ctx.shutdown_requested:
        count += 1
        print(f"tick {count}", flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(ctx.wait_for_shutdown(), 0.1)


def exits_with_3(ctx: JobContext) -> None:
    sys.exit(3)


async def reports_child_stdin(ctx: JobContext) -> None:
    """Starts a subprocess the careless way (stdin inherited) and logs what its stdin is."""
    probe = "import os; print('child stdin:', os.readlink('/proc/self/fd/0'))"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", probe, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await child.communicate()
    print(out.decode().strip())


async def leaves_a_child(ctx: JobContext) -> None:
    """Starts a long-running helper and returns without stopping it."""
    child = await asyncio.create_subprocess_exec(
        "sleep", "60", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    print(f"helper pid {child.pid}")
