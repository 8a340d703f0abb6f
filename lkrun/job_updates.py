"""Job status updates on their way to LiveKit: in order, handed to a live socket at least once.

A job's updates must reach the server in the order they were made (RUNNING before SUCCESS),
and LiveKit frees a job's slot on its side only when it hears that the job ended. An update
stays here, oldest first, until a connection's sender has handed it to its socket: the
sender takes the oldest (``next``), writes it and only then drops it (``sent``). A write
that fails, or a connection that drops while it is under way, leaves that update first in
line for the next connection, followed by every later one; an update may so go out twice,
and LiveKit takes a repeated status as it takes the first.

What this does not promise: that the server read it. ``sent`` means the WebSocket took the
frame (it is in the transport's buffer), so an update written just before a drop can still
be lost with the connection. And across a reconnect the replay reaches nobody on
livekit-server (1.13.5: a worker's jobs are forgotten when its connection closes,
pkg/service/agentservice.go; an UpdateJobStatus for a job the connection was not assigned
is ignored, pkg/agent/worker.go): a job assigned on a connection that dropped keeps
running, and its RUNNING/SUCCESS/FAILED after the drop tell the server nothing. The replay
stays: it costs nothing and is right for a server that keeps jobs across a reconnect. Each
update carries the connection its job was assigned on, so ``flush`` (the daemon's last
word at shutdown) waits only for updates some server can still take.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass

from livekit.protocol import agent as proto


@dataclass(frozen=True, eq=False)
class _Pending:
    update: proto.UpdateJobStatus
    connection: int | None  # the registration connection its job was assigned on; None: unknown


class JobUpdates:
    """The updates not yet written to LiveKit, oldest first. One sender at a time: a
    connection's sender ends before the next connection's starts."""

    def __init__(self) -> None:
        self._unsent: deque[_Pending] = deque()
        self._more = asyncio.Event()  # set while an update is waiting
        self._ended = 0  # connections up to this one have ended
        self._settled = asyncio.Event()  # nothing left that a server would still take
        self._settled.set()

    def put(
        self,
        job_id: str,
        status: proto.JobStatus.ValueType,
        error: str = "",
        *,
        connection: int | None = None,
    ) -> None:
        """Queue an update of a job assigned on ``connection`` (None: not known, always
        worth waiting for)."""
        update = proto.UpdateJobStatus(job_id=job_id, status=status, error=error)
        self._unsent.append(_Pending(update, connection))
        self._more.set()
        self._check()

    def unsent(self) -> list[proto.UpdateJobStatus]:
        """What is still to be written, oldest first."""
        return [pending.update for pending in self._unsent]

    async def next(self) -> proto.UpdateJobStatus:
        """The oldest update not yet written (waiting for one); it stays until ``sent``."""
        while not self._unsent:
            self._more.clear()
            await self._more.wait()
        return self._unsent[0].update

    def sent(self, update: proto.UpdateJobStatus) -> None:
        """``update``, the one ``next`` gave, was written: the next one is due."""
        # Identity, not equality: a job may report the same status twice, and only the
        # one written may go.
        if self._unsent and self._unsent[0].update is update:
            self._unsent.popleft()
        self._check()

    def connection_ended(self, connection: int) -> None:
        """Connections up to ``connection`` are gone: the server ignores the updates of the
        jobs assigned on them (they are still sent, but no longer waited for by flush)."""
        self._ended = max(self._ended, connection)
        self._check()

    def _check(self) -> None:
        if all(self._ignored(pending) for pending in self._unsent):
            self._settled.set()
        else:
            self._settled.clear()

    def _ignored(self, pending: _Pending) -> bool:
        return pending.connection is not None and pending.connection <= self._ended

    async def flush(self, timeout: float) -> bool:
        """Wait until every update put so far was written, but for those of jobs assigned
        on a connection that has ended (no server takes them any more); False on timeout."""
        try:
            await asyncio.wait_for(self._settled.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
