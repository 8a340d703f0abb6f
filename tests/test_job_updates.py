"""The job update outbox (lkrun.job_updates): in order, at least once, across a failed write
and a reconnect, and flushed. Plain asyncio: a "connection" here is a sender task, or the
registration's own sender (Registration._deliver_updates) writing to a FAKE socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.credentials import Credentials
from lkrun.job_updates import JobUpdates
from lkrun.load import WorkerLoad
from lkrun.registration import Registration, WorkerSpec


class Connection:
    """A connection's sender as lkrun.registration runs one: takes the oldest update, writes
    it, marks it sent. ``fail_at``: the write of that many-th update raises (the socket
    broke)."""

    def __init__(self, updates: JobUpdates, *, fail_at: int = 0) -> None:
        self.updates = updates
        self.fail_at = fail_at
        self.written: list[tuple[str, int]] = []

    async def send(self) -> None:
        while True:
            update = await self.updates.next()
            attempt = len(self.written) + 1
            if attempt == self.fail_at:
                raise ConnectionResetError("gone")
            self.written.append((update.job_id, update.status))
            self.updates.sent(update)


async def run_until_idle(conn: Connection) -> asyncio.Task[None]:
    task = asyncio.create_task(conn.send())
    for _ in range(10):
        await asyncio.sleep(0)
    return task


async def end(task: asyncio.Task[None]) -> None:
    """End a sender as the registration ends a lost connection's: cancelled, and awaited."""
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class FakeSocket:
    """FAKE WebSocket for Registration._deliver_updates: records each frame it takes;
    ``hang_at``: that many-th send never returns (the connection dies under it)."""

    def __init__(self, hang_at: int = 0) -> None:
        self.hang_at = hang_at
        self.calls = 0
        self.frames: list[tuple[str, int]] = []

    async def send_bytes(self, data: bytes) -> None:
        self.calls += 1
        if self.calls == self.hang_at:
            await asyncio.Event().wait()
        update = proto.WorkerMessage.FromString(data).update_job
        self.frames.append((update.job_id, update.status))


@pytest.fixture
async def registration() -> AsyncIterator[Registration]:
    async with aiohttp.ClientSession() as session:
        reg = Registration(
            label="test",
            spec=WorkerSpec("tester", "room", "", models.ParticipantPermission()),
            credentials=Credentials("ws://127.0.0.1:1", "key", "secret"),
            load=WorkerLoad,
            session=session,
        )
        reg._registered.set()  # as after the server's pong: updates may go
        yield reg


async def deliver(reg: Registration, ws: FakeSocket) -> asyncio.Task[None]:
    task = asyncio.create_task(reg._deliver_updates(ws))  # type: ignore[arg-type]
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
    await end(task)


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
    await end(task)


async def test_an_update_whose_connection_dropped_mid_write_is_sent_again(
    registration: Registration,
) -> None:
    """At least once: a write cut short by the connection's end counts as not written."""
    registration.update_job("J1", proto.JS_RUNNING)
    registration.update_job("J1", proto.JS_SUCCESS)
    dropped = FakeSocket(hang_at=2)
    await end(await deliver(registration, dropped))  # _session ends a lost connection's sender
    assert dropped.frames == [("J1", proto.JS_RUNNING)]
    again = FakeSocket()
    task = await deliver(registration, again)
    assert again.frames == [("J1", proto.JS_SUCCESS)]
    assert registration.updates.unsent() == []
    await end(task)


async def test_flush_does_not_wait_for_updates_of_a_connection_that_ended(
    registration: Registration,
) -> None:
    """livekit-server forgets a connection's jobs when it closes and ignores their updates
    after: the daemon's last flush waits only for what a server can still take. They are
    still sent on the next connection (a server that keeps jobs takes them)."""
    registration._connection = 1
    assignment = proto.JobAssignment(job=proto.Job(id="J1"))
    registration._dispatch(proto.ServerMessage(assignment=assignment), 0.0)
    registration.update_job("J1", proto.JS_SUCCESS)
    registration.update_job("J_unknown", proto.JS_FAILED, "no assignment seen")
    assert not await registration.flush(0.01)
    registration.updates.connection_ended(1)
    assert not await registration.flush(0.01)  # J_unknown's is still worth waiting for
    ws = FakeSocket()
    task = await deliver(registration, ws)
    assert await registration.flush(0.01)
    assert ws.frames == [("J1", proto.JS_SUCCESS), ("J_unknown", proto.JS_FAILED)]
    await end(task)
    registration.update_job("J1", proto.JS_FAILED, "late")  # ended already: untagged
    assert not await registration.flush(0.01)
    assert registration._assigned_on == {}


async def test_flush_ignores_only_ended_connections() -> None:
    updates = JobUpdates()
    updates.put("J1", proto.JS_SUCCESS, connection=1)
    updates.put("J2", proto.JS_SUCCESS, connection=2)
    updates.connection_ended(1)
    assert not await updates.flush(0.01)  # J2's connection is up
    updates.connection_ended(2)
    assert await updates.flush(0.01)
    assert [u.job_id for u in updates.unsent()] == ["J1", "J2"]  # still replayed


async def test_the_same_status_twice_is_sent_twice() -> None:
    updates = JobUpdates()
    updates.put("J1", proto.JS_FAILED, "first")
    updates.put("J1", proto.JS_FAILED, "first")
    conn = Connection(updates)
    task = await run_until_idle(conn)
    assert conn.written == [("J1", proto.JS_FAILED)] * 2
    await end(task)


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
    await end(task)
