"""Recorder: one job per publishing participant, writing that participant's microphone to WAV.

Run it with ``job_type = "publisher"``: LiveKit starts one job for each participant who
publishes (``ctx.job.participant_identity`` names them), once per participant, on their first
publish. The job subscribes to that participant's microphone tracks only, and writes each to
``<RECORDER_DIR>/<identity>-<job id>-<n>.wav`` (48 kHz, mono, 16-bit; identity and job id
reduced to ``[A-Za-z0-9_-]``, n counting the participant's tracks from 1). A file is closed,
its header final, when the track goes (unpublished, participant left) or the job is stopped;
the log then reports ``recorded PATH: SECONDS s, BYTES bytes``. The job ends when the
participant leaves.

``RECORDER_DIR`` defaults to ``recordings``; a relative path is relative to the job's working
directory, the manifest's directory. It is created if missing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import wave
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from livekit import rtc

from lkrun.context import JobContext

SAMPLE_RATE = 48000
# Audio is written (and the WAV header brought up to date) about once a second: a job killed
# outright loses at most that much, and the file is still a valid WAV.
FLUSH_BYTES = SAMPLE_RATE * 2
# A publisher job starts on the participant's first publish; one gone by the time the job
# joins is not waited for long.
PUBLISHER_WAIT = 10.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_name(text: str, limit: int = 64) -> str:
    """A file name part from untrusted text: no separators, dots, spaces or control characters."""
    return _UNSAFE.sub("_", text).strip("_")[:limit] or "unnamed"


def recordings_dir(env: Mapping[str, str]) -> Path:
    raw = env.get("RECORDER_DIR") or "recordings"
    path = Path(raw).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"RECORDER_DIR={raw!r}: cannot create the directory: {exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"RECORDER_DIR={raw!r}: the directory is not writable")
    return path


class Recording:
    """A WAV file being written: 48 kHz mono int16, header kept valid as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "xb")  # never overwrite a recording  # noqa: SIM115
        self._wav = wave.open(self._file, "wb")  # noqa: SIM115 (closed in close())
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(SAMPLE_RATE)
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, pcm: bytes) -> None:
        self._pending.append(pcm)
        self._pending_bytes += len(pcm)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        # writeframes (not writeframesraw) rewrites the header's sizes: the file on disk is a
        # valid WAV after every flush. About 96 kB a second: written inline, not in a thread.
        self._wav.writeframes(b"".join(self._pending))
        self._file.flush()
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> tuple[float, int]:
        """Finish the file; returns its duration (s) and size (bytes)."""
        try:
            self.flush()
            frames = self._wav.getnframes()
            self._wav.close()  # final header; leaves the file we opened to us
            size = self._file.tell()
        finally:
            self._file.close()
        return frames / SAMPLE_RATE, size


async def entrypoint(ctx: JobContext) -> None:
    target = ctx.job.participant_identity
    if ctx.job.job_type != "publisher" or not target:
        raise ValueError(
            f'the recorder needs job_type = "publisher" in its manifest table '
            f"(this job is a {ctx.job.job_type!r} job)"
        )
    directory = recordings_dir(os.environ)
    stem = f"{safe_name(target)}-{safe_name(ctx.job.id)}"
    numbers = itertools.count(1)

    async def record(
        track: rtc.Track, publication: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
    ) -> None:
        recording = Recording(directory / f"{stem}-{next(numbers)}.wav")
        ctx.logger.info("recording track %s of %r to %s", track.sid, target, recording.path)
        # 100 ms frames: a tenth of the SDK's per-frame work of its default 10 ms ones.
        stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=100)
        try:
            async for event in stream:
                recording.write(bytes(event.frame.data))
        finally:
            # Runs on unpublish, on the participant leaving, and when the job is stopped.
            seconds, size = recording.close()
            ctx.logger.info("recorded %s: %.2f s, %d bytes", recording.path, seconds, size)
            await stream.aclose()

    def left(who: rtc.RemoteParticipant) -> None:
        if who.identity == target:
            ctx.shutdown(f"{target!r} left the room")

    # Only the participant this job is about: with auto-subscribe, every publisher's job
    # would receive every publisher's audio.
    microphone = [rtc.TrackSource.SOURCE_MICROPHONE]
    audio = rtc.TrackKind.KIND_AUDIO
    ctx.on_track(record, kind=audio, sources=microphone, identity=target, subscribe=True)
    ctx.room.on("participant_disconnected", left)
    await ctx.connect(auto_subscribe=False)
    try:
        await asyncio.wait_for(ctx.wait_for_participant(target), PUBLISHER_WAIT)
    except asyncio.TimeoutError:
        ctx.shutdown(f"{target!r} is not in the room")
        return
    ctx.logger.info("recorder for %r in room %s, writing to %s", target, ctx.job.room, directory)
