"""Job status updates on their way to LiveKit: in order, at least once, across reconnects.

LiveKit frees a job only when it hears that the job ended, so no update may be lost to a
dropped connection, and a job's updates must arrive in the order they were made (RUNNING
before SUCCESS). An update stays here, oldest first, until a write of it succeeded: each
connection's sender takes the oldest (``next``), writes it and only then drops it (``sent``).
A write that fails, or a connection that drops while it is under way, leaves that update
first in line for the next connection, followed by every later one. An update written just
before a connection dropped may so be sent twice; LiveKit takes a repeated status as it
takes the first.
"""

from __future__ import annotations

import asyncio
from collections import deque

from livekit.protocol import agent as proto


class JobUpdates:
    """The updates not yet written to LiveKit, oldest first. One sender at a time: a
    connection's sender ends before the next connection's starts."""

    def __init__(self) -> None:
        self._unsent: deque[proto.UpdateJobStatus] = deque()
        self._more = asyncio.Event()  # set while an update is waiting
        self._all_sent = asyncio.Event()
        self._all_sent.set()

    def put(self, job_id: str, status: proto.JobStatus.ValueType, error: str = "") -> None:
        self._unsent.append(proto.UpdateJobStatus(job_id=job_id, status=status, error=error))
        self._more.set()
        self._all_sent.clear()

    def unsent(self) -> list[proto.UpdateJobStatus]:
        """What is still to be written, oldest first."""
        return list(self._unsent)

    async def next(self) -> proto.UpdateJobStatus:
        """The oldest update not yet written (waiting for one); it stays until ``sent``."""
        while not self._unsent:
            self._more.clear()
            await self._more.wait()
        return self._unsent[0]

    def sent(self, update: proto.UpdateJobStatus) -> None:
        """``update``, the one ``next`` gave, was written: the next one is due."""
        # Identity, not equality: a job may report the same status twice, and only the
        # one written may go.
        if self._unsent and self._unsent[0] is update:
            self._unsent.popleft()
        if not self._unsent:
            self._all_sent.set()

    async def flush(self, timeout: float) -> bool:
        """Wait until every update put so far was written; False on timeout."""
        try:
            await asyncio.wait_for(self._all_sent.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True
