"""The `recovery` workload (issue 19): a job's SIGKILL to its replacement in the room.

For each kill: a fresh room with an observer (``rtc.Room``) in it, one dispatch, the agent
in and its job running; then the bench SIGKILLs the job's process and waits for a
``participant_connected`` at the observer of an agent participant whose attributes carry
``lkrun.recovered_from`` (lkrun's redispatch, ``on_failure = "redispatch"``). The figure is
kill -> that event; the same start to the replacement first listed by
RoomService.ListParticipants (polled) is the "joined" row.

Where the time goes, from lkrun's own records of both jobs (`lkrun jobs ls --json --all`,
wall clock on the same machine): kill -> the failed job's ``ended_at`` (the daemon sees
the exit), ``ended_at`` -> the replacement's ``offered_at`` (the decision, RoomService,
CreateDispatch and LiveKit's routing of the new job), ``offered_at`` -> ``started_at``
(a warm process starts the job) and ``started_at`` -> the observer's event (the join and
the server's announcement).

The official worker does nothing when a job process dies: it runs the same kill a few
times (OFFICIAL_KILLS) and waits ``wait`` s after each for any new agent; the table says
"never" when none came.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from livekit import rtc

from tests.bench.suts import SutError

if TYPE_CHECKING:
    from tests.bench.measure import Bench

RECOVERED_FROM = "lkrun.recovered_from"
OFFICIAL_KILLS = 3  # the official worker brings nothing back: a few kills show it
JOINED_POLL = 0.02
FIRST_AGENT_TIMEOUT = 20.0


@dataclass
class Arrival:
    identity: str
    attributes: dict[str, str]
    perf: float  # time.perf_counter() at the event
    wall: float  # time.time() at the event


@dataclass
class RoomWatch:
    """The observer of one kill's room: every agent participant that comes in."""

    room: rtc.Room = field(default_factory=rtc.Room)
    arrivals: list[Arrival] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.room.on("participant_connected", self._on_participant)

    def _on_participant(self, participant: rtc.RemoteParticipant) -> None:
        self.arrivals.append(
            Arrival(
                participant.identity,
                dict(participant.attributes),
                time.perf_counter(),
                time.time(),
            )
        )
        self.changed.set()

    async def first(self, timeout: float, *, replacing: bool) -> Arrival | None:
        """The first arrival (a replacement: one with lkrun.recovered_from), or None."""
        deadline = time.monotonic() + timeout
        while True:
            for arrival in self.arrivals:
                if not replacing or arrival.attributes.get(RECOVERED_FROM):
                    return arrival
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


def stages(kill_wall: float, seen_wall: float, jobs: list[dict[str, Any]], killed: str) -> dict:
    """Where the time from the kill to the replacement in the room went (ms), from lkrun's
    records of the killed job and of the one that replaces it; {} if either is missing."""
    dead = next((j for j in jobs if j.get("id") == killed), None)
    new = next((j for j in jobs if j.get("recovered_from") == killed), None)
    if dead is None or new is None:
        return {}
    ended, offered, started = dead.get("ended_at"), new.get("offered_at"), new.get("started_at")
    if ended is None or offered is None or started is None:
        return {}
    return {
        "kill_to_failed_ms": round((ended - kill_wall) * 1000, 2),
        "failed_to_offer_ms": round((offered - ended) * 1000, 2),
        "offer_to_started_ms": round((started - offered) * 1000, 2),
        "started_to_visible_ms": round((seen_wall - started) * 1000, 2),
    }


async def _poll_joined(bench: Bench, room: str, t0: float) -> float:
    """ms from t0 to a replacement listed by ListParticipants."""
    while True:
        listed = await bench.lk.participants(room)
        if any(p.attributes.get(RECOVERED_FROM) for p in listed or ()):
            return (time.perf_counter() - t0) * 1000
        await asyncio.sleep(JOINED_POLL)


async def one_kill(bench: Bench, room: str, wait: float) -> dict[str, Any]:
    """Dispatch to a fresh room, kill the job once its agent is in, and time what comes
    back. A dict with ``visible_ms``/``joined_ms`` (None: nothing within ``wait`` s)."""
    sut, lk = bench.sut, bench.lk
    await lk.create_room(room)
    watch = RoomWatch()
    try:
        await watch.room.connect(
            lk.server.url, lk.token(room), rtc.RoomOptions(auto_subscribe=False)
        )
        await lk.dispatch(room, sut.agent_name)
        first = await watch.first(FIRST_AGENT_TIMEOUT, replacing=False)
        if first is None:
            raise SutError(f"no agent in {room} within {FIRST_AGENT_TIMEOUT:g}s of the dispatch")
        pid = await _job_pid(bench, room)
        before = len(watch.arrivals)
        kill_wall, t0 = time.time(), time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        joined = asyncio.create_task(_poll_joined(bench, room, t0))
        try:
            if sut.system == "lkrun":
                seen = await watch.first(wait, replacing=True)
            else:  # any agent at all: the official worker sets no lkrun attribute
                seen = await _any_new(watch, before, wait)
            joined_ms: float | None = None
            if seen is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    joined_ms = await asyncio.wait_for(asyncio.shield(joined), 5)
        finally:
            joined.cancel()
            await asyncio.gather(joined, return_exceptions=True)
        result: dict[str, Any] = {
            "room": room,
            "visible_ms": round((seen.perf - t0) * 1000, 2) if seen else None,
            "joined_ms": round(joined_ms, 2) if joined_ms is not None else None,
        }
        if seen is not None and sut.system == "lkrun":
            killed = seen.attributes.get(RECOVERED_FROM, "")
            jobs = await sut.jobs(include_ended=True)  # type: ignore[attr-defined]
            result.update(stages(kill_wall, seen.wall, jobs, killed))
        return result
    finally:
        with contextlib.suppress(Exception):
            await watch.room.disconnect()
        await lk.delete_room(room)


async def _any_new(watch: RoomWatch, before: int, wait: float) -> Arrival | None:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if len(watch.arrivals) > before:
            return watch.arrivals[before]
        await asyncio.sleep(0.1)
    return None


async def _job_pid(bench: Bench, room: str, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = await bench.sut.job_pids([room])
        if room in pids:
            return pids[room]
        await asyncio.sleep(0.05)
    raise SutError(f"no running job process for {room} within {timeout:g}s")


async def kills(bench: Bench, count: int, wait: float) -> dict[str, Any]:
    """``count`` kills (the official worker: at most OFFICIAL_KILLS), each in its own room,
    one after the other on a settled machine with the warm pool full."""
    from tests.bench.measure import DISPATCH_SETTLE, summary

    if bench.sut.system != "lkrun":
        count = min(count, OFFICIAL_KILLS)
    samples: list[dict[str, Any]] = []
    await bench.warm_up()  # the first dispatch in a while pays the server's agent check
    for index in range(count):
        await bench.ready_for_next(DISPATCH_SETTLE)
        sample = await one_kill(bench, bench.room("kill", index), wait)
        samples.append(sample)
        if not await bench.sut.wait_no_jobs():
            bench.say("warning: a job did not end within 60s of its room's deletion")
        seen = [s["visible_ms"] for s in samples if s["visible_ms"] is not None]
        bench.say(
            f"recovery {index + 1}/{count}: "
            + (
                f"replacement visible after {sample['visible_ms']} ms"
                if sample["visible_ms"]
                else f"nothing within {wait:g}s"
            )
            + f" (p50 so far {summary(seen)['p50']} ms)"
        )

    def of(key: str) -> dict[str, Any]:
        return summary([s[key] for s in samples if s.get(key) is not None])

    return {
        "kills": count,
        "recovered": sum(1 for s in samples if s["visible_ms"] is not None),
        "wait_s": wait,
        "kill_to_visible_ms": of("visible_ms"),
        "kill_to_joined_ms": of("joined_ms"),
        "stages": {
            key: of(key)
            for key in (
                "kill_to_failed_ms",
                "failed_to_offer_ms",
                "offer_to_started_ms",
                "started_to_visible_ms",
            )
        },
        "samples": samples,
    }
