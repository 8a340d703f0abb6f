"""The bench's ramps (issue 20): jobs, or media rooms, added step by step on top of those
held, until the host stops holding new calls or a safety bound ends the ramp.

**max concurrent jobs** (every workload but ``media``; ``--max-jobs-cap`` N > 0): each step
dispatches ``--ramp-step`` new rooms and keeps every earlier one. The host has reached its
limit at the first step where

- ``agent_not_in``: an agent of the step is not listed in its room (RoomService
  ListParticipants, the server's own join time) within ``--visible-timeout`` s of its
  dispatch, or
- ``dropped``: a job of an earlier step ended: its agent participant is no longer listed
  in its room, or its job is no longer among the host's running jobs (lkrun: ``jobs ls``,
  status starting/running/stopping; official: the job's process, whose pid its
  entrypoint wrote, is gone: a livekit-agents job process runs one job), or
- ``job_failed``: the host reports a failed job (lkrun: status ``failed``; official: an
  ERROR line of its log naming the room), or
- ``host_unresponsive`` / ``host_exited``: the host stopped answering, or died.

The limit is the number held before that step. Safety bounds end a ramp without a limit:
``cap`` (``--max-jobs-cap``: with ``--ramp-to-limit`` a ceiling, ``JOBS_CEILING`` unless
given), ``memory`` (the next step would leave less than ``MEMORY_RESERVE`` of the machine's
memory available, by the memory the steps so far took per job) and ``time``
(``--ramp-timeout`` s per host, ``LIMIT_RAMP_TIMEOUT`` with ``--ramp-to-limit``).

**media rooms held with no job behind** (``media`` with ``--ramp-to-limit``): each step
adds ``--ramp-step`` rooms, each with a tone observer (one ``tests/bench/tones.py`` process
per step, 100 ms frames) and a meter job, plays their tones, and holds ``--hold`` s over
every room held; the limit is reached at the first step where ``behind``: a meter fell
behind over the hold (``tests/bench/media.verdict``: its reports, their gaps, the audio it
metered against the audio its observer sent), or ``observers_slow``: an observer handed
its source less than ``MIN_SENT_RATIO`` of real time (the load itself could not keep up:
the machine is full), or ``observers_failed`` (the step's observers could not join and
publish), or ``not_metering``, or as above (an agent not in, a dropped job).

Every step records the host's CPU (its main process and every descendant, % of one core)
and the machine's, the host's PSS and threads summed over its processes, and the
machine's available memory, also at the step that stopped the ramp (``at_stop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import psutil
from livekit.api.twirp_client import ServerError

from tests.bench import media
from tests.bench.procs import descendants
from tests.bench.suts import SutError

if TYPE_CHECKING:
    from tests.bench.measure import Bench

MB = 1024 * 1024
JOBS_CEILING = 1000  # --ramp-to-limit's ceiling on jobs unless --max-jobs-cap says
ROOMS_CEILING = 200  # ... and on media rooms
LIMIT_RAMP_TIMEOUT = 480.0  # --ramp-to-limit's time bound per host unless --ramp-timeout says
MEMORY_RESERVE = 0.10  # of the machine's memory, left available after the next step
MEMORY_MARGIN = 1.25  # the next step's jobs are reckoned this much bigger than the last
SNAPSHOT_WINDOW = 1.0  # s over which a step's CPU is read (jobs ramp)
# A ramp step waits at most this long for the machine's CPU to settle (measure.settle):
# near a host's limit its held calls keep the CPU busy and waiting longer only spends the
# time bound; a few seconds still let the last step's joins finish.
STEP_SETTLE_TIMEOUT = 6.0
MIN_SENT_RATIO = 0.9  # an observer sending less than this of real time: the machine is full
METERING_TIMEOUT = 30.0
MEDIA_WARM_IN = 3.0  # as measure.MEDIA_WARM_IN: every meter reports, then this, then hold
# Why a ramp stopped: those that are the host's limit, and the safety bounds.
LIMITS = {
    "agent_not_in": "an agent not in within the timeout",
    "dropped": "a held job dropped",
    "job_failed": "a job failed",
    "behind": "a meter fell behind",
    "observers_slow": "the tone observers fell below real time",
    "observers_failed": "the tone observers could not join",
    "not_metering": "a meter did not report the tone",
    "host_unresponsive": "the host stopped answering",
    "host_exited": "the host exited",
    "server_refused": "livekit-server refused the next call (its node out of CPU)",
}
BOUNDS = {
    "cap": "the ceiling",
    "memory": "the memory ceiling",
    "time": "the time bound",
}


# -- pure parts (tests/test_bench_limit.py) ---------------------------------------------------


def dropped(held: list[str], listed: set[str], running: set[str]) -> dict[str, str]:
    """room -> why, for each held room whose agent is no longer listed or whose job no
    longer runs."""
    out: dict[str, str] = {}
    for room in held:
        why = [
            *(["agent participant gone"] if room not in listed else []),
            *(["job not running"] if room not in running else []),
        ]
        if why:
            out[room] = " and ".join(why)
    return out


def memory_bound(
    *, available: float, start_available: float, total: float, held: int, step: int
) -> str | None:
    """Why the next step of ``step`` jobs must not be taken for memory, or None.

    A job's cost is what the machine's available memory fell by per held job since the
    ramp began (host, server and all); the step is refused if ``MEMORY_MARGIN`` times that
    for the new jobs would leave less than ``MEMORY_RESERVE`` of the machine available."""
    if held <= 0:
        return None
    per_job = max(0.0, start_available - available) / held
    need = per_job * step * MEMORY_MARGIN
    reserve = total * MEMORY_RESERVE
    if available - need >= reserve:
        return None
    return (
        f"{step} more jobs at {per_job / MB:.1f} MB each (the machine's memory used per job "
        f"so far) would leave less than {reserve / MB:,.0f} MB available "
        f"({available / MB:,.0f} MB now)"
    )


def bound(
    *,
    held: int,
    ceiling: int,
    now: float,
    deadline: float,
    timeout: float,
    memory: str | None,
) -> tuple[str, str] | None:
    """(kind, why) of a safety bound that ends the ramp before the next step, or None."""
    if held >= ceiling:
        return "cap", f"the ceiling of {ceiling} reached"
    if now > deadline:
        return "time", f"the time bound of {timeout:g} s reached with {held} held"
    if memory:
        return "memory", memory
    return None


def summary(
    held: int,
    ceiling: int,
    steps: list[dict[str, Any]],
    stop: tuple[str, str],
    unit: str = "jobs",
) -> dict[str, Any]:
    """The ramp's result: what it held, whether that is the host's limit, and what stopped
    it, with the host's figures at that step."""
    kind, why = stop
    found = kind in LIMITS
    last = steps[-1] if steps else {}
    stopping_step = last if found and last else None
    return {
        "held": held,
        "cap": ceiling,
        "limit_found": found,
        "stopped_by": kind,
        "stopped_by_text": LIMITS.get(kind) or BOUNDS.get(kind, kind),
        "stop_reason": why,
        "stop_step": (stopping_step or {}).get("target"),
        "at_stop": (last.get("host") if last else None),
        "unit": unit,
        "steps": steps,
    }


def verdict_text(result: dict[str, Any] | None) -> str:
    """One cell: "the real limit: <what>, at <step>" or "capped: <bound>"."""
    if not result:
        return "-"
    if "limit_found" not in result:  # a run from before issue 20's ramp
        reason = str(result.get("stop_reason", ""))
        return "capped" if reason == "cap reached" else reason[:80]
    if result["limit_found"]:
        at = result.get("stop_step")
        return f"the real limit: {result['stopped_by_text']}" + (f" at {at}" if at else "")
    return f"capped: {result['stopped_by_text']}"


# -- measuring ---------------------------------------------------------------------------------


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return [psutil.Process(pid), *descendants(pid)]
    except psutil.Error:
        return []


def prime_cpu(procs: list[psutil.Process]) -> None:
    """Start psutil's CPU interval of each process (the bench's measure uses these too)."""
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)


def cpu_percent(procs: list[psutil.Process]) -> float:
    """The processes' CPU since their last read (% of one core), gone ones counting 0."""
    total = 0.0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.cpu_percent(None)
    return total


def _cpu(procs: list[psutil.Process]) -> float:
    return round(cpu_percent(procs), 1)


def memory_snapshot(procs: list[psutil.Process]) -> dict[str, Any]:
    """The host's processes summed (PSS from smaps_rollup, threads) and the machine's
    memory."""
    pss = rss = 0.0
    threads = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            pss += getattr(info, "pss", 0) / MB
            rss += info.rss / MB
            threads += proc.num_threads()
    vm = psutil.virtual_memory()
    return {
        "host_processes": len(procs),
        "host_pss_mb": round(pss, 1),
        "host_rss_mb": round(rss, 1),
        "host_threads": threads,
        "machine_available_mb": round(vm.available / MB),
        "machine_used_percent": round(100 * (vm.total - vm.available) / vm.total, 1),
    }


async def host_snapshot(main_pid: int, window: float = SNAPSHOT_WINDOW) -> dict[str, Any]:
    """CPU of the host (main process and all its descendants; 100 % is one core) and of
    the machine (% of all cores) over ``window`` s, then memory_snapshot."""
    procs = _tree(main_pid)
    prime_cpu(procs)
    psutil.cpu_percent(None)
    await asyncio.sleep(window)
    cpu = {
        "host_cpu_percent": _cpu(procs),
        "machine_cpu_percent": round(psutil.cpu_percent(None), 1),
    }
    return {**cpu, **await asyncio.to_thread(memory_snapshot, procs)}


async def _running(bench: Bench, rooms: list[str]) -> set[str]:
    return set(await bench.sut.job_pids(rooms))


async def _listed(bench: Bench, rooms: list[str]) -> set[str]:
    inside = await asyncio.gather(*(bench.lk.agent_in(r) for r in rooms))
    return {r for r, yes in zip(rooms, inside, strict=True) if yes}


async def _drops(bench: Bench, held: list[str]) -> dict[str, str]:
    if not held:
        return {}
    listed = await _listed(bench, held)
    running = await _running(bench, held)
    return dropped(held, listed, running)


def server_full(exc: ServerError, held: int) -> tuple[str, str]:
    """livekit-server refused the next room or dispatch: on this one machine that is its node
    out of CPU ("could not find any available nodes"), which the host's own load caused, so it
    is where this host stops holding new calls, as an observer starved of CPU is (media)."""
    return "server_refused", f"with {held} held livekit-server refused the next call: {exc}"[:400]


def _host_stop(bench: Bench, exc: SutError, held: int) -> tuple[str, str]:
    alive = bench.sut.proc is not None and bench.sut.proc.alive()
    if not alive:
        return "host_exited", f"with {held} held the host exited: {str(exc)[:300]}"
    return "host_unresponsive", f"with {held} held the host did not answer: {str(exc)[:300]}"


class Ramp:
    """The bounds of one ramp: ceiling, time and memory."""

    def __init__(self, bench: Bench, ceiling: int) -> None:
        self.bench = bench
        self.ceiling = ceiling
        self.timeout = bench.settings.ramp_timeout
        self.deadline = time.monotonic() + self.timeout
        vm = psutil.virtual_memory()
        self.total, self.start_available = float(vm.total), float(vm.available)

    def next_size(self, held: int) -> int:
        return min(self.bench.settings.ramp_step, max(0, self.ceiling - held))

    def bound(self, held: int) -> tuple[str, str] | None:
        memory = memory_bound(
            available=float(psutil.virtual_memory().available),
            start_available=self.start_available,
            total=self.total,
            held=held,
            step=self.next_size(held),
        )
        return bound(
            held=held,
            ceiling=self.ceiling,
            now=time.monotonic(),
            deadline=self.deadline,
            timeout=self.timeout,
            memory=memory,
        )


# -- max concurrent jobs -----------------------------------------------------------------------


async def max_jobs(bench: Bench) -> dict[str, Any]:
    """Add ``--ramp-step`` rooms at a time, all held, until the host stops holding new
    calls or a bound ends the ramp (see the module docstring)."""
    s = bench.settings
    await bench.ready_for_next()
    ramp = Ramp(bench, s.max_jobs_cap)
    held: list[str] = []
    steps: list[dict[str, Any]] = []
    try:
        while not (stop := ramp.bound(len(held))):
            new = [bench.room("max", len(held) + i) for i in range(ramp.next_size(len(held)))]
            step, stop = await _jobs_step(bench, held, new)
            steps.append(step)
            if stop:
                break
            held += new
            bench.say(
                f"max jobs: {len(held)} held (slowest agent {step['slowest_s']}s; host CPU "
                f"{step['host']['host_cpu_percent']}%, PSS {step['host']['host_pss_mb']} MB)"
            )
    except SutError as exc:
        stop = _host_stop(bench, exc, len(held))
    except ServerError as exc:
        stop = server_full(exc, len(held))
    try:
        return summary(len(held), s.max_jobs_cap, steps, stop)
    finally:
        rooms = list(dict.fromkeys([*held, *(r for r in bench.lk.rooms if "-max-" in r)]))
        with contextlib.suppress(SutError):
            await bench.cleanup(rooms, timeout=180)


async def _jobs_step(
    bench: Bench, held: list[str], new: list[str]
) -> tuple[dict[str, Any], tuple[str, str] | None]:
    """Dispatch ``new`` on top of ``held``: the step's numbers, and why to stop (if so)."""
    s = bench.settings
    cpu = await bench.settle(timeout=STEP_SETTLE_TIMEOUT)
    started = time.monotonic()
    sent = await bench.dispatch_rooms(new)
    arrived = await bench.wait_agents(sent, timeout=s.visible_timeout)
    target = len(held) + len(new)
    step: dict[str, Any] = {
        "target": target,
        "arrived": len(arrived),
        "step_s": round(time.monotonic() - started, 2),
        "slowest_s": round(max(arrived.values()), 2) if arrived else None,
        "cpu_before_percent": round(cpu, 1),
    }
    gone = await _drops(bench, held)
    failed = await bench.sut.failed_jobs(held + new)
    step["dropped"] = len(gone)
    step["failed"] = len(failed)
    step["host"] = await host_snapshot(bench.sut.main_pid)
    missing = [r for r in new if r not in arrived]
    if missing:
        return step, (
            "agent_not_in",
            f"{len(missing)} of {len(new)} agents not in within {s.visible_timeout:g}s at "
            f"{target} jobs ({bench.sut.why_missing(missing)})",
        )
    if gone:
        room, why = next(iter(gone.items()))
        why = f"at {target} jobs {len(gone)} held jobs dropped, e.g. {room}: {why}"
        return step, ("dropped", why)
    if failed:
        return step, ("job_failed", f"at {target} jobs {len(failed)} failed: {failed[0][:200]}")
    return step, None


# -- media rooms -------------------------------------------------------------------------------


async def media_rooms(bench: Bench) -> dict[str, Any]:
    """Add ``--ramp-step`` rooms at a time (tone observer + meter job each), all held and
    playing, until a meter falls behind over the hold or a bound ends the ramp."""
    s = bench.settings
    await bench.ready_for_next()
    ramp = Ramp(bench, s.max_jobs_cap)
    held: list[str] = []
    steps: list[dict[str, Any]] = []
    groups: list[media.ToneObservers] = []
    try:
        while not (stop := ramp.bound(len(held))):
            size = ramp.next_size(len(held))
            new = [bench.room("rooms", len(held) + i) for i in range(size)]
            step, stop = await _media_step(bench, held, new, groups)
            steps.append(step)
            if stop:
                break
            held += new
            bench.say(
                f"media rooms: {len(held)} held, none behind (least audio "
                f"{step['min_audio_ratio']}x sent; jobs CPU {step['jobs_cpu_percent']}%, "
                f"observers {step['observers_cpu_percent']}%, machine "
                f"{step['machine_cpu_percent']}%)"
            )
    except SutError as exc:
        stop = _host_stop(bench, exc, len(held))
    except ServerError as exc:
        stop = server_full(exc, len(held))
    except media.ObserverError as exc:
        stop = "observers_failed", f"with {len(held)} held the tone observers failed: {exc}"
    try:
        return summary(len(held), s.max_jobs_cap, steps, stop, unit="rooms")
    finally:
        for group in groups:
            await group.close()
        rooms = list(dict.fromkeys([*held, *(r for r in bench.lk.rooms if "-rooms-" in r)]))
        with contextlib.suppress(SutError):
            await bench.cleanup(rooms, timeout=180)


async def _media_step(
    bench: Bench, held: list[str], new: list[str], groups: list[media.ToneObservers]
) -> tuple[dict[str, Any], tuple[str, str] | None]:
    s = bench.settings
    await bench.settle(timeout=STEP_SETTLE_TIMEOUT)
    target = len(held) + len(new)
    step: dict[str, Any] = {"target": target}
    started = time.monotonic()
    await asyncio.gather(*(bench.lk.create_room(r) for r in new))
    group = media.ToneObservers(
        bench.lk.server, new, bench.sut.workdir, frame_ms=s.tone_frame_ms, tag=f"r{len(groups)}-"
    )
    groups.append(group)
    await group.start(timeout=60 + 4 * len(new))
    sent = await bench.dispatch_rooms(new)
    arrived = await bench.wait_agents(sent, timeout=s.visible_timeout)
    step["arrived"] = len(arrived)
    missing = [r for r in new if r not in arrived]
    if missing:
        step["host"] = await host_snapshot(bench.sut.main_pid)
        why = bench.sut.why_missing(missing)
        return step, (
            "agent_not_in",
            f"{len(missing)} of {len(new)} meters not in within {s.visible_timeout:g}s at "
            f"{target} rooms ({why})",
        )
    await group.play()
    if not await _metering(group, len(new)):
        step["host"] = await host_snapshot(bench.sut.main_pid)
        return step, ("not_metering", f"at {target} rooms a new meter did not report the tone")
    step["step_s"] = round(time.monotonic() - started, 2)
    await asyncio.sleep(MEDIA_WARM_IN)
    step.update(await _media_window(bench, [*held, *new], groups))
    return step, await _media_stop(bench, held, step)


async def _metering(group: media.ToneObservers, count: int) -> bool:
    deadline = time.monotonic() + METERING_TIMEOUT
    while await group.metering() < count:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.5)
    return True


async def _media_window(
    bench: Bench, rooms: list[str], groups: list[media.ToneObservers]
) -> dict[str, Any]:
    """Hold ``--hold`` s over every room: CPU of the jobs, the host's main process and
    helpers, the observers and the machine; then every meter's verdict over the window."""
    sut = bench.sut
    pids = await sut.job_pids(rooms)
    jobs = [p for pid in pids.values() for p in _tree(pid)]
    job_pids = {p.pid for p in jobs}
    main = _tree(sut.main_pid)[:1]
    helpers = [p for p in descendants(sut.main_pid) if p.pid not in job_pids]
    watchers = [p for g in groups for pid in g.pids for p in _tree(pid)]
    prime_cpu([*main, *jobs, *helpers, *watchers])
    psutil.cpu_percent(None)
    start = time.time()
    await asyncio.sleep(bench.settings.hold)
    end = time.time()
    jobs_cpu = _cpu(jobs)  # read once: each read restarts psutil's interval
    out: dict[str, Any] = {
        "hold_s": round(end - start, 2),
        "jobs_cpu_percent": jobs_cpu,
        "job_cpu_percent": round(jobs_cpu / len(pids), 2) if pids else None,
        "main_cpu_percent": _cpu(main),
        "helpers_cpu_percent": _cpu(helpers),
        "observers_cpu_percent": _cpu(watchers),
        "observer_processes": len([g for g in groups if g.pids]),
        "machine_cpu_percent": round(psutil.cpu_percent(None), 1),
    }
    reports: dict[str, dict[str, Any]] = {}
    for group in groups:
        reports.update(await group.collect())
    out.update(media.summarise(rooms, reports, start, end))
    snapshot = await asyncio.to_thread(memory_snapshot, _tree(sut.main_pid))
    out["host"] = {
        "host_cpu_percent": round(
            jobs_cpu + out["main_cpu_percent"] + out["helpers_cpu_percent"], 1
        ),
        "machine_cpu_percent": out["machine_cpu_percent"],
        "observers_cpu_percent": out["observers_cpu_percent"],
        **snapshot,
    }
    return out


async def _media_stop(
    bench: Bench, held: list[str], step: dict[str, Any]
) -> tuple[str, str] | None:
    target = step["target"]
    gone = await _drops(bench, held)
    step["dropped"] = len(gone)
    if gone:
        room, why = next(iter(gone.items()))
        return "dropped", f"at {target} rooms {len(gone)} held jobs dropped, e.g. {room}: {why}"
    if step["jobs_behind"]:
        room, why = next(iter(step["behind"].items()))
        behind = step["jobs_behind"]
        return "behind", f"at {target} rooms {behind} meters behind, e.g. {room}: {why}"
    slow = step.get("min_sent_ratio")
    if slow is not None and slow < MIN_SENT_RATIO:
        return "observers_slow", (
            f"at {target} rooms an observer sent {slow:.2f}x real time (the machine is full)"
        )
    return None
