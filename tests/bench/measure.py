"""What the bench measures on one system under test (SUT), all against one livekit-server.

- ``latency``: sequential dispatches, each to a fresh room where an observer is already
  connected: CreateDispatch -> the agent's ``participant_connected`` at the observer
  ("visible"), CreateDispatch -> the agent listed by RoomService.ListParticipants
  ("joined", polled every 20 ms), and the SUT's own offer -> entrypoint.
- ``memory``: N rooms dispatched at once; once every agent is in, hold, then PSS/USS of
  each job's process tree, and RSS/PSS/CPU of the SUT's main process over the hold.
- ``max_jobs``: add rooms step by step until an agent is not in within the timeout, an
  already-held job drops, or a job fails (the host's limit), or a safety bound (ceiling,
  memory, time) ends the ramp; the last fully held count (``tests/bench/limit.py``).
- ``media_rooms`` (the media workload with ``--ramp-to-limit``): rooms added step by step,
  all playing, until a meter falls behind: the most rooms held with none behind.
- ``media`` (the media workload, instead of ``memory``): N rooms, each with a tone
  observer (``tests/bench/tones.py``, in processes of their own) that joins and publishes
  its track before the meter job is dispatched and starts a 48 kHz tone on it once every
  meter is in; once every meter reports the tone, a short warm-in,
  then over the hold: CPU of the job process trees, the main process, the helpers, the
  observers and the machine; PSS/USS per job; and per job whether it fell behind (see
  ``tests/bench/media.py``).

The same phases run for every workload (``suts.WORKLOADS``): only the agent differs.
Each phase, ramp step and dispatch starts once the machine's CPU has settled (see
``SETTLE_CPU``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import psutil
from livekit import api, rtc
from livekit.protocol import models

from lkrun import memory_map
from tests.bench import limit, media, recovery
from tests.bench.procs import descendants
from tests.bench.suts import Server, Sut, SutError

OBSERVER = "bench-observer"
MB = 1024 * 1024
JOINED_POLL = 0.02
# Before each phase, ramp step and sequential dispatch the machine's CPU (%, over a window)
# must be below SETTLE_CPU, for up to SETTLE_TIMEOUT s: starting the next thing while the
# last one's processes still burn CPU would measure the leftovers. Phases and ramp steps
# take a window longer than lkrun's CPU sampling (2 s): lkrun reports itself full while its
# last sample says 100 %, and livekit-server does not retry a dispatch it found no worker
# for. Between sequential dispatches (one job at a time) a short window is enough.
SETTLE_CPU = 75.0
SETTLE_TIMEOUT = 15.0
PHASE_SETTLE = 2.5
DISPATCH_SETTLE = 0.3
# Media: seconds between every meter reporting the tone and the start of the hold window
# (subscriptions and jitter buffers settle; the jobs' start-up is not measured).
MEDIA_WARM_IN = 3.0


@dataclass
class Settings:
    dispatches: int = 50
    warmup: int = 1
    concurrency: list[int] = field(default_factory=lambda: [1, 10, 50])
    hold: float = 5.0
    max_jobs_cap: int = 100
    ramp_step: int = 10
    visible_timeout: float = 15.0
    ramp_timeout: float = 600.0
    # recovery: how long after a kill to wait for a replacement before counting none.
    recovery_wait: float = 10.0
    # Issue 20: the ramp goes on until the host stops holding new calls (max_jobs_cap is
    # then a safety ceiling; media: the rooms ramp, tests/bench/limit.py).
    ramp_to_limit: bool = False
    tone_frame_ms: int = media.FRAME_MS  # the media observers' tone frames


def summary(samples: list[float]) -> dict[str, Any]:
    """n, p50, p95 (nearest rank), mean, min, max, and the samples, in the samples' unit."""
    if not samples:
        return {"n": 0, "p50": None, "p95": None, "mean": None, "min": None, "max": None}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "n": len(ordered),
        "p50": round(statistics.median(ordered), 2),
        "p95": round(rank(95), 2),
        "mean": round(statistics.fmean(ordered), 2),
        "min": round(ordered[0], 2),
        "max": round(ordered[-1], 2),
        "samples": [round(s, 2) for s in samples],
    }


class LiveKit:
    """RoomService and AgentDispatchService on the bench's livekit-server; remembers rooms."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.api = api.LiveKitAPI(
            server.http_url,
            server.api_key,
            server.api_secret,
            timeout=aiohttp.ClientTimeout(total=15),
            failover=False,
        )
        self.rooms: set[str] = set()
        self._sem = asyncio.Semaphore(10)

    async def aclose(self) -> None:
        await self.api.aclose()

    async def create_room(self, name: str) -> None:
        async with self._sem:
            await self.api.room.create_room(
                api.CreateRoomRequest(name=name, empty_timeout=900, departure_timeout=60)
            )
        self.rooms.add(name)

    async def dispatch(self, room: str, agent: str) -> None:
        async with self._sem:
            await self.api.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=agent, room=room)
            )

    async def delete_room(self, name: str) -> None:
        self.rooms.discard(name)
        with contextlib.suppress(api.TwirpError, aiohttp.ClientError, asyncio.TimeoutError):
            async with self._sem:
                await self.api.room.delete_room(api.DeleteRoomRequest(room=name))

    async def delete_all(self) -> None:
        await asyncio.gather(*(self.delete_room(r) for r in list(self.rooms)))

    async def agent_in(self, room: str) -> bool:
        """Whether a participant other than the observer is in the room."""
        return await self.agent_joined(room) is not None

    async def participants(self, room: str) -> list[models.ParticipantInfo] | None:
        """RoomService.ListParticipants of the room; None if it did not answer."""
        async with self._sem:
            try:
                resp = await self.api.room.list_participants(api.ListParticipantsRequest(room=room))
            except (api.TwirpError, aiohttp.ClientError, asyncio.TimeoutError):
                return None
        return list(resp.participants)

    async def agent_joined(self, room: str) -> float | None:
        """When (wall clock, by the server) the agent joined the room; None: not yet."""
        participants = await self.participants(room)
        joined = [p.joined_at_ms for p in participants or () if p.identity != OBSERVER]
        return min(joined) / 1000 if joined else None

    def token(self, room: str) -> str:
        return (
            api.AccessToken(self.server.api_key, self.server.api_secret)
            .with_identity(OBSERVER)
            .with_grants(api.VideoGrants(room_join=True, room=room))
            .to_jwt()
        )


class Observer:
    """An rtc.Room in the bench process that notes when another participant shows up."""

    def __init__(self, lk: LiveKit, room: str) -> None:
        self.lk = lk
        self.name = room
        self.room = rtc.Room()
        self.seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.room.on("participant_connected", self._on_participant)

    def _on_participant(self, participant: rtc.RemoteParticipant) -> None:
        if participant.identity != OBSERVER and not self.seen.done():
            self.seen.set_result(time.perf_counter())

    async def connect(self) -> None:
        await self.room.connect(
            self.lk.server.url, self.lk.token(self.name), rtc.RoomOptions(auto_subscribe=False)
        )

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.room.disconnect()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return []
    return [root, *descendants(pid)]


def tree_memory(procs: list[psutil.Process]) -> dict[str, float]:
    """rss, pss and uss (MB) summed over processes, skipping those that vanished."""
    total = {"rss": 0.0, "pss": 0.0, "uss": 0.0}
    for proc in procs:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        total["rss"] += info.rss / MB
        total["pss"] += getattr(info, "pss", 0) / MB
        total["uss"] += info.uss / MB
    return total


BREAKDOWN_JOBS = 3  # jobs whose smaps are read at each memory level (a few: it stays cheap)


def job_breakdown(pids: list[int], sample: int = BREAKDOWN_JOBS) -> dict[str, Any]:
    """Where a job's memory goes (``lkrun.memory_map.report``, each job's process tree): the
    mean per kind (kB) over the first ``sample`` jobs whose smaps could be read, and the
    thread names counted per job over every job (``/proc/PID/task/*/comm``, cheap)."""
    sampled: list[dict[str, Any]] = []
    for pid in pids:
        if len(sampled) >= sample:
            break
        with contextlib.suppress(memory_map.Unreadable):
            sampled.append(memory_map.report(pid, tree=True))
    per_kind: dict[str, dict[str, int]] = {}
    for one in sampled:
        memory_map.add(per_kind, one["kinds"])
    n = max(1, len(sampled))
    kinds = {kind: {key: round(v / n) for key, v in row.items()} for kind, row in per_kind.items()}
    names: dict[str, list[int]] = {}
    counts: list[int] = []
    for pid in pids:
        tree = [pid, *memory_map.descendants(pid)]
        job: Counter[str] = Counter()
        for one in tree:
            job.update(memory_map.threads(one)[0])
        if not job:
            continue  # ended meanwhile
        counts.append(sum(job.values()))
        for name in set(names) | set(job):
            names.setdefault(name, [0] * (len(counts) - 1)).append(job.get(name, 0))
    return {
        "unit": "kB",
        "jobs_sampled": len(sampled),
        "pids": [one["pid"] for one in sampled],
        "kinds": kinds,
        "total": memory_map.total(kinds) if kinds else {},
        "thread_jobs": len(counts),
        "threads_per_job": summary([float(c) for c in counts]) if counts else None,
        "thread_names_per_job": {
            name: {"mean": round(statistics.fmean(v), 2), "min": min(v), "max": max(v)}
            for name, v in sorted(names.items(), key=lambda kv: -sum(kv[1]))
        },
    }


_prime_cpu = limit.prime_cpu
_cpu = limit.cpu_percent


class Bench:
    """Runs the phases on one SUT; every room it creates is deleted before it returns."""

    def __init__(self, sut: Sut, lk: LiveKit, settings: Settings) -> None:
        self.sut = sut
        self.lk = lk
        self.settings = settings
        self.run_id = uuid.uuid4().hex[:6]

    def say(self, message: str) -> None:
        print(f"[{self.sut.label}] {message}", flush=True)

    def room(self, phase: str, index: int) -> str:
        return f"bench-{self.sut.label}-{self.run_id}-{phase}-{index}"

    async def cleanup(self, rooms: list[str], timeout: float = 90.0) -> None:
        await asyncio.gather(*(self.lk.delete_room(r) for r in rooms))
        if not await self.sut.wait_no_jobs(timeout):
            self.say(f"warning: jobs still running {timeout:g}s after their rooms were deleted")

    async def ready_for_next(self, window: float = PHASE_SETTLE) -> None:
        if not await self.sut.wait_idle_ready(60):
            self.note(f"fewer than {self.sut.idle} idle processes ready after 60s")
        await self.settle(window)

    async def settle(self, window: float = PHASE_SETTLE, timeout: float = SETTLE_TIMEOUT) -> float:
        """Wait until the machine's CPU over ``window`` s is below SETTLE_CPU (at most
        ``timeout`` s); return the last reading (%)."""
        deadline = time.monotonic() + timeout
        while True:
            busy = float(await asyncio.to_thread(psutil.cpu_percent, window))
            if busy < SETTLE_CPU:
                return busy
            if time.monotonic() > deadline:
                self.note(f"CPU still at or above {SETTLE_CPU:g}% after {timeout:g}s")
                return busy

    def note(self, message: str) -> None:
        """A warning now, and once in the run notes."""
        self.say(f"warning: {message}")
        if message not in self.sut.notes:
            self.sut.notes.append(message)

    # -- baseline -------------------------------------------------------------------------

    async def idle_baseline(self) -> dict[str, Any]:
        """The main process and its helpers (idle pool, forkserver...) with no job."""
        await self.ready_for_next()
        main = psutil.Process(self.sut.main_pid)
        helpers = descendants(self.sut.main_pid)
        _prime_cpu([main])
        await asyncio.sleep(self.settings.hold)
        cpu = _cpu([main])
        mem = tree_memory([main])
        others = tree_memory(helpers)
        return {
            "main_rss_mb": round(mem["rss"], 1),
            "main_pss_mb": round(mem["pss"], 1),
            "main_uss_mb": round(mem["uss"], 1),
            "main_cpu_percent": round(cpu, 2),
            "helper_processes": len(helpers),
            "helpers_pss_mb": round(others["pss"], 1),
        }

    # -- latency --------------------------------------------------------------------------

    async def one_dispatch(self, room: str) -> tuple[float | None, float | None]:
        """(dispatch -> visible ms, dispatch -> joined ms); None when it timed out."""
        await self.lk.create_room(room)
        observer = Observer(self.lk, room)
        try:
            await observer.connect()
            t0 = time.perf_counter()
            await self.lk.dispatch(room, self.sut.agent_name)
            joined_task = asyncio.create_task(self._poll_joined(room, t0))
            visible: float | None = None
            try:
                seen = await asyncio.wait_for(observer.seen, self.settings.visible_timeout * 2)
                visible = (seen - t0) * 1000
            except asyncio.TimeoutError:
                pass
            try:
                joined = await asyncio.wait_for(joined_task, 5 if visible else 1)
            except asyncio.TimeoutError:
                joined = None
            return visible, joined
        finally:
            await observer.close()  # first: a room deleted under it makes the SDK log noise
            await self.lk.delete_room(room)

    async def _poll_joined(self, room: str, t0: float) -> float:
        while True:
            if await self.lk.agent_in(room):
                return (time.perf_counter() - t0) * 1000
            await asyncio.sleep(JOINED_POLL)

    async def warm_up(self) -> None:
        for i in range(self.settings.warmup):
            await self.ready_for_next()
            await self.one_dispatch(self.room("warmup", i))
            await self.sut.wait_no_jobs()

    async def latency(self) -> dict[str, Any]:
        s = self.settings
        await self.warm_up()
        visible: list[float] = []
        joined: list[float] = []
        rooms: list[str] = []
        timeouts = 0
        for i in range(s.dispatches):
            await self.ready_for_next(DISPATCH_SETTLE)
            room = self.room("lat", i)
            rooms.append(room)
            seen, inside = await self.one_dispatch(room)
            if seen is None:
                timeouts += 1
            else:
                visible.append(seen)
            if inside is not None:
                joined.append(inside)
            if not await self.sut.wait_no_jobs():
                self.say("warning: a job did not end within 60s of its room's deletion")
            if (i + 1) % 10 == 0 or i + 1 == s.dispatches:
                self.say(
                    f"latency {i + 1}/{s.dispatches}: visible p50 "
                    f"{summary(visible)['p50']} ms, joined p50 {summary(joined)['p50']} ms"
                )
        offers = await self.sut.offer_to_entrypoint_ms(rooms)
        if not offers:
            self.say("offer -> entrypoint: not reported by this system (skipped)")
            self.sut.notes.append("offer -> entrypoint not reported (skipped)")
        result = {
            "dispatch_to_visible_ms": summary(visible),
            "dispatch_to_joined_ms": summary(joined),
            "offer_to_entrypoint_ms": summary([offers[r] for r in rooms if r in offers]),
            "offer_to_entrypoint_source": self.sut.offer_source,
            "timeouts": timeouts,
        }
        if self.sut.offer_source.startswith("events"):
            # The host's own stamps too, where it has them apart from the events (lkrun).
            started = await self.sut.offer_to_started_ms(rooms)
            if started:
                result["offer_to_started_ms"] = summary([started[r] for r in rooms if r in started])
        return result

    # -- concurrent jobs ------------------------------------------------------------------

    async def dispatch_rooms(self, rooms: list[str]) -> dict[str, float]:
        """Create and dispatch each room; room -> wall-clock time of its CreateDispatch (the
        server, on this machine, stamps when each agent joined on the same clock)."""
        await asyncio.gather(*(self.lk.create_room(r) for r in rooms))
        sent: dict[str, float] = {}

        async def one(room: str) -> None:
            sent[room] = time.time()
            await self.lk.dispatch(room, self.sut.agent_name)

        await asyncio.gather(*(one(r) for r in rooms))
        return sent

    async def wait_agents(self, sent: dict[str, float], timeout: float) -> dict[str, float]:
        """Poll until each room has its agent, or timeout after its own dispatch.

        Returns room -> seconds from its dispatch to its agent joining (for those in), from
        the server's join time: the poll's own period does not count.
        """
        pending = dict(sent)
        arrived: dict[str, float] = {}
        while pending:
            self.sut.check_alive()
            rooms = list(pending)
            joined = await asyncio.gather(*(self.lk.agent_joined(r) for r in rooms))
            now = time.time()
            for room, at in zip(rooms, joined, strict=True):
                if at is not None:
                    arrived[room] = max(0.0, at - pending.pop(room))
                elif now - pending[room] > timeout:
                    pending.pop(room)
            if pending:
                # At most ~50 ListParticipants a second: the poll must not load the SUT.
                await asyncio.sleep(min(2.0, max(0.1, len(pending) * 0.02)))
        return arrived

    async def memory_at(self, count: int) -> dict[str, Any]:
        s = self.settings
        await self.ready_for_next()
        rooms = [self.room(f"mem{count}", i) for i in range(count)]
        try:
            sent = await self.dispatch_rooms(rooms)
            arrived = await self.wait_agents(sent, timeout=60 + 2 * count)
            first = min(sent.values())
            all_in = max((sent[r] + arrived[r] - first for r in arrived), default=0.0)
            result: dict[str, Any] = {"jobs": count, "agents_in": len(arrived)}
            if len(arrived) < count:
                self.say(f"memory @{count}: only {len(arrived)} agents came in")
            result["all_in_s"] = round(all_in, 2)
            pids = await self.sut.job_pids(rooms)
            job_trees = {room: _tree(pid) for room, pid in pids.items()}
            job_procs = [p for tree in job_trees.values() for p in tree]
            main = psutil.Process(self.sut.main_pid)
            _prime_cpu([main, *job_procs])
            await asyncio.sleep(s.hold)
            result["main_cpu_percent"] = round(_cpu([main]), 2)
            result["jobs_cpu_percent"] = round(_cpu(job_procs), 2)
            per_job = [tree_memory(tree) for tree in job_trees.values()]
            per_job = [m for m in per_job if m["rss"] > 0]
            result["jobs_sampled"] = len(per_job)
            for key in ("pss", "uss", "rss"):
                values = [m[key] for m in per_job]
                result[f"job_{key}_mb"] = round(statistics.fmean(values), 1) if values else None
            result["jobs_pss_total_mb"] = round(sum(m["pss"] for m in per_job), 1)
            main_mem = tree_memory([main])
            result["main_rss_mb"] = round(main_mem["rss"], 1)
            result["main_pss_mb"] = round(main_mem["pss"], 1)
            result["main_uss_mb"] = round(main_mem["uss"], 1)
            job_pids = {p.pid for p in job_procs}
            helpers = [p for p in descendants(self.sut.main_pid) if p.pid not in job_pids]
            result["helper_processes"] = len(helpers)
            result["helpers_pss_mb"] = round(tree_memory(helpers)["pss"], 1)
            # Everything the SUT runs (main + helpers + jobs): sharing (forkserver,
            # copy-on-write) and per-system overhead both show up here.
            result["total_pss_mb"] = round(
                result["main_pss_mb"] + result["helpers_pss_mb"] + result["jobs_pss_total_mb"], 1
            )
            result["breakdown"] = await asyncio.to_thread(job_breakdown, list(pids.values()))
            self.say(
                f"memory @{count}: {len(per_job)} jobs, per job PSS {result['job_pss_mb']} MB "
                f"USS {result['job_uss_mb']} MB; main RSS {result['main_rss_mb']} MB, "
                f"CPU {result['main_cpu_percent']}%; all in after {result['all_in_s']}s"
            )
            return result
        finally:
            await self.cleanup(rooms)

    # -- media ----------------------------------------------------------------------------

    async def media_at(self, count: int) -> dict[str, Any]:
        s = self.settings
        await self.ready_for_next()
        rooms = [self.room(f"media{count}", i) for i in range(count)]
        observers = media.ToneObservers(
            self.lk.server, rooms, self.sut.workdir, frame_ms=s.tone_frame_ms
        )
        result: dict[str, Any] = {"jobs": count}
        try:
            await asyncio.gather(*(self.lk.create_room(r) for r in rooms))
            # Observers and meters join a quiet machine; then the tones start.
            await observers.start(timeout=60 + 4 * count)
            result["observer_processes"] = len(observers.procs)
            sent = await self.dispatch_rooms(rooms)
            arrived = await self.wait_agents(sent, timeout=60 + 2 * count)
            result["agents_in"] = len(arrived)
            if len(arrived) < count:
                self.say(f"media @{count}: only {len(arrived)} agents came in")
            await observers.play()
            deadline = time.monotonic() + 30 + count
            while (metering := await observers.metering()) < len(arrived):
                if time.monotonic() > deadline:
                    self.note(f"media @{count}: {metering} of {len(arrived)} meters reporting")
                    break
                self.sut.check_alive()
                await asyncio.sleep(0.5)
            result["metering"] = metering
            await asyncio.sleep(MEDIA_WARM_IN)
            pids = await self.sut.job_pids(rooms)
            job_trees = {room: _tree(pid) for room, pid in pids.items()}
            job_procs = [p for tree in job_trees.values() for p in tree]
            job_pids = {p.pid for p in job_procs}
            main = psutil.Process(self.sut.main_pid)
            helpers = [p for p in descendants(self.sut.main_pid) if p.pid not in job_pids]
            watchers = [p for pid in observers.pids for p in _tree(pid)]
            _prime_cpu([main, *job_procs, *helpers, *watchers])
            psutil.cpu_percent(None)
            start = time.time()
            await asyncio.sleep(s.hold)
            end = time.time()
            machine = psutil.cpu_percent(None)
            result["hold_s"] = round(end - start, 2)
            result["jobs_cpu_percent"] = round(_cpu(job_procs), 2)
            result["main_cpu_percent"] = round(_cpu([main]), 2)
            result["helpers_cpu_percent"] = round(_cpu(helpers), 2)
            result["observers_cpu_percent"] = round(_cpu(watchers), 2)
            result["machine_cpu_percent"] = round(machine, 1)  # of all cores
            per_job = [m for m in (tree_memory(t) for t in job_trees.values()) if m["rss"] > 0]
            result["jobs_sampled"] = len(per_job)
            result["job_cpu_percent"] = (
                round(result["jobs_cpu_percent"] / len(per_job), 2) if per_job else None
            )
            for key in ("pss", "uss", "rss"):
                values = [m[key] for m in per_job]
                result[f"job_{key}_mb"] = round(statistics.fmean(values), 1) if values else None
            main_mem = tree_memory([main])
            result["main_rss_mb"] = round(main_mem["rss"], 1)
            result["main_pss_mb"] = round(main_mem["pss"], 1)
            reports = await observers.reports()
            result.update(media.summarise(rooms, reports, start, end))
            self.say(
                f"media @{count}: {result['jobs_sampled']} jobs, CPU per job "
                f"{result['job_cpu_percent']}% (main {result['main_cpu_percent']}%, "
                f"observers {result['observers_cpu_percent']}%, machine "
                f"{result['machine_cpu_percent']}%), PSS per job {result['job_pss_mb']} MB; "
                f"{result['jobs_behind']} behind (slowest {result['min_report_rate']} "
                f"reports/s, longest gap {result['max_report_gap_s']}s, least audio "
                f"{result['min_audio_ratio']}x the audio sent; observers sent at least "
                f"{result['min_sent_ratio']}x real time)"
            )
            if result["behind"]:
                room, why = next(iter(result["behind"].items()))
                self.note(f"media @{count}: {result['jobs_behind']} behind, e.g. {room}: {why}")
            return result
        finally:
            await observers.close()
            await self.cleanup(rooms)

    # -- all ------------------------------------------------------------------------------

    async def run(self, result: dict[str, Any]) -> None:
        """Run every phase, putting each result into ``result`` as soon as it is done."""
        s = self.settings
        if self.sut.workload == "recovery":
            # Kills only: the idle, memory and ramp phases are the other workloads' (the
            # agent is the join workload's).
            result["recovery"] = await recovery.kills(self, s.dispatches, s.recovery_wait)
            return
        result["idle"] = await self.idle_baseline()
        self.say(
            f"idle: main RSS {result['idle']['main_rss_mb']} MB, "
            f"{result['idle']['helper_processes']} helper processes"
        )
        if s.dispatches > 0:
            result["latency"] = await self.latency()
        else:
            await self.warm_up()  # the first dispatch in a while pays the server's agent check
        phase = self.media_at if self.sut.workload == "media" else self.memory_at
        key = "media" if self.sut.workload == "media" else "memory"
        result[key] = []
        for count in s.concurrency:
            result[key].append(await phase(count))
        if s.max_jobs_cap > 0:
            media_ramp = self.sut.workload == "media"
            ramp = limit.media_rooms if media_ramp else limit.max_jobs
            part = result["media_rooms" if media_ramp else "max_jobs"] = await ramp(self)
            self.say(
                f"{'media rooms' if media_ramp else 'max jobs'} held: {part['held']} "
                f"({limit.verdict_text(part)}: {part['stop_reason']})"
            )
            self.sut.check_alive()  # a host that died: the run failed, its ramp is kept


async def run_sut(sut: Sut, lk: LiveKit, settings: Settings) -> dict[str, Any]:
    """Start the SUT, run every phase, and always stop it and delete its rooms."""
    info: dict[str, Any] = {"system": sut.system, "variant": sut.variant, "idle": sut.idle}
    bench = Bench(sut, lk, settings)
    try:
        bench.say("starting")
        await sut.start()
        await bench.run(info)  # a phase that fails keeps those before it in ``info``
        info["ok"] = True
    except Exception as exc:  # one failed system must not stop the others
        info["ok"] = False
        info["error"] = f"{type(exc).__name__}: {exc}"
        bench.say(f"failed: {info['error']}")
        if not isinstance(exc, SutError):
            traceback.print_exc()
    finally:
        await lk.delete_all()
        await sut.stop()
    info["notes"] = sut.notes
    return info
