"""The load each agent reports to LiveKit, and the CPU use it is computed from."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger("lkrun.load")

# The server gives no jobs to a node whose workers all report at least this load.
TARGET_LOAD = 0.7
# Highest load reported while still available, so the server keeps sending jobs.
MAX_AVAILABLE_LOAD = round(TARGET_LOAD - 0.01, 2)
# livekit-server sends each job to the node with the highest affinity, the sum of
# (TARGET_LOAD - load) over its AVAILABLE workers (pkg/service/agentservice.go,
# JobRequestAffinity), the first node to answer winning a tie; psrpc computes a node's
# affinity as the request reaches it and picks the node 200 ms after the first answer.
# So the requests of a burst weighed before its first offers were answered all go to the
# lower load (a tie is split request by request, by which node answers first), and only
# those weighed later can see the jobs accepted meanwhile: the jobs count from their
# acceptance, so that a small CPU difference between two hosts is made up within the
# burst. (Steps of a quarter of load_threshold for the CPU were tried, to make ties: two
# hosts on either side of a step then differed by 25 jobs' worth, and bursts went 7/33
# and 32/8; benchmarks/issue20-burst.) The CPU counts at most CPU_MAX of the way, so a CPU
# at or over load_threshold does not hide the jobs (it used to cap every load at 0.69);
# overload_after, not the load, is what makes a busy host FULL.
CPU_MAX = 0.75


@dataclass(frozen=True)
class WorkerLoad:
    full: bool
    load: float  # what we send in UpdateWorkerStatus.load
    job_count: int
    reason: str = ""  # why full: "draining", "starting", "max_jobs" or "cpu"

    def differs(self, other: WorkerLoad | None) -> bool:
        """Worth telling the server: another status or job count, or a load that moved by
        LOAD_STEP (CPU jitter alone must not turn every sample into an update)."""
        return (
            other is None
            or (self.full, self.job_count, self.reason)
            != (other.full, other.job_count, other.reason)
            or abs(self.load - other.load) >= LOAD_STEP
        )


LOAD_STEP = 0.05


def agent_load(
    *,
    jobs: int,
    max_jobs: int,
    draining: bool,
    cpu: float = 0.0,
    load_threshold: float = math.inf,
    cpu_overloaded: bool = False,
    starting: bool = False,
) -> WorkerLoad:
    """What one agent tells LiveKit: full, or a load below TARGET_LOAD scaled by utilisation
    (its share of max_jobs, reserved jobs included, and the CPU's share of load_threshold,
    at most CPU_MAX, combined).

    ``cpu`` (smoothed) only raises the load, which steers new jobs to less busy workers;
    the CPU makes the agent full only when ``cpu_overloaded`` says it stayed high (see
    CpuPressure), since a worker that reports full gets no job at all, and LiveKit drops a
    dispatch that finds no available worker. While ``starting`` (its code is still loading,
    or what answers its offers is not up) it is full too: a job would wait, or be declined.
    """
    reason = (
        "draining"
        if draining
        else "starting"
        if starting
        else "max_jobs"
        if jobs >= max_jobs
        else "cpu"
        if cpu_overloaded
        else ""
    )
    if reason:
        return WorkerLoad(full=True, load=1.0, job_count=jobs, reason=reason)
    # Jobs and CPU both count, always: with max() a busy CPU hid the job count, so daemons
    # on hosts equally busy (or on one host) reported the same load whatever they ran, and
    # LiveKit could not spread jobs by it.
    utilisation = 1 - (1 - _clamp(jobs / max_jobs)) * (1 - cpu_part(cpu / load_threshold))
    # Rounded to 0.01: two hosts a CPU sample apart then often report the same load, and
    # a tie is the only thing that splits the first requests of a burst (see CPU_MAX);
    # a job still moves it (0.007 at max_jobs 100: every job or two).
    load = min(round(TARGET_LOAD * utilisation, 2), MAX_AVAILABLE_LOAD)
    return WorkerLoad(full=False, load=load, job_count=jobs)


def cpu_part(share: float) -> float:
    """The CPU's share of load_threshold as the load counts it: at most CPU_MAX."""
    return min(_clamp(share), CPU_MAX)


class CpuPressure:
    """CPU samples as the load policy uses them: a level smoothed over ``window`` seconds,
    and whether the CPU has stayed at or over ``threshold`` for ``overload_after`` seconds.

    A peak of a few seconds (jobs ending, a burst of connects, a fork server importing)
    is common on small machines and must not make the only worker unavailable.
    """

    def __init__(
        self,
        *,
        threshold: float = 0.75,
        overload_after: float = 30.0,
        window: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold  # inf: the CPU never counts as overloaded
        self.overload_after = overload_after  # inf: never
        self.window = window
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()
        self._high_since: float | None = None  # start of the current run of high samples

    def observe(self, value: float) -> None:
        now = self._clock()
        self._samples.append((now, value))
        while self._samples and now - self._samples[0][0] > self.window:
            self._samples.popleft()
        if value < self.threshold:
            self._high_since = None
        elif self._high_since is None:
            self._high_since = now

    @property
    def last(self) -> float:
        return self._samples[-1][1] if self._samples else 0.0

    @property
    def level(self) -> float:
        """Mean of the samples in the window (0 before the first)."""
        if not self._samples:
            return 0.0
        return sum(v for _, v in self._samples) / len(self._samples)

    def high_for(self) -> float:
        """Seconds the CPU has been at or over the threshold without a break (0: it is not)."""
        return 0.0 if self._high_since is None else self._clock() - self._high_since

    @property
    def overloaded(self) -> bool:
        return self._high_since is not None and self.high_for() >= self.overload_after

    def why(self) -> str:
        return (
            f"CPU at or over load_threshold={self.threshold:.0%} for {self.high_for():.0f}s "
            f"(now {self.last:.0%})"
        )


def _clamp(value: float) -> float:
    return min(max(value, 0.0), 1.0)


@dataclass(frozen=True)
class _Reading:
    # Deltas are only taken between readings of one source (host, or cgroup at one quota).
    source: str
    busy: float  # CPU seconds used (cgroup) or busy host CPU time
    total: float  # wall seconds x capacity (cgroup) or total host CPU time


class CpuMonitor:
    """Machine CPU use in [0, 1], container-aware, sampled in the background."""

    def __init__(
        self,
        interval: float = 1.0,
        *,
        cgroup_root: Path = Path("/sys/fs/cgroup"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self._cgroup_root = cgroup_root
        self._clock = clock
        self._previous: _Reading | None = None
        self._value = 0.0

    @property
    def value(self) -> float:
        return self._value

    def sample(self) -> float:
        """Compare with the previous reading; the first reading only sets the baseline."""
        reading = self._read_cgroup() or self._read_host()
        previous, self._previous = self._previous, reading
        if reading is None or previous is None or previous.source != reading.source:
            return self._value
        elapsed = reading.total - previous.total
        if elapsed <= 0:
            return self._value  # no time passed (or a counter reset): keep the last value
        self._value = _clamp((reading.busy - previous.busy) / elapsed)
        return self._value

    async def run(self, on_sample: Callable[[float], None] | None = None) -> None:
        while True:
            value = self.sample()
            if on_sample is not None:
                on_sample(value)
            await asyncio.sleep(self.interval)

    def _read_cgroup(self) -> _Reading | None:
        """cgroup v2 usage against the CPU quota, or None when there is no quota to honour."""
        try:
            cpus = _cgroup_cpus((self._cgroup_root / "cpu.max").read_text())
            if cpus is None:
                return None
            usage = _cgroup_usage_seconds((self._cgroup_root / "cpu.stat").read_text())
        except (OSError, ValueError):
            return None
        if usage is None:
            return None
        # Scaling wall time by the quota makes busy/total a fraction of what we may use.
        return _Reading(f"cgroup {cpus}", busy=usage, total=self._clock() * cpus)

    def _read_host(self) -> _Reading | None:
        try:
            times = psutil.cpu_times()
        except (OSError, RuntimeError, psutil.Error) as exc:
            log.debug("cannot read host CPU times: %s", exc)
            return None
        total = sum(times)
        # On Linux guest time is already counted in user and nice.
        total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
        idle = times.idle + getattr(times, "iowait", 0.0)
        return _Reading("host", busy=total - idle, total=total)


def _cgroup_cpus(cpu_max: str) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("<quota> <period>"), None for "max"."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    quota, period = float(fields[0]), float(fields[1])
    if quota <= 0 or period <= 0:
        return None
    return quota / period


def _cgroup_usage_seconds(cpu_stat: str) -> float | None:
    for line in cpu_stat.splitlines():
        key, _, number = line.partition(" ")
        if key == "usage_usec":
            return int(number) / 1_000_000
    return None
