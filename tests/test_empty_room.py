"""A job left alone in its room ends (issue 19, item 3): the child side's rule, its wiring into
both app kinds' job, the done message, and the manifest setting. No network, no processes:
the end-to-end tests are in tests/test_empty_room_e2e.py."""

from __future__ import annotations

import asyncio
import logging
import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from livekit import rtc

from lkrun.child.appkind import JobResult
from lkrun.child.runner import JobRun
from lkrun.context import JobContext, JobInfo, is_company
from lkrun.manifest import ManifestError, parse_manifest
from lkrun.shared import empty_room
from lkrun.shared.empty_room import AloneTimer, EmptyRoomWatch, timeout_from_start

AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT
STANDARD = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD
SIP = rtc.ParticipantKind.PARTICIPANT_KIND_SIP
LOG = logging.getLogger("test.empty_room")


@dataclass
class FakeHandle:
    delay: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeClock:
    """Stands in for loop.call_later: the test fires what is scheduled when it says."""

    handles: list[FakeHandle] = field(default_factory=list)

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeHandle:
        handle = FakeHandle(delay, callback)
        self.handles.append(handle)
        return handle

    @property
    def pending(self) -> list[FakeHandle]:
        return [h for h in self.handles if not h.cancelled]

    def fire(self) -> None:
        [handle] = self.pending
        handle.cancelled = True  # a TimerHandle runs once
        handle.callback()


# --- the start message's field ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (3, 3.0),
        (0.5, 0.5),
        (0, 0.0),
        (-1, 0.0),
        (math.inf, 0.0),
        (math.nan, 0.0),
        ("3s", 0.0),
        (True, 0.0),
        (None, 0.0),
    ],
)
def test_the_start_message_gives_the_timeout_in_seconds_and_anything_else_is_off(
    value: Any, seconds: float
) -> None:
    assert timeout_from_start({"empty_timeout": value}) == seconds


def test_a_start_without_the_field_is_off() -> None:
    assert timeout_from_start({}) == 0.0  # an older daemon, or the conformance kit


# --- the rule, with a fake clock ----------------------------------------------------------


def test_alone_starts_the_count_company_stops_it_and_it_fires_once() -> None:
    clock, fired = FakeClock(), []
    timer = AloneTimer(3.0, lambda: fired.append(True), clock.call_later)
    timer.alone(True)
    assert [h.delay for h in clock.pending] == [3.0]
    timer.alone(True)  # still alone: the count goes on, not from zero
    assert len(clock.handles) == 1

    timer.alone(False)  # someone came: no count
    assert clock.pending == [] and not timer.counting
    timer.alone(False)
    timer.alone(True)  # alone again: a new count, from zero
    assert len(clock.handles) == 2 and [h.delay for h in clock.pending] == [3.0]

    clock.fire()
    assert fired == [True] and timer.expired
    timer.alone(False)
    timer.alone(True)  # once expired, it never counts again
    assert fired == [True] and clock.pending == []


def test_a_closed_timer_never_fires() -> None:
    clock, fired = FakeClock(), []
    timer = AloneTimer(3.0, lambda: fired.append(True), clock.call_later)
    timer.alone(True)
    [handle] = clock.pending
    timer.close()
    assert handle.cancelled
    handle.callback()  # a handle already due when it was cancelled
    timer.alone(True)
    assert fired == [] and clock.pending == []


class FakeRoom(rtc.EventEmitter[Any]):
    """The part of rtc.Room the watch reads: remote participants and their events."""

    def __init__(self, *kinds: int) -> None:
        super().__init__()
        self.remote_participants: dict[str, Any] = {}
        for kind in kinds:
            self.join(kind)

    def join(self, kind: int, identity: str = "") -> Any:
        who = _Participant(identity or f"p{len(self.remote_participants)}", kind)
        self.remote_participants[who.identity] = who
        self.emit("participant_connected", who)
        return who

    def leave(self, who: Any) -> None:
        del self.remote_participants[who.identity]  # as rtc.Room does, before the event
        self.emit("participant_disconnected", who)


@dataclass
class _Participant:
    identity: str
    kind: int


def watch(room: FakeRoom, clock: FakeClock, emptied: list[bool]) -> EmptyRoomWatch:
    w = EmptyRoomWatch(room, 3.0, lambda: emptied.append(True), LOG, is_company, clock.call_later)
    w.start()
    return w


def test_only_a_participant_who_is_not_an_agent_keeps_the_job_company() -> None:
    clock, emptied = FakeClock(), []
    room = FakeRoom(AGENT)  # another agent (of another name) is there: alone all the same
    watch(room, clock, emptied)
    assert len(clock.pending) == 1  # counting from the start

    room.join(AGENT)
    assert len(clock.pending) == 1 and len(clock.handles) == 1  # no reset by an agent
    caller = room.join(STANDARD)
    assert clock.pending == []
    phone = room.join(SIP)
    room.leave(caller)
    assert clock.pending == []  # the SIP leg is company
    room.leave(phone)
    assert len(clock.pending) == 1  # alone again: counting anew
    clock.fire()
    assert emptied == [True]
    room.leave(room.join(STANDARD))  # once it has fired, it is done
    assert emptied == [True] and clock.pending == []


def test_a_job_that_joins_a_room_with_a_caller_waits_for_the_caller_to_leave() -> None:
    clock, emptied = FakeClock(), []
    room = FakeRoom()
    caller = room.join(STANDARD)
    watch(room, clock, emptied)
    assert clock.pending == []
    room.leave(caller)
    assert len(clock.pending) == 1
    clock.fire()
    assert emptied == [True]


def test_the_room_disconnecting_stops_the_watch() -> None:
    clock, emptied = FakeClock(), []
    room = FakeRoom()
    watch(room, clock, emptied)
    [handle] = clock.pending
    room.emit("disconnected", rtc.DisconnectReason.CLIENT_INITIATED)
    assert handle.cancelled
    room.join(STANDARD)
    assert emptied == []


async def test_with_the_real_loop_it_fires_after_the_timeout_and_not_before() -> None:
    room = FakeRoom()
    emptied = asyncio.Event()
    started = asyncio.get_running_loop().time()
    w = EmptyRoomWatch(room, 0.3, emptied.set, LOG, is_company)
    w.start()
    await asyncio.wait_for(emptied.wait(), 5)
    assert asyncio.get_running_loop().time() - started >= 0.29


async def test_with_the_real_loop_a_caller_who_comes_stops_it() -> None:
    room = FakeRoom()
    emptied = asyncio.Event()
    w = EmptyRoomWatch(room, 0.2, emptied.set, LOG, is_company)
    w.start()
    caller = room.join(STANDARD)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(emptied.wait()), 0.5)
    room.leave(caller)
    await asyncio.wait_for(emptied.wait(), 5)
    w.close()


# --- the lkrun app kind's context ----------------------------------------------------------


def context(empty_timeout: float) -> JobContext:
    job = JobInfo.from_dict({"id": "AJ_1", "room": {"name": "r", "sid": "RM_1"}})
    return JobContext(
        job=job, url="", token="", identity="a", logger=LOG, empty_timeout=empty_timeout
    )


async def test_the_context_ends_the_job_as_room_empty() -> None:
    ctx = context(3.0)
    assert ctx._empty is not None and ctx._empty.timer.timeout == 3.0
    ctx._room_empty()
    assert ctx.shutdown_requested and ctx.shutdown_reason == empty_room.REASON
    assert ctx._cause == empty_room.CAUSE


async def test_a_job_already_ending_for_another_reason_is_not_a_room_empty() -> None:
    ctx = context(3.0)
    ctx.shutdown("stopped by `lkrun jobs kill`")
    ctx._room_empty()
    assert ctx.shutdown_reason == "stopped by `lkrun jobs kill`" and ctx._cause == ""


async def test_without_the_setting_the_context_does_not_watch() -> None:
    assert context(0.0)._empty is None


# --- the done message ---------------------------------------------------------------------


class FakePipe:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, kind: str, **fields: Any) -> None:
        self.sent.append((kind, fields))


class EndedJob:
    def __init__(self, result: JobResult) -> None:
        self.result = result

    def shutdown(self, reason: str) -> None:
        pass

    def drain(self) -> None:
        pass

    async def run(self, grace: Callable[[], float]) -> JobResult:
        return self.result


class OneJobApp:
    def __init__(self, result: JobResult) -> None:
        self.result = result
        self.starts: list[Any] = []

    def new_job(self, start: Any, logger: logging.Logger) -> EndedJob:
        self.starts.append(start)
        return EndedJob(self.result)


@pytest.mark.parametrize("cause", ["room_empty", ""])
async def test_the_done_message_carries_the_cause_when_there_is_one(cause: str) -> None:
    pipe = FakePipe()
    result = JobResult(ok=True, reason=empty_room.REASON if cause else "entrypoint returned")
    app = OneJobApp(JobResult(**{**result.__dict__, "cause": cause}))
    run = JobRun(pipe, app)  # type: ignore[arg-type]
    run.handle({"type": "start", "protocol": 1, "job": {}, "empty_timeout": 3})
    assert await asyncio.wait_for(run.run(), 5) is True
    kind, fields = pipe.sent[-1]
    assert kind == "done" and fields["ok"] is True and fields["error"] == ""
    if cause:
        assert (fields["reason"], fields["cause"]) == ("room empty", "room_empty")
    else:
        assert "cause" not in fields  # what an older runner sent: nothing new to ignore


# --- the manifest ---------------------------------------------------------------------------


def parse(text: str) -> Any:
    return parse_manifest(textwrap.dedent(text), "agents.toml")


AGENTS = """
[agents.a]
entrypoint = "pkg.mod:main"
[agents.b]
entrypoint = "pkg.mod:main"
empty_timeout = "90s"
[agents.c]
entrypoint = "pkg.mod:main"
empty_timeout = "off"
[agents.d]
entrypoint = "pkg.mod:main"
empty_timeout = 0
"""


def test_empty_timeout_is_off_by_default() -> None:
    manifest = parse(AGENTS)
    assert manifest.daemon.empty_timeout == 0.0
    timeouts = {name: spec.empty_timeout for name, spec in manifest.agents.items()}
    assert timeouts == {"a": 0.0, "b": 90.0, "c": 0.0, "d": 0.0}


def test_the_daemon_table_gives_the_agents_default_and_an_agent_overrides_it() -> None:
    manifest = parse('[daemon]\nempty_timeout = "1m30s"\n' + AGENTS)
    assert manifest.daemon.empty_timeout == 90.0
    timeouts = {name: spec.empty_timeout for name, spec in manifest.agents.items()}
    assert timeouts == {"a": 90.0, "b": 90.0, "c": 0.0, "d": 0.0}


@pytest.mark.parametrize("value", ['"soon"', "-1", '"3"', "true", '"-3s"'])
def test_a_bad_empty_timeout_is_one_line_naming_file_agent_and_field(value: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse(f'[agents.a]\nentrypoint = "pkg.mod:main"\nempty_timeout = {value}\n')
    line = str(info.value)
    assert (info.value.agent, info.value.field) == ("a", "empty_timeout")
    assert line.startswith("agents.toml: agent 'a': field 'empty_timeout': must be a duration")
    assert "\n" not in line and line.endswith(f"got {value.replace(chr(34), chr(39))}")
    with pytest.raises(ManifestError) as info:
        parse(f"[daemon]\nempty_timeout = {value}\n" + AGENTS)
    assert info.value.field == "daemon.empty_timeout" and "\n" not in str(info.value)
