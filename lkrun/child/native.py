"""lkrun's own app kind: ``async def entrypoint(ctx: lkrun.context.JobContext)``.

lkrun.context is imported when a process prepares its job, not here: the import check
loads this module and must stay light.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from lkrun.child.appkind import LKRUN, AppError, Job, JobResult, Requests, Sender, call
from lkrun.shared.text import describe


class NativeApp:
    """An entrypoint written for lkrun.context.JobContext."""

    framework = LKRUN

    def __init__(self, entrypoint: Callable[..., Any], prewarm: Callable[..., Any] | None) -> None:
        self.entrypoint = entrypoint
        self.prewarm = prewarm
        self.userdata: Any = None

    def info(self) -> dict[str, Any]:
        return {"framework": LKRUN, "kind": "function"}

    def preload(self) -> None:
        """Nothing beyond what the fork server preloads for every agent."""

    async def prepare(self) -> None:
        import lkrun.context  # noqa: F401  the job's context, before READY

        if self.prewarm is not None:
            self.userdata = await call(self.prewarm)

    def new_job(self, start: Mapping[str, Any], logger: logging.Logger) -> Job:
        from lkrun.context import JobContext, JobInfo
        from lkrun.shared.empty_room import timeout_from_start

        ctx = JobContext(
            job=JobInfo.from_dict(start["job"], start),
            url=start["url"],
            token=start["token"],
            identity=start["identity"],
            logger=logger,
            userdata=self.userdata,
            empty_timeout=timeout_from_start(start),
        )
        return NativeJob(self.entrypoint, ctx, logger)

    def request_server(self, sender: Sender) -> Requests:
        raise AppError("only a livekit-agents app has on_request")


class NativeJob:
    def __init__(self, entrypoint: Callable[..., Any], ctx: Any, logger: logging.Logger) -> None:
        self.entrypoint = entrypoint
        self.ctx = ctx
        self.log = logger

    def shutdown(self, reason: str) -> None:
        self.ctx.shutdown(reason)

    def drain(self) -> None:
        self.ctx._start_drain()

    async def run(self, grace: Callable[[], float]) -> JobResult:
        ctx = self.ctx
        entry = asyncio.ensure_future(call(self.entrypoint, ctx))
        stop = asyncio.ensure_future(ctx.wait_for_shutdown())
        await asyncio.wait({entry, stop}, return_when=asyncio.FIRST_COMPLETED)
        error = ""
        if entry.done():
            if (exc := entry.exception()) is not None:
                self.log.error("entrypoint failed", exc_info=exc)
                error = describe(exc)
                ctx.shutdown(f"entrypoint failed: {error}")
            elif not ctx.room.isconnected():
                ctx.shutdown("entrypoint returned")
            await stop  # returns at once unless the room is still connected
        await ctx._run_shutdown_callbacks(grace())
        await ctx._close_tasks(grace())
        if not entry.done():
            entry.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await entry
        with contextlib.suppress(Exception):
            await ctx._leave(grace())
        error = ctx._failure or error  # e.g. the room was gone (lkrun.context.RoomGoneError)
        reason, gone = ctx.shutdown_reason, ctx._room_gone
        return JobResult(ok=not error, error=error, reason=reason, room_gone=gone, cause=ctx._cause)
