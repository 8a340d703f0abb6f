"""The job update outbox (lkrun.job_updates): in order, at least once, across a failed write
and a reconnect, and flushed. Plain asyncio: a "connection" here is a sender task."""

from __future__ import annotations

import asyncio

import pytest
from livekit.protocol import agent as proto

from lkrun.job_updates import JobUpdates


class Connection:
    """A connection's sender as lkrun.registration runs one: takes the oldest update, writes
    it, marks it sent. ``fail_at``: the write of that many-th update raises (the socket
    broke); ``hang_at``: that write never finishes (the connection is dropped under it)."""

    def __init__(self, updates: JobUpdates, *, fail_at: int = 0, hang_at: int = 0) -> None:
        self.updates = updates
        self.fail_at = fail_at
        self.hang_at = hang_at
        self.written: list[tuple[str, int]] = []

    async def send(self) -> None:
        while True:
            update = await self.updates.next()
            attempt = len(self.written) + 1
            if attempt == self.fail_at:
                raise ConnectionResetError("gone")
            if attempt == self.hang_at:
                await asyncio.Event().wait()
            self.written.append((update.job_id, update.status))
            self.updates.sent(update)


async def run_until_idle(conn: Connection) -> asyncio.Task[None]:
    task = asyncio.create_task(conn.send())
    for _ in range(10):
        await asyncio.sleep(0)
    return task


async def test_updates_are_written_in_the_order_they_were_put() -> None:
    updates = JobUpdates()
    for job_id, status in (("J1", proto.JS_RUNNING), ("J2", proto.JS_RUNNING),
                           ("J1", proto.JS_SUCCESS)):  # fmt: skip
        updates.put(job_id, status)
    conn = Connection(updates)
    task = await run_until_idle(conn)
    updates.put("J2", proto.JS_FAILED, "boom")  # put while the sender waits: sent at once
    await asyncio.sleep(0)
    assert conn.written == [
        ("J1", proto.JS_RUNNING),
        ("J2", proto.JS_RUNNING),
        ("J1", proto.JS_SUCCESS),
        ("J2", proto.JS_FAILED),
    ]
    assert updates.unsent() == []
    task.cancel()


async def test_a_failed_write_is_sent_first_on_the_next_connection() -> None:
    updates = JobUpdates()
    updates.put("J1", proto.JS_RUNNING)
    updates.put("J1", proto.JS_SUCCESS)
    updates.put("J2", proto.JS_RUNNING)
    broken = Connection(updates, fail_at=2)  # J1 RUNNING goes out, J1 SUCCESS does not
    with pytest.raises(ConnectionResetError):
        await broken.send()
    assert broken.written == [("J1", proto.JS_RUNNING)]
    updates.put("J2", proto.JS_SUCCESS)  # made while no connection was up
    assert [(u.job_id, u.status) for u in updates.unsent()] == [
        ("J1", proto.JS_SUCCESS),
        ("J2", proto.JS_RUNNING),
        ("J2", proto.JS_SUCCESS),
    ]
    fresh = Connection(updates)
    task = await run_until_idle(fresh)
    assert fresh.written == [
        ("J1", proto.JS_SUCCESS),
        ("J2", proto.JS_RUNNING),
        ("J2", proto.JS_SUCCESS),
    ]
    task.cancel()


async def test_an_update_whose_connection_dropped_mid_write_is_sent_again() -> None:
    """At least once: a write cut short by the connection's end counts as not written."""
    updates = JobUpdates()
    updates.put("J1", proto.JS_RUNNING)
    updates.put("J1", proto.JS_SUCCESS)
    dropped = Connection(updates, hang_at=2)
    task = await run_until_idle(dropped)
    task.cancel()  # the registration ends a lost connection's sender
    await asyncio.gather(task, return_exceptions=True)
    assert dropped.written == [("J1", proto.JS_RUNNING)]
    again = Connection(updates)
    task = await run_until_idle(again)
    assert again.written == [("J1", proto.JS_SUCCESS)]
    task.cancel()


async def test_the_same_status_twice_is_sent_twice() -> None:
    updates = JobUpdates()
    updates.put("J1", proto.JS_FAILED, "first")
    updates.put("J1", proto.JS_FAILED, "first")
    conn = Connection(updates)
    task = await run_until_idle(conn)
    assert conn.written == [("J1", proto.JS_FAILED)] * 2
    task.cancel()


async def test_flush_waits_until_every_update_was_written() -> None:
    updates = JobUpdates()
    assert await updates.flush(0.01)  # nothing to send
    updates.put("J1", proto.JS_SUCCESS)
    assert not await updates.flush(0.01)  # no connection: times out
    flushed = asyncio.create_task(updates.flush(5))
    failing = Connection(updates, fail_at=1)
    with pytest.raises(ConnectionResetError):
        await failing.send()
    await asyncio.sleep(0)
    assert not flushed.done()  # a failed write is not a sent one
    task = await run_until_idle(Connection(updates))
    assert await flushed
    task.cancel()
