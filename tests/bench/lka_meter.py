"""The level meter of the bench's ``media`` workload, written against livekit-agents.

The same meter as ``lkrun/examples/level_meter.py`` (same maths, topic, format and rate:
every remote microphone's AES17 RMS and peak dBFS, ``speaking``, and ``samples`` metered,
published lossy on data topic ``levels`` 4 times a second), as an ``AgentServer``
``rtc_session`` taking a ``livekit.agents.JobContext``. It imports only livekit-agents,
livekit-rtc, numpy and the standard library, never lkrun: the official worker runs it
through ``tests/bench/official_worker.py`` with ``BENCH_WORKLOAD=media``, while lkrun runs
its own example. The settings are the example's defaults (no ``METER_*`` variables).

Events go to $BENCH_EVENTS as JSON lines (``prewarm`` and ``entrypoint``, with the job
process's pid), as in ``lka_agent.py``: the bench finds each job's process from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import AgentServer, AutoSubscribe, JobContext, JobProcess, cli

EVENTS = os.environ.get("BENCH_EVENTS", "")
SAMPLE_RATE = 48000
FULL_SCALE = 32767.0
FLOOR_DBFS = -100.0
_SINE_CREST = math.sqrt(2)
RATE = 4.0  # reports per second
THRESHOLD = -45.0  # dBFS RMS from which a participant is speaking
HANGOVER = 0.5  # seconds
TOPIC = "levels"


def emit(event: str, **fields: Any) -> None:
    if not EVENTS:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}) + "\n"
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def dbfs(amplitude: float) -> float:
    if amplitude <= 0:
        return FLOOR_DBFS
    return max(FLOOR_DBFS, 20 * math.log10(amplitude / FULL_SCALE))


def rms_dbfs(sum_squares: float, samples: int) -> float:
    if samples == 0:
        return FLOOR_DBFS
    return dbfs(math.sqrt(sum_squares / samples) * _SINE_CREST)


class Level:
    __slots__ = ("last_loud", "peak", "samples", "sum_squares", "total", "tracks")

    def __init__(self) -> None:
        self.sum_squares = 0.0
        self.samples = 0
        self.peak = 0
        self.tracks = 0
        self.last_loud = -math.inf
        self.total = 0

    def add(self, pcm: np.ndarray) -> None:
        if pcm.size == 0:
            return
        x = pcm.astype(np.float32)
        self.sum_squares += float(np.dot(x, x))
        self.samples += pcm.size
        self.total += pcm.size
        self.peak = max(self.peak, int(pcm.max()), -int(pcm.min()))

    def take(self, now: float) -> dict[str, object]:
        rms = rms_dbfs(self.sum_squares, self.samples)
        if rms >= THRESHOLD:
            self.last_loud = now
        report = {
            "rms_dbfs": round(rms, 1),
            "peak_dbfs": round(dbfs(self.peak), 1),
            "speaking": now - self.last_loud <= HANGOVER,
            "samples": self.total,
        }
        self.sum_squares, self.samples, self.peak = 0.0, 0, 0
        return report


def prewarm(proc: JobProcess) -> None:
    emit("prewarm")


server = AgentServer(setup_fnc=prewarm)


class Meter:
    """One job's meter: a task per subscribed microphone, and the report timer."""

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.levels: dict[str, Level] = {}
        self.running: dict[str, asyncio.Task[None]] = {}
        self.publisher: asyncio.Task[None] | None = None

    async def meter(self, track: rtc.Track, who: rtc.RemoteParticipant) -> None:
        level = self.levels.setdefault(who.identity, Level())
        level.tracks += 1
        # The same frame size as lkrun's meter (see there).
        frame_ms = max(10, min(100, int(500 / RATE)))
        stream = rtc.AudioStream(
            track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=frame_ms
        )
        try:
            async for event in stream:
                level.add(np.frombuffer(event.frame.data, dtype=np.int16))
        finally:
            level.tracks -= 1
            if level.tracks == 0 and self.levels.get(who.identity) is level:
                del self.levels[who.identity]
            await stream.aclose()

    def subscribed(
        self, track: rtc.Track, pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
    ) -> None:
        is_mic = pub.source == rtc.TrackSource.SOURCE_MICROPHONE
        if track.kind == rtc.TrackKind.KIND_AUDIO and is_mic and track.sid not in self.running:
            self.running[track.sid] = asyncio.create_task(self.meter(track, who))

    def unsubscribed(
        self, track: rtc.Track, pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
    ) -> None:
        task = self.running.pop(track.sid, None)
        if task is not None:
            task.cancel()

    async def publish(self) -> None:
        loop = asyncio.get_running_loop()
        period = 1 / RATE
        tick = loop.time()
        seq = 0
        was_empty = True
        while True:
            tick += period
            await asyncio.sleep(max(0.0, tick - loop.time()))
            now = loop.time()
            if now - tick > period:  # fell behind (busy host): skip ahead rather than burst
                tick = now
            participants = {who: level.take(now) for who, level in self.levels.items()}
            if not participants and was_empty:
                continue  # one empty report after the last track goes, then quiet
            was_empty = not participants
            seq += 1
            message = {"seq": seq, "interval": round(period, 3), "participants": participants}
            # e.g. while the room reconnects: the next tick retries
            with contextlib.suppress(Exception):
                await self.ctx.room.local_participant.publish_data(
                    json.dumps(message), reliable=False, topic=TOPIC
                )

    async def start(self) -> None:
        room = self.ctx.room
        room.on("track_subscribed", self.subscribed)
        room.on("track_unsubscribed", self.unsubscribed)
        await self.ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
        for who in room.remote_participants.values():
            for pub in who.track_publications.values():
                if pub.track is not None and pub.subscribed:
                    self.subscribed(pub.track, pub, who)  # type: ignore[arg-type]
        self.publisher = asyncio.create_task(self.publish())
        self.ctx.add_shutdown_callback(self.stop)

    async def stop(self) -> None:
        for task in [*self.running.values(), self.publisher]:
            if task is not None:
                task.cancel()


@server.rtc_session(agent_name=os.environ.get("BENCH_AGENT_NAME", "bench-lka-meter"))
async def entrypoint(ctx: JobContext) -> None:
    info = ctx._info  # RunningJobInfo
    emit(
        "entrypoint",
        job_id=ctx.job.id,
        room=ctx.job.room.name,
        entrypoint_at=time.time(),
        received_at=info.received_at or None,
    )
    await Meter(ctx).start()
    # Returning keeps the job alive until the room disconnects.


if __name__ == "__main__":
    cli.run_app(server)
