"""Level meter: measures every remote microphone in the room and publishes the levels.

A room job. It subscribes to each participant's microphone track and, ``METER_RATE`` times a
second, sends one JSON message on the data topic ``METER_TOPIC`` (default ``levels``) with
every metered participant::

    {"seq": 12, "interval": 0.25,
     "participants": {"alice": {"rms_dbfs": -20.0, "peak_dbfs": -20.0, "speaking": true,
                                "samples": 576000}}}

Levels are over the samples received in the interval, in dBFS after AES17: the peak is
``20*log10(peak/32767)`` and the RMS is ``20*log10(rms*sqrt(2)/32767)``, so a sine of peak
amplitude A reads the same for both (a full-scale sine is 0 dBFS, a full-scale square wave
+3 dBFS RMS). Silence reads -100, the floor, never -inf. ``speaking`` is RMS at or above
``METER_THRESHOLD`` dBFS, held for ``METER_HANGOVER`` seconds after the last loud interval.
``samples`` counts the samples metered from that participant since its track came (all
intervals): a listener that compares its growth with the wall clock (48000 a second) sees
whether the meter keeps up with the audio (the bench's media workload does).

Messages are sent lossy (unreliable): a lost one is superseded by the next within a fraction
of a second, and a retransmitted stale level would only delay the fresh ones.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from livekit import rtc

from lkrun.context import JobContext

SAMPLE_RATE = 48000
FULL_SCALE = 32767.0
FLOOR_DBFS = -100.0
_SINE_CREST = math.sqrt(2)  # peak / RMS of a sine: the AES17 offset


@dataclass(frozen=True)
class Settings:
    rate: float  # reports per second
    threshold: float  # dBFS RMS from which a participant is speaking
    hangover: float  # seconds speaking stays on after the level drops
    topic: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        topic = env.get("METER_TOPIC", "levels")
        if not topic:
            raise ValueError("METER_TOPIC must not be empty")
        return cls(
            rate=_number(env, "METER_RATE", 4.0, 0.5, 50.0, "reports per second"),
            threshold=_number(env, "METER_THRESHOLD", -45.0, FLOOR_DBFS, 0.0, "dBFS"),
            hangover=_number(env, "METER_HANGOVER", 0.5, 0.0, 10.0, "seconds"),
            topic=topic,
        )


def _number(
    env: Mapping[str, str], name: str, default: float, lo: float, hi: float, unit: str
) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not lo <= value <= hi:  # NaN fails too
        raise ValueError(f"{name}={raw!r}: must be a number from {lo:g} to {hi:g} ({unit})")
    return value


def dbfs(amplitude: float) -> float:
    """An amplitude in int16 units as dBFS, floored so that silence is a number."""
    if amplitude <= 0:
        return FLOOR_DBFS
    return max(FLOOR_DBFS, 20 * math.log10(amplitude / FULL_SCALE))


def rms_dbfs(sum_squares: float, samples: int) -> float:
    if samples == 0:
        return FLOOR_DBFS
    return dbfs(math.sqrt(sum_squares / samples) * _SINE_CREST)


class Level:
    """One participant's running sums for the current interval, and its speaking state."""

    __slots__ = ("last_loud", "peak", "samples", "sum_squares", "total", "tracks")

    def __init__(self) -> None:
        self.sum_squares = 0.0
        self.samples = 0
        self.peak = 0
        self.tracks = 0  # microphone tracks feeding it; the entry goes with the last one
        self.last_loud = -math.inf
        self.total = 0  # samples metered since the entry came, never reset

    def add(self, pcm: np.ndarray) -> None:
        """Fold in one frame: a dot product and a min/max, cheap enough for every 10 ms."""
        if pcm.size == 0:
            return
        x = pcm.astype(np.float32)
        self.sum_squares += float(np.dot(x, x))
        self.samples += pcm.size
        self.total += pcm.size
        # max/min of int16 rather than abs(), which overflows on -32768.
        self.peak = max(self.peak, int(pcm.max()), -int(pcm.min()))

    def take(self, now: float, settings: Settings) -> dict[str, object]:
        """The interval's report; starts the next interval."""
        rms = rms_dbfs(self.sum_squares, self.samples)
        if rms >= settings.threshold:
            self.last_loud = now
        report = {
            "rms_dbfs": round(rms, 1),
            "peak_dbfs": round(dbfs(self.peak), 1),
            "speaking": now - self.last_loud <= settings.hangover,
        }
        self.sum_squares, self.samples, self.peak = 0.0, 0, 0
        return report


async def entrypoint(ctx: JobContext) -> None:
    settings = Settings.from_env(os.environ)  # a bad setting fails the job with its name
    levels: dict[str, Level] = {}

    async def meter(
        track: rtc.Track, publication: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
    ) -> None:
        level = levels.setdefault(who.identity, Level())
        level.tracks += 1
        # Frames of up to 100 ms rather than the default 10 ms: the SDK's per-frame cost (a
        # Python object and an event per frame) was most of a meter's CPU, and two frames
        # per report interval lose nothing a level needs.
        frame_ms = max(10, min(100, int(500 / settings.rate)))
        stream = rtc.AudioStream(
            track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=frame_ms
        )
        try:
            async for event in stream:
                level.add(np.frombuffer(event.frame.data, dtype=np.int16))
        finally:
            level.tracks -= 1
            if level.tracks == 0 and levels.get(who.identity) is level:
                del levels[who.identity]
            await stream.aclose()

    async def publish() -> None:
        loop = asyncio.get_running_loop()
        period = 1 / settings.rate
        tick = loop.time()
        seq = 0
        was_empty = True
        while True:
            tick += period
            await asyncio.sleep(max(0.0, tick - loop.time()))
            now = loop.time()
            if now - tick > period:  # fell behind (busy host): skip ahead rather than burst
                tick = now
            participants = {
                who: {**level.take(now, settings), "samples": level.total}
                for who, level in levels.items()
            }
            if not participants and was_empty:
                continue  # one empty report after the last track goes, then quiet
            was_empty = not participants
            seq += 1
            message = {"seq": seq, "interval": round(period, 3), "participants": participants}
            try:
                await ctx.room.local_participant.publish_data(
                    json.dumps(message), reliable=False, topic=settings.topic
                )
            except Exception as exc:  # e.g. while the room reconnects: the next tick retries
                ctx.logger.warning("could not publish levels: %r", exc)

    ctx.on_track(meter, kind=rtc.TrackKind.KIND_AUDIO, sources=[rtc.TrackSource.SOURCE_MICROPHONE])
    await ctx.connect()
    ctx.create_task(publish(), name="publish levels")
    ctx.logger.info(
        "metering microphones in room %s: topic %r, %g reports/s, speaking from %g dBFS",
        ctx.job.room,
        settings.topic,
        settings.rate,
        settings.threshold,
    )
