"""Observers of the media workload: one process publishing a tone into each of its rooms.

    LIVEKIT_URL=... LIVEKIT_API_KEY=... LIVEKIT_API_SECRET=... \\
    python -m tests.bench.tones [--frame-ms 100] ROOM [ROOM...]

In each room it joins as ``bench-observer`` (subscribing to nothing) and publishes a
microphone track; on ``play`` it sends a 48 kHz mono 440 Hz sine at -20 dBFS on it in
frames of ``--frame-ms`` (10 to 100, default 10; the bench gives 100, the cheapest:
one frame crosses into the SDK ten times a second), paced in real time by
``rtc.AudioSource`` (``capture_frame`` waits while two frames, or 200 ms, are queued).
Every room's track is made from one ``AudioSource`` per process: each frame crosses into
the SDK once, not once per room, which takes the observers' CPU from about 9 % of a core
per room to about 3 % (10 ms frames; each track is still encoded and sent on its own).
Joining first and playing later keeps the joins (the observers' and the meters') off a
machine already busy with 50 tones. It notes every message on the data
topic ``levels`` as ``[arrival time.time(), seq, samples]``, where ``samples`` is what the
meter reports having metered from this observer (None if the message does not name it),
and each second of tone handed to the source as ``[time.time(), samples sent]``: whether
the observer itself kept real time.

It talks to the bench over stdin/stdout, one line each way:

- it prints ``ready`` once every room is joined and its track published (or
  ``error: ...`` and exits 1);
- ``play``: it starts the tones and prints ``playing``;
- ``status``: it prints a JSON line ``{"metering": N}``, the rooms whose meter has
  reported metering some of this observer's audio;
- ``report``: it prints, as ``stop`` does, what it noted since the last ``report`` and
  keeps playing (the bench's media ramp reads every step's hold window so);
- ``stop`` (or EOF): it writes ``{room: {"reports": [...], "sent": [...]}}`` as one JSON
  line, leaves the rooms and exits.

The bench runs several of these (``media.ROOMS_PER_PROCESS`` rooms each) and measures
their CPU apart from the systems under test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
import warnings
from typing import Any

import numpy as np
from livekit import api, rtc

IDENTITY = "bench-observer"
TOPIC = "levels"
RATE = 48000
FRAMES_MS = (10, 20, 50, 100)  # each divides a second's 440 cycles evenly
AMPLITUDE = 0.1  # of full scale: -20 dBFS (peak and AES17 RMS)
CONNECTS_AT_ONCE = 2  # per process: joins are slow on a busy machine
ATTEMPTS = 3


def tone_frames(frame_ms: int = 10) -> list[rtc.AudioFrame]:
    """One second of the tone in frames of ``frame_ms``: 440 whole cycles, so it loops
    seamlessly."""
    frame = RATE * frame_ms // 1000
    t = np.arange(RATE) / RATE
    pcm = np.round(AMPLITUDE * 32767 * np.sin(2 * math.pi * 440 * t)).astype(np.int16)
    return [
        rtc.AudioFrame(pcm[i : i + frame].tobytes(), RATE, 1, frame) for i in range(0, RATE, frame)
    ]


class Source:
    """The tone, fed in real time to every track made from it."""

    def __init__(self, frame_ms: int = 10) -> None:
        self.frames = tone_frames(frame_ms)
        self.source = rtc.AudioSource(RATE, 1, queue_size_ms=max(200, 2 * frame_ms))
        self.sent: list[list[float]] = []  # [time.time(), samples handed to the source]
        self.task: asyncio.Task[None] | None = None

    def track(self) -> rtc.LocalAudioTrack:
        return rtc.LocalAudioTrack.create_audio_track("tone", self.source)

    def play(self) -> None:
        self.task = asyncio.create_task(self._play())

    async def _play(self) -> None:
        sent = 0
        self.sent.append([time.time(), sent])
        while True:
            for frame in self.frames:
                await self.source.capture_frame(frame)
            sent += RATE
            self.sent.append([time.time(), sent])

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.source.aclose()


class Tone:
    """One room: the observer, its track and what the meter reported."""

    def __init__(self, name: str, source: Source) -> None:
        self.name = name
        self.source = source
        self.room = rtc.Room()
        self.reports: list[list[Any]] = []
        self.metering = False  # the meter reported some of this observer's audio (kept
        # when ``report`` hands the reports over)
        self.room.on("data_received", self._on_data)

    def _on_data(self, packet: rtc.DataPacket) -> None:
        if packet.topic != TOPIC:
            return
        at = time.time()
        try:
            message = json.loads(packet.data)
            mine = message.get("participants", {}).get(IDENTITY) or {}
            self.reports.append([at, message.get("seq"), mine.get("samples")])
            self.metering = self.metering or bool(mine.get("samples"))
        except (ValueError, AttributeError):
            self.reports.append([at, None, None])

    def take(self) -> list[list[Any]]:
        """The reports noted so far, forgotten here."""
        taken, self.reports = self.reports, []
        return taken

    async def start(self, url: str, key: str, secret: str) -> None:
        """Join and publish; on a busy machine the server may not answer the publication
        in time: leave and try again, up to ``ATTEMPTS`` times."""
        token = (
            api.AccessToken(key, secret)
            .with_identity(IDENTITY)
            .with_grants(api.VideoGrants(room_join=True, room=self.name))
            .to_jwt()
        )
        for attempt in range(1, ATTEMPTS + 1):
            try:
                await self.room.connect(url, token, rtc.RoomOptions(auto_subscribe=False))
                track = self.source.track()
                options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
                await self.room.local_participant.publish_track(track, options)
                break
            except Exception as exc:
                if attempt == ATTEMPTS:
                    raise
                print(f"{self.name}: attempt {attempt}: {exc!r}", file=sys.stderr, flush=True)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.room.disconnect(), 5)
                self.room = rtc.Room()
                self.room.on("data_received", self._on_data)
                await asyncio.sleep(1)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.room.disconnect(), 5)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.tones")
    parser.add_argument("--frame-ms", type=int, choices=FRAMES_MS, default=10)
    parser.add_argument("rooms", nargs="+")
    return parser.parse_args(argv)


async def main(argv: list[str]) -> int:
    args = parse_args(argv)
    rooms: list[str] = args.rooms
    url = os.environ["LIVEKIT_URL"]
    key, secret = os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"]
    source = Source(args.frame_ms)
    tones = [Tone(name, source) for name in rooms]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)

    async def start(tone: Tone) -> None:
        async with gate:
            await tone.start(url, key, secret)

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        try:
            await asyncio.gather(*(start(t) for t in tones))
        except Exception as exc:
            say(f"error: {type(exc).__name__}: {exc}")
            return 1
        say("ready")
        while True:
            command = (await reader.readline()).decode().strip()
            if command == "play":
                source.play()
                say("playing")
            elif command == "status":
                say(json.dumps({"metering": sum(t.metering for t in tones)}))
            elif command == "report":
                say(json.dumps({t.name: {"reports": t.take(), "sent": source.sent} for t in tones}))
            elif command in ("stop", ""):  # "" is EOF: the bench is gone
                say(
                    json.dumps({t.name: {"reports": t.reports, "sent": source.sent} for t in tones})
                )
                return 0
    finally:
        await source.stop()
        await asyncio.gather(*(t.stop() for t in tones))


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message="The HMAC key is")  # the dev server's secret
    sys.exit(asyncio.run(main(sys.argv[1:])))
