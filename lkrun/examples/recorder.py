"""Recorder: one job per publishing participant, writing that participant's microphone to WAV.

Run it with ``job_type = "publisher"``: LiveKit starts one job for each participant who
publishes (``ctx.job.participant_identity`` names them), once per participant, on their first
publish. The job subscribes to that participant's microphone tracks only, and writes each to
``<RECORDER_DIR>/<identity>-<job id>-<n>.wav`` (48 kHz, mono, 16-bit; identity and job id
reduced to ``[A-Za-z0-9_-]``, n counting the participant's tracks from 1). A file is closed,
its header final, when the track goes (unpublished, participant left) or the job is stopped;
the log then reports ``recorded PATH: SECONDS s, BYTES bytes``. The job ends when the
participant leaves.

A WAV file cannot hold more than 4 GiB (its header's sizes are 32-bit). A file that would
grow past ``RECORDER_MAX_BYTES`` (header included; default 4 000 000 000, about 11.5 h) is
closed, valid and reported, and the track goes on in ``<identity>-<job id>-<n>-part2.wav``,
then ``-part3.wav``, and so on: the parts, in order, hold the whole track, no sample lost or
repeated.

``RECORDER_DIR`` defaults to ``recordings``; a relative path is relative to the job's working
directory, the manifest's directory. It is created if missing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import wave
from collections.abc import Callable, Mapping
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
HEADER_BYTES = 44  # what the stdlib's wave module writes before the PCM
SAMPLE_BYTES = 2  # mono int16
# The RIFF header's sizes are unsigned 32-bit: the stdlib raises past them and leaves the
# file position inside the header, so the next write lands on it. A file must end before.
WAV_MAX_BYTES = 8 + 0xFFFFFFFF - 1  # the RIFF size counts from byte 8; whole samples only
DEFAULT_MAX_BYTES = 4_000_000_000
MIN_MAX_BYTES = 1024


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


def max_file_bytes(env: Mapping[str, str]) -> int:
    """``RECORDER_MAX_BYTES``: the largest a file may grow, header included."""
    raw = (env.get("RECORDER_MAX_BYTES") or "").strip()
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if not MIN_MAX_BYTES <= value <= WAV_MAX_BYTES:
        raise ValueError(
            f"RECORDER_MAX_BYTES={raw!r}: must be a whole number of bytes from "
            f"{MIN_MAX_BYTES} to {WAV_MAX_BYTES} (a WAV file's limit)"
        )
    return value


def part_path(first: Path, part: int) -> Path:
    """The file of part ``part`` (1, 2, ...) of the recording whose first file is ``first``."""
    return first if part == 1 else first.with_name(f"{first.stem}-part{part}{first.suffix}")


# Told of each file when it is finished: (path, seconds of audio, bytes).
Finished = Callable[[Path, float, int], None]


class WavFile:
    """One WAV file being written: 48 kHz mono int16, header kept valid as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "xb")  # never overwrite a recording  # noqa: SIM115
        self._wav = wave.open(self._file, "wb")  # noqa: SIM115 (closed in close())
        self._wav.setnchannels(1)
        self._wav.setsampwidth(SAMPLE_BYTES)
        self._wav.setframerate(SAMPLE_RATE)
        self.size = HEADER_BYTES  # what the file will hold once the header is final

    def write(self, pcm: bytes) -> None:
        # writeframes (not writeframesraw) rewrites the header's sizes: the file on disk is a
        # valid WAV after every write.
        self._wav.writeframes(pcm)
        self._file.flush()
        self.size += len(pcm)

    def close(self) -> tuple[float, int]:
        """Finish the file; returns its duration (s) and size (bytes)."""
        try:
            frames = self._wav.getnframes()
            self._wav.close()  # final header; leaves the file we opened to us
            size = self._file.tell()
        finally:
            self._file.close()
        return frames / SAMPLE_RATE, size


class Recording:
    """A track written to WAV: ``path``, then ``part_path(path, 2)``, ... each time a file
    would grow past ``max_bytes``."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        finished: Finished | None = None,
    ) -> None:
        if not MIN_MAX_BYTES <= max_bytes <= WAV_MAX_BYTES:
            raise ValueError(f"max_bytes must be from {MIN_MAX_BYTES} to {WAV_MAX_BYTES}")
        self.path = path
        # Audio per file, in whole samples.
        self._room = (max_bytes - HEADER_BYTES) // SAMPLE_BYTES * SAMPLE_BYTES
        self._finished = finished
        self.paths = [path]
        self._current = WavFile(path)
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._seconds = 0.0
        self._bytes = 0

    def write(self, pcm: bytes) -> None:
        self._pending.append(pcm)
        self._pending_bytes += len(pcm)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        # About 96 kB a second: written inline, not in a thread.
        data = memoryview(b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0
        while data:
            free = HEADER_BYTES + self._room - self._current.size
            if free <= 0:
                self._next_file()
                continue
            self._current.write(bytes(data[:free]))
            data = data[free:]

    def _next_file(self) -> None:
        self._finish()
        path = part_path(self.path, len(self.paths) + 1)
        self.paths.append(path)
        self._current = WavFile(path)

    def _finish(self) -> None:
        seconds, size = self._current.close()
        self._seconds += seconds
        self._bytes += size
        if self._finished is not None:
            self._finished(self._current.path, seconds, size)

    def close(self) -> tuple[float, int]:
        """Finish the last file; returns the duration (s) and size (bytes) of all of them."""
        try:
            self.flush()
        finally:
            self._finish()
        return self._seconds, self._bytes


async def entrypoint(ctx: JobContext) -> None:
    target = ctx.job.participant_identity
    if ctx.job.job_type != "publisher" or not target:
        raise ValueError(
            f'the recorder needs job_type = "publisher" in its manifest table '
            f"(this job is a {ctx.job.job_type!r} job)"
        )
    directory = recordings_dir(os.environ)
    max_bytes = max_file_bytes(os.environ)
    stem = f"{safe_name(target)}-{safe_name(ctx.job.id)}"
    numbers = itertools.count(1)

    def finished(path: Path, seconds: float, size: int) -> None:
        ctx.logger.info("recorded %s: %.2f s, %d bytes", path, seconds, size)

    async def record(
        track: rtc.Track, publication: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
    ) -> None:
        path = directory / f"{stem}-{next(numbers)}.wav"
        recording = Recording(path, max_bytes=max_bytes, finished=finished)
        ctx.logger.info("recording track %s of %r to %s", track.sid, target, path)
        # 100 ms frames: a tenth of the SDK's per-frame work of its default 10 ms ones.
        stream = rtc.AudioStream(track, sample_rate=SAMPLE_RATE, num_channels=1, frame_size_ms=100)
        try:
            async for event in stream:
                recording.write(bytes(event.frame.data))
        finally:
            # Runs on unpublish, on the participant leaving, and when the job is stopped;
            # each file is reported (finished) as it is closed.
            recording.close()
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
