"""A job left alone in its room ends: the agent's ``empty_timeout`` (used by the child side).

A job is alone when no remote participant in its room is anything but an agent or an
egress (lkrun.shared.participant_kinds.is_dependent; lkrun.context.is_company: a caller,
a SIP leg, an ingress keep it company).
Agents of other names keep no one company, and neither does the job's own participant.
Once alone for ``empty_timeout`` seconds running (counted from the moment the job is in the
room and alone, also when nobody ever came), the job shuts itself down with the reason
``REASON``, a success, and its ``done`` message says ``"cause": CAUSE`` so that the daemon
records why (docs/protocol.md). A participant of another kind who joins meanwhile stops the
count; the next time the job is alone it starts again from zero.

Both app kinds use it: lkrun.context.JobContext once ``connect()`` has joined, and
lkrun.child.framework.job once the framework's JobContext has. ``AloneTimer`` is the rule
alone, without a room or a clock of its own, so it is tested with a fake scheduler. Like the
rest of lkrun.shared it imports only the standard library: the room is whatever has an
rtc.Room's ``on``, ``off`` and ``remote_participants``, and what counts as company is the
caller's to say.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

REASON = "room empty"  # the job's stop reason (history: stop_reason)
CAUSE = "room_empty"  # the done message's cause (the daemon's Cause.ROOM_EMPTY)
START_FIELD = "empty_timeout"  # in the start message: seconds, 0 or absent for off


def timeout_from_start(start: Mapping[str, Any]) -> float:
    """The start message's ``empty_timeout`` in seconds; 0 (off) when it is absent or not a
    positive finite number (an older daemon sends none; a malformed one must not end jobs)."""
    value = start.get(START_FIELD)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    seconds = float(value)
    return seconds if 0 < seconds < math.inf else 0.0


class Handle(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], Handle]


class AloneTimer:
    """Calls ``on_expire`` once, after ``timeout`` seconds of being alone without a break.

    ``alone(True/False)`` says what the room looks like now, as often as it changes (or
    more: a repeated ``alone(True)`` does not restart the count). ``schedule`` is
    ``loop.call_later`` unless a test gives its own.
    """

    def __init__(
        self, timeout: float, on_expire: Callable[[], None], schedule: Schedule | None = None
    ) -> None:
        self.timeout = timeout
        self._on_expire = on_expire
        self._schedule = schedule
        self._handle: Handle | None = None
        self.expired = False
        self.closed = False

    @property
    def counting(self) -> bool:
        return self._handle is not None

    def alone(self, alone: bool) -> None:
        if self.closed or self.expired:
            return
        if not alone:
            self._cancel()
        elif self._handle is None:
            schedule = self._schedule or asyncio.get_running_loop().call_later
            self._handle = schedule(self.timeout, self._expire)

    def close(self) -> None:
        """No more counting (the job is leaving the room)."""
        self.closed = True
        self._cancel()

    def _cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _expire(self) -> None:
        self._handle = None
        if self.closed or self.expired:
            return
        self.expired = True
        self._on_expire()


class Room(Protocol):
    """What the watch reads of an rtc.Room."""

    @property
    def remote_participants(self) -> Mapping[str, Any]: ...

    def on(self, event: Any, callback: Callable[..., Any]) -> Any: ...

    def off(self, event: Any, callback: Callable[..., Any]) -> Any: ...


class EmptyRoomWatch:
    """Feeds an AloneTimer from a connected room's participants; ``on_empty()`` once the
    job has been alone for ``timeout``. ``start()`` when the job is in the room; it stops by
    itself when the room disconnects, or with ``close()``."""

    def __init__(
        self,
        room: Room,
        timeout: float,
        on_empty: Callable[[], None],
        logger: logging.Logger,
        is_company: Callable[[Any], bool],
        schedule: Schedule | None = None,
    ) -> None:
        self.room = room
        self.is_company = is_company  # whether a remote participant keeps the job company
        self.log = logger
        self.timer = AloneTimer(timeout, self._expired, schedule)
        self._on_empty = on_empty
        self._started = False

    def start(self) -> None:
        if self._started or self.timer.closed:
            return
        self._started = True
        self.room.on("participant_connected", self._changed)
        self.room.on("participant_disconnected", self._changed)
        self.room.on("disconnected", self._disconnected)
        self._changed()

    def close(self) -> None:
        self.timer.close()
        if self._started:
            self._started = False
            self.room.off("participant_connected", self._changed)
            self.room.off("participant_disconnected", self._changed)
            self.room.off("disconnected", self._disconnected)

    def _changed(self, *_: Any) -> None:
        # The room removes a participant who left before it emits participant_disconnected.
        alone = not any(self.is_company(p) for p in self.room.remote_participants.values())
        was = self.timer.counting
        self.timer.alone(alone)
        if self.timer.counting and not was:
            self.log.info(
                "alone in the room: the job ends in %gs (empty_timeout) unless someone joins",
                self.timer.timeout,
            )
        elif was and not self.timer.counting and not self.timer.expired:
            self.log.info("no longer alone in the room: the empty_timeout count stops")

    def _disconnected(self, *_: Any) -> None:
        self.close()

    def _expired(self) -> None:
        self.log.info(
            "alone in the room for %gs (empty_timeout): ending the job", self.timer.timeout
        )
        self.close()
        self._on_empty()
