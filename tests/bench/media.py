"""The media workload's load and its verdict: tone observer processes, and which meter
fell behind.

``ToneObservers`` runs ``tests/bench/tones.py`` in a few processes (``ROOMS_PER_PROCESS``
rooms each) with the project's python, so that 50 tones are not published by the bench's
own event loop and their CPU is measured apart from either system.

A meter job **fell behind** over the hold window when, as seen by its room's observer:

- it sent fewer than ``MIN_REPORT_RATIO`` (90 %) of the reports due (4 a second), or
- two reports (or the window's start or end and the nearest report) were more than one
  period + ``MAX_LATE`` (0.25 + 0.5 s) apart, or
- the audio it metered (the growth of its reported ``samples`` between the window's first
  and last report, a second) was less than ``MIN_AUDIO_RATIO`` (90 %) of what its
  observer sent (a second, over the window): it is not keeping up with the 48 kHz
  stream, whatever its report timer does.

The observers note how much tone they handed to their sources each second: one starved
of CPU sends less than real time (``min_sent_ratio``), which slows the meters' audio
without them being behind; hence "of what its observer sent".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, BinaryIO

from lkrun.shared import pdeathsig
from tests.bench.suts import REPO, Server

ROOMS_PER_PROCESS = 10
FRAME_MS = 100  # the observers' tone frames (--tone-frame-ms; 10 before issue 20)
REPORT_RATE = 4.0  # the meter's reports per second (METER_RATE's default)
SAMPLE_RATE = 48000
MIN_REPORT_RATIO = 0.9
MAX_LATE = 0.5  # seconds a report may come after it was due
MIN_AUDIO_RATIO = 0.9


class ObserverError(Exception):
    pass


class ToneObservers:
    """Processes publishing a tone in each room and noting the meters' reports."""

    def __init__(
        self,
        server: Server,
        rooms: list[str],
        log_dir: Path,
        *,
        frame_ms: int = FRAME_MS,
        tag: str = "",
    ) -> None:
        self.server = server
        self.frame_ms = frame_ms  # the tone's frames: 100 ms cost the observers least
        self.tag = tag  # in the log files' names: tones-<tag><n>.log
        self.groups = [
            rooms[i : i + ROOMS_PER_PROCESS] for i in range(0, len(rooms), ROOMS_PER_PROCESS)
        ]
        self.log_dir = log_dir
        self.procs: list[asyncio.subprocess.Process] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.returncode is None]

    async def start(self, timeout: float) -> None:
        env = {**os.environ, **self.server.env(), "PYTHONPATH": str(REPO)}
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for index, group in enumerate(self.groups):
            with _log(self.log_dir / f"tones-{self.tag}{index}.log") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "tests.bench.tones",
                    "--frame-ms",
                    str(self.frame_ms),
                    *group,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    env=env,
                    cwd=REPO,
                    limit=2**26,  # the final JSON line
                    preexec_fn=pdeathsig.preexec(signal.SIGKILL),
                )
            self.procs.append(proc)
        try:
            lines = await asyncio.wait_for(
                asyncio.gather(*(self._line(p) for p in self.procs)), timeout
            )
        except asyncio.TimeoutError:
            raise ObserverError(f"tone observers not ready within {timeout:g}s") from None
        bad = [line for line in lines if line != "ready"]
        if bad:
            raise ObserverError(f"tone observer: {bad[0]}")

    async def _line(self, proc: asyncio.subprocess.Process) -> str:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        return line.decode().strip() or f"exited ({await proc.wait()})"

    async def _ask(self, command: str, timeout: float = 30.0) -> list[str]:
        async def one(proc: asyncio.subprocess.Process) -> str:
            assert proc.stdin is not None
            proc.stdin.write(f"{command}\n".encode())
            await proc.stdin.drain()
            return await self._line(proc)

        return list(await asyncio.wait_for(asyncio.gather(*(one(p) for p in self.procs)), timeout))

    async def play(self) -> None:
        """Start the tones in every room."""
        bad = [line for line in await self._ask("play") if line != "playing"]
        if bad:
            raise ObserverError(f"tone observer: {bad[0]}")

    async def metering(self) -> int:
        """Rooms whose meter has reported this observer's samples."""
        return sum(json.loads(line)["metering"] for line in await self._ask("status"))

    async def collect(self) -> dict[str, dict[str, Any]]:
        """The reports noted since the last collect, the observers still playing: room ->
        {"reports": [...], "sent": [...]} as ``reports``."""
        merged: dict[str, dict[str, Any]] = {}
        for line in await self._ask("report"):
            merged.update(json.loads(line))
        return merged

    async def reports(self) -> dict[str, dict[str, Any]]:
        """Stop the observers; room -> {"reports": [[arrival time, seq, samples], ...],
        "sent": [[time, samples sent], ...]}."""
        merged: dict[str, dict[str, Any]] = {}
        for line in await self._ask("stop"):
            merged.update(json.loads(line))
        await self.close()
        return merged

    async def close(self) -> None:
        """Wait a little for the observers to leave, then kill what is left."""
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.close()
        for proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def _log(path: Path) -> BinaryIO:
    return open(path, "ab")  # the caller closes it


def _rate(points: list[list[Any]]) -> float | None:
    """Samples a second between the first and last of [time, cumulative samples] points."""
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def verdict(
    reports: list[list[Any]], sent: list[list[Any]], start: float, end: float
) -> dict[str, Any]:
    """One room's meter over the window [start, end] (wall clock), from its observer's
    ``reports`` ([arrival, seq, samples metered]) and ``sent`` ([time, samples sent]):
    report ratio, longest gap, audio metered against audio sent, and whether it fell
    behind; and whether the observer itself kept real time."""
    window = end - start
    inside = [r for r in reports if start <= r[0] <= end]
    due = REPORT_RATE * window
    ratio = len(inside) / due if due > 0 else 0.0
    times = [start, *(r[0] for r in inside), end]
    gap = max(b - a for a, b in itertools.pairwise(times))
    # The observer's own pace over the window (a starved observer sends less: not the
    # meter's fault), one point a second; real time if it logged too few.
    sending = _rate([p for p in sent if start - 1 <= p[0] <= end + 1])
    sent_ratio = sending / SAMPLE_RATE if sending is not None else None
    metered = _rate([[r[0], r[2]] for r in inside if r[2] is not None])
    audio = metered / (sending or SAMPLE_RATE) if metered is not None else None
    reasons = []
    if ratio < MIN_REPORT_RATIO:
        reasons.append(f"{len(inside)} reports of {due:g} due")
    if gap > 1 / REPORT_RATE + MAX_LATE:
        reasons.append(f"a {gap:.2f}s gap between reports")
    if audio is None:
        reasons.append("no audio metered")
    elif audio < MIN_AUDIO_RATIO:
        reasons.append(f"metered {audio:.2f}x the audio sent")
    return {
        "reports": len(inside),
        "report_ratio": round(ratio, 3),
        "max_gap_s": round(gap, 3),
        "audio_ratio": round(audio, 3) if audio is not None else None,
        "sent_ratio": round(sent_ratio, 3) if sent_ratio is not None else None,
        "behind": bool(reasons),
        "why": "; ".join(reasons),
    }


def summarise(
    rooms: list[str], observed: dict[str, dict[str, Any]], start: float, end: float
) -> dict[str, Any]:
    """Every room's verdict, folded: jobs behind, the worst of each figure, and why."""
    verdicts = {
        room: verdict(
            observed.get(room, {}).get("reports", []),
            observed.get(room, {}).get("sent", []),
            start,
            end,
        )
        for room in rooms
    }
    behind = {room: v["why"] for room, v in verdicts.items() if v["behind"]}
    values = list(verdicts.values())

    def least(key: str) -> float | None:
        found = [v[key] for v in values if v[key] is not None]
        return min(found) if found else None

    ratio = least("report_ratio")
    return {
        "jobs_behind": len(behind),
        "min_report_rate": round(ratio * REPORT_RATE, 2) if ratio is not None else None,
        "max_report_gap_s": max((v["max_gap_s"] for v in values), default=None),
        "min_audio_ratio": least("audio_ratio"),
        "min_sent_ratio": least("sent_ratio"),
        "behind": dict(list(behind.items())[:10]),  # the first few, for the run notes
    }
