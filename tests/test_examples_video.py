"""lkrun/examples/frame_sampler.py: the video frame sampler.

Unit level (no server): the statistics, the settings, the frame-rate window, and the
latest-frame mechanism under a processor slower than the frames (it drops, never queues).
End to end: an observer publishes solid red then blue camera frames; the sampler's reports on
``video.samples`` give the resolution, a frame rate close to what was sent, and the colour
change within 2 s of the switch, with bounded report latency, under both start methods.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np
import pytest
from livekit import rtc

from lkrun.examples.frame_sampler import (
    FrameRate,
    LatestFrame,
    SampleClock,
    SampleFailures,
    Settings,
    analyse,
    colour_name,
    sample_newest,
)
from tests.conftest import observer, unique, wait_for, wait_for_participant
from tests.helpers import agent_table, dispatch, job_in_room, status_is

SAMPLER = "lkrun.examples.frame_sampler:entrypoint"
# The tests are about the example, not about the load policy of a shared, busy machine.
CPU_OFF = '[daemon]\nload_threshold = "off"\n'
START_METHODS = pytest.mark.parametrize("start_method", ["forkserver", "spawn"])

RED, BLUE = (255, 0, 0), (0, 0, 255)
WIDTH, HEIGHT, FPS = 320, 240, 15


def solid(rgb: tuple[int, int, int], width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    image = np.empty((height, width, 4), dtype=np.uint8)
    image[:, :, :3] = rgb
    image[:, :, 3] = 255
    return image


# -- unit level ------------------------------------------------------------------------------


def test_statistics_of_solid_and_mixed_images() -> None:
    red = analyse(solid(RED))
    assert red["color"] == {"name": "red", "rgb": [255, 0, 0], "share": 1.0}
    assert red["brightness"] == pytest.approx(76.2, abs=0.1)  # 0.299 * 255
    blue = analyse(solid(BLUE, 1920, 1080))  # strided down, same answer
    assert blue["color"]["name"] == "blue" and blue["brightness"] == pytest.approx(29.1, abs=0.1)
    # Two thirds blue, one third red: the dominant colour is blue, not the mean's purple.
    mixed = solid(BLUE)
    mixed[:80] = solid(RED)[:80]
    stats = analyse(mixed)
    assert stats["color"]["name"] == "blue"
    assert stats["color"]["share"] == pytest.approx(2 / 3, abs=0.001)
    assert colour_name(*stats["mean_rgb"]) == "purple"
    assert [analyse(solid((v, v, v)))["color"]["name"] for v in (5, 128, 250)] == [
        "black",
        "gray",
        "white",
    ]
    assert colour_name(0, 200, 0) == "green" and colour_name(230, 220, 20) == "yellow"


def test_settings_defaults_and_errors_name_the_variable() -> None:
    assert Settings.from_env({}) == Settings(fps=2.0, window=2.0, topic="video.samples")
    got = Settings.from_env({"SAMPLER_FPS": "5", "SAMPLER_WINDOW": "1.5", "SAMPLER_TOPIC": "x"})
    assert got == Settings(fps=5.0, window=1.5, topic="x")
    for name, raw in [
        ("SAMPLER_FPS", "fast"),
        ("SAMPLER_FPS", "0"),
        ("SAMPLER_FPS", "nan"),
        ("SAMPLER_FPS", "100"),
        ("SAMPLER_WINDOW", "-1"),
    ]:
        with pytest.raises(ValueError, match=f"^{name} must be a number .*got '{raw}'$"):
            Settings.from_env({name: raw})


def test_frame_rate_over_a_window() -> None:
    rate = FrameRate(window=2.0)
    assert rate.rate(0.0) == 0.0
    for i in range(16):  # 1 s at 15 fps: younger than the window, measured between arrivals
        rate.add(i / 15)
    assert rate.rate(1.0) == pytest.approx(15, rel=0.01)
    for i in range(16, 60):  # 4 s in all: the last 2 s count
        rate.add(i / 15)
    assert rate.rate(4.0) == pytest.approx(15, rel=0.05)
    assert rate.rate(10.0) == 0.0  # the track stalled: nothing in the window


def test_sample_clock_skips_overrun_ticks_and_counts_overruns() -> None:
    clock = SampleClock(fps=2)  # ticks 0.5 s apart
    assert clock.next_delay(0.0, 0.1) == pytest.approx(0.4)
    assert clock.next_delay(0.5, 0.6) == pytest.approx(0.4)  # on the grid: the 1.0 tick
    assert clock.overruns == 0
    # Waited a little for a frame: still the grid (the 1.5 tick).
    assert clock.next_delay(1.3, 1.4) == pytest.approx(0.1)
    # Waited for a frame past a whole tick (no fault of the sampler): a new grid from 2.1.
    assert clock.next_delay(2.1, 2.2) == pytest.approx(0.4)
    assert clock.overruns == 0
    # Processing took 1.1 s: the 3.1 and 3.6 ticks are gone; the next is 4.1, not a burst.
    assert clock.next_delay(2.6, 3.7) == pytest.approx(0.4)
    assert clock.overruns == 1


async def test_a_slow_processor_drops_frames_instead_of_queueing() -> None:
    """Frames at 200/s, a processor that takes 0.1 s, ticks wanted every 0.05 s: every
    sample is the newest frame there is, the skipped ones are counted, latency stays at
    one processing time however long it runs, and the producer is never held up."""
    latest: LatestFrame[tuple[int, float]] = LatestFrame()
    clock = SampleClock(fps=20)
    produced: list[int] = []
    samples: list[tuple[int, int, float]] = []  # (frame, newest frame then, age)

    async def produce() -> None:
        for i in range(400):  # about 2 s
            produced.append(i)
            latest.put((i, time.monotonic()))
            await asyncio.sleep(0.005)

    async def slow(item: tuple[int, float]) -> None:
        frame, made = item
        samples.append((frame, produced[-1], time.monotonic() - made))
        await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample_newest(latest, clock, slow))
    started = time.monotonic()
    try:
        await produce()
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    elapsed = time.monotonic() - started

    assert all(frame == newest for frame, newest, _ in samples)  # never an old frame
    assert max(age for _, _, age in samples) < 0.1  # it waited in no queue
    assert len(samples) <= elapsed / 0.1 + 1  # paced by the processor, not the frames
    assert latest.received == 400 and latest.taken == len(samples)
    assert latest.skipped == latest.received - latest.taken - (latest._item is not None)
    assert latest.skipped > 300
    assert clock.overruns >= len(samples) - 1  # each overran its 0.05 s tick (the last cut)


async def test_a_failed_publish_does_not_end_the_sampling(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 17 item 14: one failed publish (the room reconnecting) ended the sampler task
    for good while the track stayed subscribed. Now it is logged, and the next frame is
    sampled and published."""
    latest: LatestFrame[int] = LatestFrame()
    published: list[int] = []
    attempts: list[int] = []

    async def publish_failing_once(frame: int) -> None:
        attempts.append(frame)
        if len(attempts) == 1:
            raise ConnectionError("engine is reconnecting")  # what publish_data may raise
        published.append(frame)

    failures = SampleFailures(logging.getLogger("t.sampler"), "track TR_x")
    caplog.set_level(logging.INFO, logger="t.sampler")
    sampler = asyncio.create_task(
        sample_newest(latest, SampleClock(fps=1000), publish_failing_once, failures)
    )
    try:
        latest.put(1)
        await wait_for(lambda: attempts == [1], 5, what="the first attempt")
        latest.put(2)
        await wait_for(lambda: published == [2], 5, what="the next sample published")
        assert not sampler.done()
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    assert (failures.total, failures.streak) == (1, 0)
    warned = [r for r in caplog.records if hasattr(r, "sample_failures")]
    assert [(r.levelno, r.sample_failures) for r in warned] == [(logging.WARNING, 1)]  # type: ignore[attr-defined]


def test_a_run_of_failures_is_logged_sparingly() -> None:
    logger = logging.getLogger("t.sampler.quiet")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        failures = SampleFailures(logger, "track TR_y")
        for _ in range(150):
            failures.failed(RuntimeError("no room"))
        failures.succeeded()
        failures.failed(RuntimeError("again"))
    finally:
        logger.removeHandler(handler)
    logged = [getattr(r, "sample_failures", None) for r in records]
    assert logged == [1, 10, 100, None, 1]  # None: the recovery line
    assert (failures.total, failures.streak) == (151, 1)


# -- end to end ------------------------------------------------------------------------------


class Camera:
    """A 320x240 camera track at 15 fps from the test, of one solid colour at a time."""

    def __init__(self) -> None:
        self.source = rtc.VideoSource(WIDTH, HEIGHT)
        self.colour = RED
        self.switched_at: float | None = None  # monotonic time of the first frame of a switch
        self.sent = 0
        self._frames = {
            c: rtc.VideoFrame(WIDTH, HEIGHT, rtc.VideoBufferType.RGBA, solid(c).tobytes())
            for c in (RED, BLUE)
        }
        self._switch_to: tuple[int, int, int] | None = None

    def switch(self, colour: tuple[int, int, int]) -> None:
        self._switch_to = colour

    async def run(self, room: rtc.Room, stop: asyncio.Event) -> None:
        """Publish until ``stop``, then unpublish."""
        track = rtc.LocalVideoTrack.create_video_track("camera", self.source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)
        publication = await room.local_participant.publish_track(track, options)
        due = time.monotonic()
        try:
            while not stop.is_set():
                if self._switch_to is not None:
                    self.colour, self._switch_to = self._switch_to, None
                    self.switched_at = time.monotonic()
                self.source.capture_frame(self._frames[self.colour])
                self.sent += 1
                due += 1 / FPS  # paced against the clock, so the rate holds on a busy machine
                await asyncio.sleep(max(0.0, due - time.monotonic()))
        finally:
            await room.local_participant.unpublish_track(publication.sid)


class Reports:
    """The sampler's messages on video.samples, each with the test's time of arrival."""

    def __init__(self, room: rtc.Room, topic: str = "video.samples") -> None:
        self.items: list[tuple[float, str, dict[str, Any]]] = []
        self._topic = topic
        room.on("data_received", self._on_data)

    def _on_data(self, packet: rtc.DataPacket) -> None:
        if packet.topic == self._topic and packet.participant is not None:
            report = json.loads(packet.data)
            self.items.append((time.monotonic(), packet.participant.identity, report))

    def where(self, colour: str, after: float = 0.0) -> list[dict[str, Any]]:
        return [r for t, _, r in self.items if t >= after and r["color"]["name"] == colour]


@START_METHODS
async def test_sampler_reports_size_rate_and_a_colour_change(
    start_daemon: Any, livekit_server: Any, start_method: str
) -> None:
    name, room_name = unique("sampler"), unique("video")
    daemon = await start_daemon(
        CPU_OFF + agent_table(name, SAMPLER, start_method=start_method, env={"SAMPLER_FPS": "2"})
    )
    camera, stop = Camera(), asyncio.Event()
    async with observer(livekit_server, room_name) as room:
        reports = Reports(room)
        publishing = asyncio.create_task(camera.run(room, stop))
        try:
            await dispatch(livekit_server, room_name, name)
            agent = await wait_for_participant(room, f"{name}-", timeout=30)

            # Red, at a frame rate measured over a full window.
            def red_settled() -> bool:
                red = reports.where("red")
                return len(red) >= 2 and red[-1]["frames"]["received"] >= 3 * FPS

            await wait_for(red_settled, 45, what="red samples over a full window")
            camera.switch(BLUE)
            await wait_for(lambda: camera.switched_at, 5, what="the switch to blue")
            assert camera.switched_at is not None
            await wait_for(lambda: reports.where("blue"), 10, what="a blue sample")
            arrived, _, first_blue = next(
                item for item in reports.items if item[2]["color"]["name"] == "blue"
            )
            await wait_for(lambda: len(reports.where("blue")) >= 3, 10, what="more blue samples")
        finally:
            stop.set()
            await publishing
        # Unpublished: the track's sampling ends, and the job goes on without it.
        await wait_for(
            lambda: "stopped sampling track" in daemon.log(), 20, what="the sampler to stop"
        )
        job = await job_in_room(daemon, room_name, "running")
        killed = daemon.cli("jobs", "kill", job["id"])
        assert killed.returncode == 0, killed.stderr
        await wait_for(lambda: status_is(daemon, job["id"], "success"), 30, what="a success")
    log = daemon.log()
    assert "Traceback" not in log and "still running" not in log, log

    latency = arrived - camera.switched_at
    print(f"[{start_method}] colour change reported {latency:.2f}s after the switch")
    assert latency <= 2.0, f"blue reported {latency:.2f}s after the switch"

    mine = [r for _, who, r in reports.items if who == agent.identity]
    assert mine and len(mine) == len(reports.items)  # all from the agent
    red, blue = reports.where("red"), reports.where("blue")
    assert red[-1]["seq"] < first_blue["seq"]
    # SAMPLER_FPS=2: a sample every 0.5 s on the agent's clock.
    period = (mine[-1]["time"] - mine[0]["time"]) / (mine[-1]["seq"] - mine[0]["seq"])
    assert period == pytest.approx(0.5, rel=0.2), period
    for report in mine:
        assert report["participant"] == room.local_participant.identity
        assert report["source"] == "camera" and report["track_name"] == "camera"
        assert report["frame_age_ms"] < 1000  # the newest frame, not one from a queue
    last_red = red[-1]
    print(f"[{start_method}] last red: {last_red}")
    print(f"[{start_method}] last blue: {blue[-1]}")
    for report in (last_red, blue[-1]):
        assert (report["width"], report["height"]) == (WIDTH, HEIGHT)
        assert abs(report["fps"] - FPS) <= 0.3 * FPS, report["fps"]
        assert report["color"]["share"] > 0.9
        counts = report["frames"]
        # 15 frames a second sampled twice a second: most are skipped, and counted.
        pending = counts["received"] - counts["sampled"] - counts["skipped"]
        assert pending in (0, 1)  # at most the one newest frame waits
        assert counts["sampled"] == report["seq"]
        assert counts["skipped"] > counts["sampled"]
    assert last_red["brightness"] == pytest.approx(76, abs=12)
    assert blue[-1]["brightness"] == pytest.approx(29, abs=12)
    assert blue[-1]["color"]["rgb"][2] > 200 and last_red["color"]["rgb"][0] > 200


@START_METHODS
async def test_a_bad_setting_fails_the_job_naming_it(
    start_daemon: Any, livekit_server: Any, start_method: str
) -> None:
    name, room_name = unique("sampler"), unique("video")
    daemon = await start_daemon(
        CPU_OFF + agent_table(name, SAMPLER, start_method=start_method, env={"SAMPLER_FPS": "fast"})
    )
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name)
    await wait_for(lambda: status_is(daemon, job["id"], "failed"), 30, what="a failure")
    listing = daemon.cli("jobs", "ls", "--all", "--json")
    [failed] = [j for j in json.loads(listing.stdout) if j["id"] == job["id"]]
    assert failed["error"] == "ValueError: SAMPLER_FPS must be a number > 0 and <= 30, got 'fast'"
