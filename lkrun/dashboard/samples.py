"""The dashboard's charts without Prometheus: a small ring of per-agent samples in memory.

Every ``interval`` seconds the daemon's status is sampled (each agent's running jobs, load,
FULL or not, and the machine's CPU); the ring keeps ``span`` seconds of them (an hour of
10 s samples: 360 entries, a few tens of kB for a handful of agents) and forgets the rest.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("lkrun.dashboard")

INTERVAL = 10.0
SPAN = 3600.0
# A failing sample: its error logged the first time, then at these counts, then every
# REPEAT_LOG_EVERY-th time (an hour of 10 s samples); at most MAX_ERRORS_KEPT texts kept.
REPEAT_LOG_AT = (10, 100)
REPEAT_LOG_EVERY = 360
MAX_ERRORS_KEPT = 50


@dataclass(frozen=True)
class AgentSample:
    jobs: int
    max_jobs: int
    load: float
    full: bool


@dataclass(frozen=True)
class Sample:
    at: float
    cpu: float
    agents: Mapping[str, AgentSample]


def sample_of(status: Mapping[str, Any], now: float) -> Sample:
    """One sample from a DaemonStatus (lkrun.api.control): one entry per agent name, a
    retiring registration's jobs added to its agent's."""
    agents: dict[str, AgentSample] = {}
    for agent in status["agents"]:
        name, this = agent["agent"], agent_sample(agent)
        found = agents.get(name)
        if found is not None:
            base = found if agent["retiring"] else this  # the current one's settings
            this = AgentSample(found.jobs + this.jobs, base.max_jobs, base.load, base.full)
        agents[name] = this
    return Sample(at=now, cpu=float(status["cpu"]), agents=agents)


def agent_sample(agent: Mapping[str, Any]) -> AgentSample:
    return AgentSample(
        jobs=int(agent["jobs"]),
        max_jobs=int(agent["max_jobs"]),
        load=float(agent["load"]),
        full=bool(agent["full"]),
    )


class Samples:
    """The ring: appending past ``span`` drops the oldest samples."""

    def __init__(self, *, interval: float = INTERVAL, span: float = SPAN) -> None:
        if interval <= 0 or span < interval:
            raise ValueError("need 0 < interval <= span")
        self.interval = interval
        self.span = span
        self._ring: deque[Sample] = deque(maxlen=int(span // interval) + 1)

    def __len__(self) -> int:
        return len(self._ring)

    def add(self, sample: Sample) -> None:
        self._ring.append(sample)

    def since(self, cutoff: float) -> list[Sample]:
        return [s for s in self._ring if s.at >= cutoff]

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """What GET /api/v1/charts sends: one series per agent (jobs, load, full), aligned
        with ``at``; an agent absent from a sample has null there."""
        now = time.time() if now is None else now
        kept = self.since(now - self.span)
        names = sorted({name for s in kept for name in s.agents})
        series: dict[str, dict[str, list[Any]]] = {
            name: {"jobs": [], "load": [], "full": [], "max_jobs": []} for name in names
        }
        for s in kept:
            for name in names:
                found = s.agents.get(name)
                row = series[name]
                row["jobs"].append(found.jobs if found else None)
                row["load"].append(round(found.load, 3) if found else None)
                row["full"].append(found.full if found else None)
                row["max_jobs"].append(found.max_jobs if found else None)
        return {
            "interval": self.interval,
            "span": self.span,
            "at": [round(s.at, 3) for s in kept],
            "cpu": [round(s.cpu, 3) for s in kept],
            "agents": series,
        }

    async def run(
        self,
        status: Callable[[], Mapping[str, Any]],
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Sample now, then every ``interval``, until cancelled. A sample that fails (a bug
        in reading the status) is skipped, not the end of the charts: logged with its
        traceback the first time that error is seen, counted after that."""
        seen: dict[str, int] = {}
        while True:
            try:
                self.add(sample_of(status(), clock()))
            except Exception as exc:
                key = f"{type(exc).__name__}: {exc}"
                seen[key] = seen.get(key, 0) + 1
                if seen[key] == 1:
                    log.exception("dashboard sample skipped: %s", key)
                elif seen[key] in REPEAT_LOG_AT or seen[key] % REPEAT_LOG_EVERY == 0:
                    log.warning("dashboard sample skipped (%d times so far): %s", seen[key], key)
                if len(seen) > MAX_ERRORS_KEPT:  # distinct texts (ids in them): keep it small
                    seen.pop(next(iter(seen)))
            await sleep(self.interval)


# Offer -> running latency, in ms: the bucket edges of the histogram the charts draw.
LATENCY_EDGES_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)


def latency_histogram(values_ms: Iterable[float]) -> dict[str, Any]:
    """Counts per bucket (``le`` edges, then one for what is over the last edge), with the
    p50, p95 and max of the values."""
    values = sorted(values_ms)
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    for value in values:
        index = next((i for i, edge in enumerate(LATENCY_EDGES_MS) if value <= edge), None)
        counts[len(LATENCY_EDGES_MS) if index is None else index] += 1
    return {
        "edges_ms": list(LATENCY_EDGES_MS),
        "counts": counts,
        "samples": len(values),
        "p50_ms": _quantile(values, 0.5),
        "p95_ms": _quantile(values, 0.95),
        "max_ms": values[-1] if values else None,
    }


def _quantile(ordered: list[float], q: float) -> float | None:
    """Nearest rank."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]
