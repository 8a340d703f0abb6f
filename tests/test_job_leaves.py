"""A job of lkrun's own kind leaves its room also when it ends while it is still joining.

Found by `lkrun protocol-test` ("leaves"): a shutdown that came while the entrypoint's
connect() was under way cancelled the join, the room was not connected yet so its
disconnect did nothing, and the server kept the participant, driven by nobody, until it
timed it out some 20 s later. The room here is a stand-in whose join is held by the test:
the real server cannot be made to hold a join at a given moment.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lkrun.child.native import NativeJob
from lkrun.context import JobContext, JobInfo


class HeldJoinRoom:
    """A stand-in for rtc.Room whose connect() finishes when the test says so."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.joining = asyncio.Event()  # connect() was called
        self.release = asyncio.Event()
        self.connected = False

    async def connect(self, url: str, token: str, options: Any = None) -> None:
        self.events.append("connect")
        self.joining.set()
        await self.release.wait()
        self.connected = True
        self.events.append("joined")

    def isconnected(self) -> bool:
        return self.connected

    async def disconnect(self) -> None:  # as rtc.Room's: nothing to do unless connected
        if self.connected:
            self.connected = False
            self.events.append("left")


async def test_a_job_shut_down_while_it_joins_finishes_joining_then_leaves() -> None:
    log = logging.getLogger("test.leaves")
    job = JobInfo.from_dict({"id": "AJ_1", "room": {"name": "r"}})
    ctx = JobContext(job=job, url="ws://x", token="t", identity="agent", logger=log)
    room = ctx.room = HeldJoinRoom()  # type: ignore[assignment]
    given_up = asyncio.Event()  # the job's end cancelled its entrypoint, still in connect()

    async def entrypoint(ctx: JobContext) -> None:
        try:
            await ctx.connect(announce=False)
        except asyncio.CancelledError:
            given_up.set()
            raise
        await asyncio.Event().wait()  # the job runs until it is shut down

    run = asyncio.ensure_future(NativeJob(entrypoint, ctx, log).run(lambda: 5.0))
    await asyncio.wait_for(room.joining.wait(), 5)  # connect() is under way
    ctx.shutdown("stopped while joining")
    await asyncio.wait_for(given_up.wait(), 5)
    room.release.set()  # the join completes late: after the job has begun to end
    result = await asyncio.wait_for(run, 5)
    assert room.events == ["connect", "joined", "left"]
    assert result.ok and result.reason == "stopped while joining"


async def test_a_join_that_never_completes_is_waited_for_no_longer_than_the_grace() -> None:
    log = logging.getLogger("test.leaves")
    job = JobInfo.from_dict({"id": "AJ_2", "room": {"name": "r"}})
    ctx = JobContext(job=job, url="ws://x", token="t", identity="agent", logger=log)
    room = ctx.room = HeldJoinRoom()  # type: ignore[assignment]

    async def entrypoint(ctx: JobContext) -> None:
        await ctx.connect(announce=False)

    run = asyncio.ensure_future(NativeJob(entrypoint, ctx, log).run(lambda: 0.2))
    await asyncio.wait_for(room.joining.wait(), 5)  # connect() is under way
    ctx.shutdown("stopped while joining")
    result = await asyncio.wait_for(run, 5)  # not held by the join that never ends
    assert room.events == ["connect"]
    assert result.reason == "stopped while joining"
