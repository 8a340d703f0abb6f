"""Frame sampler: samples every remote camera and screen-share track a few times a second and
publishes what a moderation or analytics service would start from.

Per track, each sample is one JSON message on the data topic ``video.samples``: resolution,
the frame rate received, mean brightness, dominant colour, and how many frames were skipped.

Video arrives faster than most analysis runs, so the sampler never queues frames: a reader
task drains the track continuously and keeps only the newest frame in a one-slot mailbox
(``LatestFrame``); the sampler takes whatever is newest at its own rate. A slow analysis
therefore costs skipped frames, never a growing backlog or stale reports. A sample that
fails (a publish while the room reconnects, say) is logged and the sampler goes on: its
``seq`` is missing from what clients receive.

Settings (the agent's ``env`` table):

- ``SAMPLER_FPS``: samples per second per track (default 2, at most 30)
- ``SAMPLER_WINDOW``: seconds over which the received frame rate is measured (default 2)
- ``SAMPLER_TOPIC``: the data topic the samples go to (default ``video.samples``)
"""

from __future__ import annotations

import asyncio
import colorsys
import json
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from livekit import rtc

from lkrun.context import JobContext

_T = TypeVar("_T")

# Analysis runs on a frame strided down to about this many pixels on its longer side:
# brightness and colour statistics need a few thousand pixels, not two million.
ANALYSIS_SIDE = 160
# Frames the SDK may hold for the reader if the event loop stalls; beyond that it drops
# the oldest itself, so not even a blocked loop builds a backlog.
STREAM_CAPACITY = 8
# Colour quantisation: 4 levels per channel (64 bins), coarse enough that noise and
# compression artefacts of one colour land in one bin.
LEVELS = 4


@dataclass(frozen=True)
class Settings:
    fps: float = 2.0
    window: float = 2.0
    topic: str = "video.samples"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            fps=_number(env, "SAMPLER_FPS", cls.fps, low=0.0, high=30.0),
            window=_number(env, "SAMPLER_WINDOW", cls.window, low=0.2, high=60.0),
            topic=env.get("SAMPLER_TOPIC", cls.topic).strip() or cls.topic,
        )


def _number(env: Mapping[str, str], name: str, default: float, *, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (low < value <= high):  # NaN fails too
        raise ValueError(f"{name} must be a number > {low:g} and <= {high:g}, got {raw!r}")
    return value


class LatestFrame(Generic[_T]):
    """A one-slot mailbox: ``put`` replaces whatever the consumer has not taken yet.

    The producer never waits and memory never grows; the consumer always gets the newest
    item. ``received`` counts puts, ``taken`` counts takes; the difference (less the one
    possibly waiting) is what was skipped.
    """

    def __init__(self) -> None:
        self._item: _T | None = None
        self._ready = asyncio.Event()
        self.received = 0
        self.taken = 0

    def put(self, item: _T) -> None:
        self._item = item
        self.received += 1
        self._ready.set()

    async def take(self) -> _T:
        """The newest item not taken yet, waiting for one if need be."""
        while self._item is None:
            self._ready.clear()
            await self._ready.wait()
        item, self._item = self._item, None
        self.taken += 1
        return item

    @property
    def skipped(self) -> int:
        return self.received - self.taken - (self._item is not None)


class FrameRate:
    """Frames per second over the last ``window`` seconds of arrivals."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._times: deque[float] = deque()
        self._first: float | None = None

    def add(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._times.append(now)
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        if self._first is None or len(self._times) < 2:
            return 0.0
        if now - self._first >= self.window:
            return len(self._times) / self.window
        # Younger than the window: measure between the arrivals seen so far.
        return (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-6)

    def _trim(self, now: float) -> None:
        while self._times and self._times[0] < now - self.window:
            self._times.popleft()


async def sample_newest(
    latest: LatestFrame[_T],
    clock: SampleClock,
    process: Callable[[_T], Awaitable[None]],
    failures: SampleFailures | None = None,
) -> None:
    """Take the newest item at most once per ``clock`` tick and ``await process(item)``.

    Runs until cancelled. A process slower than a tick delays the next sample rather than
    queueing anything: the ticks it overran are skipped (not made up in a burst) and counted
    in ``clock.overruns``, and the items that arrived meanwhile in ``latest.skipped``. With
    ``failures``, a process that raises is reported there and sampling goes on; without, the
    error ends the loop.
    """
    while True:
        item = await latest.take()
        started = time.monotonic()
        try:
            await process(item)
        except Exception as exc:
            if failures is None:
                raise
            failures.failed(exc)
        else:
            if failures is not None:
                failures.succeeded()
        now = time.monotonic()
        await asyncio.sleep(clock.next_delay(started, now))


class SampleFailures:
    """Counts samples that failed and logs them without flooding: the first of a run of
    failures, then the 10th, 100th, ... of the run, and the first success after it."""

    def __init__(self, logger: Any, what: str) -> None:
        self._logger = logger
        self._what = what
        self.total = 0  # samples failed so far
        self.streak = 0  # failed in a row, up to now

    def failed(self, exc: Exception) -> None:
        self.total += 1
        self.streak += 1
        if math.log10(self.streak).is_integer():
            self._logger.warning(
                "%s: sample failed (%d in a row, %d in all), going on: %s: %s",
                self._what,
                self.streak,
                self.total,
                type(exc).__name__,
                exc,
                extra={"sample_failures": self.streak, "sample_failures_total": self.total},
            )

    def succeeded(self) -> None:
        if self.streak:
            self._logger.info("%s: sampling again after %d failed", self._what, self.streak)
            self.streak = 0


class SampleClock:
    """Ticks ``1/fps`` apart, for a sampler that may wait for items and may overrun."""

    def __init__(self, fps: float) -> None:
        self.interval = 1.0 / fps
        self._due: float | None = None  # the tick the current sample was taken for
        self.overruns = 0  # samples whose processing alone outlasted a tick

    def next_delay(self, started: float, now: float) -> float:
        """Seconds to sleep before the next sample, for one processed from ``started`` to
        ``now``."""
        if self._due is None or started > self._due + self.interval:
            self._due = started  # it waited for a frame past a whole tick: a new grid from here
        self._due += self.interval
        if now - started > self.interval:
            self.overruns += 1
        if self._due < now:  # skip the ticks already passed rather than catch up in a burst
            self._due += math.ceil((now - self._due) / self.interval) * self.interval
        return self._due - now


def analyse(rgba: np.ndarray) -> dict[str, Any]:
    """Brightness and colour statistics of an RGBA (height, width, 4) uint8 image."""
    step = max(1, math.ceil(max(rgba.shape[0], rgba.shape[1]) / ANALYSIS_SIDE))
    rgb = rgba[::step, ::step, :3].reshape(-1, 3)
    if rgb.size == 0:
        return {"brightness": 0.0, "mean_rgb": [0, 0, 0], "color": colour_of(np.zeros(3), 1.0)}
    mean = rgb.mean(axis=0)
    # Rec. 601 luma, the Y of the track's own YUV: 0 black .. 255 white.
    brightness = float(mean @ np.array([0.299, 0.587, 0.114]))
    shift = 8 - int(math.log2(LEVELS))
    quantised = rgb >> shift
    bins = (quantised[:, 0].astype(np.int32) * LEVELS + quantised[:, 1]) * LEVELS + quantised[:, 2]
    counts = np.bincount(bins, minlength=LEVELS**3)
    top = int(counts.argmax())
    # The dominant colour is the mean of the pixels in the most common bin: a real colour
    # of the image, where the overall mean of red and blue halves would be a purple nobody sees.
    dominant = rgb[bins == top].mean(axis=0)
    return {
        "brightness": round(brightness, 1),
        "mean_rgb": [round(float(c)) for c in mean],
        "color": colour_of(dominant, float(counts[top]) / len(bins)),
    }


def colour_of(rgb: np.ndarray, share: float) -> dict[str, Any]:
    return {
        "name": colour_name(*(float(c) for c in rgb)),
        "rgb": [round(float(c)) for c in rgb],
        "share": round(share, 3),
    }


def colour_name(r: float, g: float, b: float) -> str:
    """A coarse name for a colour: black, gray, white, or one of eight hues."""
    hue, sat, val = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)
    if val < 0.15:
        return "black"
    if sat < 0.2:
        return "white" if val > 0.85 else "gray"
    degrees = hue * 360
    for limit, name in (
        (15, "red"),
        (45, "orange"),
        (70, "yellow"),
        (165, "green"),
        (195, "cyan"),
        (255, "blue"),
        (290, "purple"),
        (335, "magenta"),
    ):
        if degrees < limit:
            return name
    return "red"


def source_name(source: rtc.TrackSource.ValueType) -> str:
    try:
        return rtc.TrackSource.Name(source).removeprefix("SOURCE_").lower()
    except ValueError:
        return "unknown"


async def entrypoint(ctx: JobContext) -> None:
    settings = Settings.from_env(os.environ)  # a bad setting fails the job with its name

    async def on_video(
        track: rtc.Track, pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
    ) -> None:
        await sample_track(ctx, settings, track, pub, who)

    ctx.on_track(
        on_video,
        kind=rtc.TrackKind.KIND_VIDEO,
        sources=(rtc.TrackSource.SOURCE_CAMERA, rtc.TrackSource.SOURCE_SCREENSHARE),
    )
    await ctx.connect()
    ctx.logger.info(
        "frame sampler in room %s: %.3g samples/s per track on topic %r",
        ctx.job.room,
        settings.fps,
        settings.topic,
    )


async def sample_track(
    ctx: JobContext,
    settings: Settings,
    track: rtc.Track,
    pub: rtc.RemoteTrackPublication,
    who: rtc.RemoteParticipant,
) -> None:
    """Sample one track until it goes (on_track cancels this task then)."""
    stream = rtc.VideoStream(track, capacity=STREAM_CAPACITY)
    latest: LatestFrame[tuple[rtc.VideoFrame, float]] = LatestFrame()
    rate = FrameRate(settings.window)
    clock = SampleClock(settings.fps)
    seq = 0

    async def read() -> None:
        # Only bookkeeping here, so the reader keeps up with any frame rate.
        async for event in stream:
            now = time.monotonic()
            rate.add(now)
            latest.put((event.frame, now))

    async def process(item: tuple[rtc.VideoFrame, float]) -> None:
        nonlocal seq
        frame, arrived = item
        # The conversion is libyuv in the SDK's native code (fast); the numpy work goes
        # to a thread so that even a heavy analysis leaves the reader running.
        rgba = frame.convert(rtc.VideoBufferType.RGBA)
        pixels = np.frombuffer(rgba.data, dtype=np.uint8).reshape(rgba.height, rgba.width, 4)
        stats = await asyncio.to_thread(analyse, pixels)
        now = time.monotonic()
        seq += 1
        report = {
            "participant": who.identity,
            "track_sid": track.sid,
            "track_name": pub.name,
            "source": source_name(pub.source),
            "seq": seq,
            "time": round(time.time(), 3),
            "width": frame.width,
            "height": frame.height,
            "fps": round(rate.rate(now), 2),
            **stats,
            "frames": {
                "received": latest.received,
                "sampled": latest.taken,
                "skipped": latest.skipped,
            },
            "overruns": clock.overruns,
            "frame_age_ms": round((now - arrived) * 1000, 1),
        }
        await ctx.room.local_participant.publish_data(
            json.dumps(report, separators=(",", ":")), topic=settings.topic
        )

    ctx.logger.info("sampling %s's %s track %s", who.identity, source_name(pub.source), track.sid)
    reader = ctx.create_task(read(), name=f"read {track.sid}")
    # A failed sample (a publish while the room reconnects) must not end the track's sampling:
    # nothing would start it again while the track stays subscribed.
    failures = SampleFailures(ctx.logger, f"track {track.sid}")
    sampler = ctx.create_task(
        sample_newest(latest, clock, process, failures), name=f"sample {track.sid}"
    )
    try:
        # Until the track ends (end of stream) or one of the two fails (the job logs it).
        await asyncio.wait({reader, sampler}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        reader.cancel()
        sampler.cancel()
        await stream.aclose()
        ctx.logger.info(
            "stopped sampling track %s: %d samples of %d frames, %d failed",
            track.sid,
            latest.taken,
            latest.received,
            failures.total,
        )
