"""The audio examples: the level meter (lkrun.examples.level_meter) and the per-publisher
recorder (lkrun.examples.recorder).

End to end against a real livekit-server, under both start methods: an observer publishes a
440 Hz sine at -20 dBFS and the meter reports -20 dBFS and speaking, then silence and not
speaking; an observer with a hostile identity publishes 3 s of tone and the recorder leaves a
safely named WAV of that duration and pitch, also when its job is killed mid-recording. The
dBFS maths, the settings and the file naming are checked without a server.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import rtc

from lkrun.examples import level_meter, recorder
from tests.conftest import observer, room_token, unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room, status_is

METER = "lkrun.examples.level_meter:entrypoint"
RECORDER = "lkrun.examples.recorder:entrypoint"
# The shared 2-core host is often busy: a dispatch to an agent reporting itself full would be
# dropped (issue 13). These tests are about the examples, not the load policy.
CPU_OFF = '[daemon]\nload_threshold = "off"\n'
START_METHODS = pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
RATE = 48000
FRAME = 480  # 10 ms


class Tone:
    """A microphone track from a test participant: a 440 Hz sine of adjustable amplitude."""

    def __init__(self, room: rtc.Room, amplitude: float, freq: float = 440.0) -> None:
        self.room = room
        self.amplitude = amplitude  # of full scale; 0 sends digital silence
        self.freq = freq
        # A short queue, so that a change of amplitude is heard within 0.2 s.
        self.source = rtc.AudioSource(RATE, 1, queue_size_ms=200)
        self.track = rtc.LocalAudioTrack.create_audio_track("mic", self.source)
        self._n = 0
        self._task: asyncio.Task[None] | None = None

    async def publish(self) -> None:
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await self.room.local_participant.publish_track(self.track, options)

    async def play(self, seconds: float) -> None:
        """Exactly ``seconds`` of signal, paced by the source, then wait until it is sent."""
        for _ in range(round(seconds * RATE / FRAME)):
            await self._frame()
        await self.source.wait_for_playout()

    def start(self) -> None:
        async def forever() -> None:
            while True:
                await self._frame()

        self._task = asyncio.create_task(forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.source.aclose()

    async def _frame(self) -> None:
        t = (np.arange(FRAME) + self._n) / RATE
        pcm = np.round(self.amplitude * 32767 * np.sin(2 * math.pi * self.freq * t))
        await self.source.capture_frame(
            rtc.AudioFrame(pcm.astype(np.int16).tobytes(), RATE, 1, FRAME)
        )
        self._n += FRAME


# ---------------------------------------------------------------- level meter


def test_dbfs_follows_aes17() -> None:
    t = np.arange(RATE) / RATE
    sine = np.round(0.1 * 32767 * np.sin(2 * math.pi * 440 * t)).astype(np.int16)
    level = level_meter.Level()
    for start in range(0, RATE, FRAME):
        level.add(sine[start : start + FRAME])
    report = level.take(0.0, level_meter.Settings.from_env({}))
    assert report == {"rms_dbfs": -20.0, "peak_dbfs": -20.0, "speaking": True}
    # Silence is a number far down, not -inf; -32768 does not overflow the peak.
    assert level_meter.dbfs(0) == level_meter.rms_dbfs(0.0, 0) == -100.0
    level.add(np.array([-32768, 0], dtype=np.int16))
    assert level.take(0.0, level_meter.Settings.from_env({}))["peak_dbfs"] == 0.0


def test_speaking_holds_for_the_hangover() -> None:
    settings = level_meter.Settings.from_env({"METER_HANGOVER": "0.5"})
    level = level_meter.Level()
    loud = np.full(FRAME, 3000, dtype=np.int16)
    level.add(loud)
    assert level.take(0.0, settings)["speaking"] is True
    assert level.take(0.25, settings)["speaking"] is True  # silent, within the hangover
    assert level.take(0.5, settings)["speaking"] is True
    assert level.take(0.75, settings)["speaking"] is False


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"METER_RATE": "fast"}, "METER_RATE"),
        ({"METER_RATE": "0"}, "METER_RATE"),
        ({"METER_THRESHOLD": "nan"}, "METER_THRESHOLD"),
        ({"METER_HANGOVER": "-1"}, "METER_HANGOVER"),
        ({"METER_TOPIC": ""}, "METER_TOPIC"),
    ],
)
def test_meter_settings_name_the_bad_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}"):
        level_meter.Settings.from_env(env)


def latest(reports: list[dict[str, Any]], who: str, n: int = 4) -> list[dict[str, Any]]:
    """The last n reports' entries for one participant (fewer if it was missing)."""
    return [r["participants"][who] for r in reports[-n:] if who in r["participants"]]


def steady(reports: list[dict[str, Any]], who: str, ok: Callable[[dict[str, Any]], bool]) -> bool:
    entries = latest(reports, who)
    return len(entries) == 4 and all(ok(e) for e in entries)


@START_METHODS
async def test_level_meter_reports_a_tone_then_silence(
    start_daemon: Any, livekit_server: Any, start_method: str
) -> None:
    name, room_name = unique("meter"), unique("levels")
    daemon = await start_daemon(CPU_OFF + agent_table(name, METER, start_method=start_method))
    reports: list[dict[str, Any]] = []
    arrivals: list[float] = []
    async with observer(livekit_server, room_name) as room:
        me = room.local_participant.identity

        def on_data(packet: rtc.DataPacket) -> None:
            if packet.topic == "levels":
                reports.append(json.loads(packet.data))
                arrivals.append(time.monotonic())

        room.on("data_received", on_data)
        tone = Tone(room, amplitude=0.1)  # peak 0.1 of full scale: -20 dBFS, AES17 RMS too
        await tone.publish()
        tone.start()
        try:
            await dispatch(livekit_server, room_name, name)

            def at_minus_20(e: dict[str, Any]) -> bool:
                loud = abs(e["rms_dbfs"] + 20) <= 1 and abs(e["peak_dbfs"] + 20) <= 1
                return loud and e["speaking"]

            await wait_for(lambda: steady(reports, me, at_minus_20), 60, what="-20 dBFS")
            heard = latest(reports, me)
            tone.amplitude = 0.0
            await wait_for(
                lambda: steady(reports, me, lambda e: e["rms_dbfs"] < -60 and not e["speaking"]),
                30,
                what="silence",
            )
            quiet = latest(reports, me)
            # A participant without a microphone track leaves the reports.
            await room.local_participant.unpublish_track(tone.track.sid)
            await wait_for(
                lambda: reports and me not in reports[-1]["participants"], 30, what="removal"
            )
        finally:
            await tone.stop()
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(f"tone: {heard} silence: {quiet} ({len(reports)} reports, {rate:.2f}/s)")
    assert all(r["interval"] == 0.25 for r in reports)
    assert 3 <= rate <= 5  # METER_RATE's default of 4 a second
    job = await job_in_room(daemon, room_name)
    assert job["agent"] == name


async def test_level_meter_bad_setting_fails_the_job(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("meter"), unique("levels")
    manifest = CPU_OFF + agent_table(name, METER, env={"METER_RATE": "often"})
    daemon = await start_daemon(manifest)
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "failed")
    assert job["error"] == (
        "ValueError: METER_RATE='often': must be a number from 0.5 to 50 (reports per second)"
    )


# ---------------------------------------------------------------- recorder


def test_safe_name_strips_what_a_path_could_use() -> None:
    assert recorder.safe_name("../../etc/passwd") == "etc_passwd"
    assert recorder.safe_name("alice smith\n\x00") == "alice_smith"
    assert recorder.safe_name("...") == "unnamed"
    assert recorder.safe_name("ä" * 10 + "b" * 100) == "b" * 64


def test_recorder_dir_errors_name_the_variable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match=r"^RECORDER_DIR="):
        recorder.recordings_dir({"RECORDER_DIR": str(blocker / "sub")})
    assert recorder.recordings_dir({"RECORDER_DIR": str(tmp_path / "a" / "b")}).is_dir()


def test_a_recording_is_a_valid_wav_while_it_grows(tmp_path: Path) -> None:
    recording = recorder.Recording(tmp_path / "r.wav")
    second = np.zeros(RATE, dtype=np.int16).tobytes()
    recording.write(second)
    recording.write(second[:RATE])  # half a second: not flushed yet
    assert read_wav(tmp_path / "r.wav").size == RATE  # as a job killed outright leaves it
    assert recording.close() == (1.5, 44 + 3 * RATE)
    assert read_wav(tmp_path / "r.wav").size == RATE * 3 // 2
    with pytest.raises(FileExistsError):  # never overwrites
        recorder.Recording(tmp_path / "r.wav")


def test_a_recording_rolls_over_to_numbered_valid_files_before_the_limit(tmp_path: Path) -> None:
    """Issue 17 item 5: past 4 GiB the stdlib's header patch raises and the next write lands
    on the header. With a limit of 0.3 s of audio per file, 1.25 s of a ramp (every sample
    distinct) goes to five files, each a valid WAV within the limit, in order, nothing lost."""
    limit = 44 + 2 * 14400  # 0.3 s of 48 kHz mono int16
    finished: list[tuple[Path, float, int]] = []
    first = tmp_path / "alice-AJ_1-1.wav"
    recording = recorder.Recording(
        first, max_bytes=limit, finished=lambda *done: finished.append(done)
    )
    audio = (np.arange(60000) % 65536 - 32768).astype(np.int16)
    for frame in np.split(audio, 12):  # 5000 samples at a time: splits fall inside frames
        recording.write(frame.tobytes())
    assert recording.close() == (1.25, 5 * 44 + 2 * 60000)
    paths = [first] + [tmp_path / f"alice-AJ_1-1-part{n}.wav" for n in range(2, 6)]
    assert recording.paths == paths
    assert sorted(tmp_path.iterdir()) == sorted(paths)
    assert [(p, s) for p, s, _ in finished] == [(p, 0.3) for p in paths[:4]] + [(paths[4], 0.05)]
    assert [size for _, _, size in finished] == [p.stat().st_size for p in paths]
    assert all(p.stat().st_size <= limit for p in paths)
    assert np.array_equal(np.concatenate([read_wav(p) for p in paths]), audio)


def test_the_file_size_limit_is_a_setting_within_what_wav_can_hold() -> None:
    assert recorder.max_file_bytes({}) == 4_000_000_000
    assert recorder.max_file_bytes({"RECORDER_MAX_BYTES": "1_000_000"}) == 1_000_000
    assert recorder.max_file_bytes({"RECORDER_MAX_BYTES": str(recorder.WAV_MAX_BYTES)}) > 2**32
    for bad in ("lots", "100", str(2**32 + 9), "1e9"):
        with pytest.raises(ValueError, match=r"^RECORDER_MAX_BYTES="):
            recorder.max_file_bytes({"RECORDER_MAX_BYTES": bad})
    # The largest allowed file's header still fits the RIFF sizes' 32 bits.
    room = (recorder.WAV_MAX_BYTES - 44) // 2 * 2
    assert 36 + room <= 0xFFFFFFFF


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, RATE)
        frames = wav.getnframes()
        pcm = np.frombuffer(wav.readframes(frames), dtype=np.int16)
    # The header's sizes are final: they account for every byte of the file.
    assert path.stat().st_size == 44 + 2 * frames
    assert pcm.size == frames
    return pcm


def dominant_hz(pcm: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(pcm.size)))
    return float(np.argmax(spectrum) * RATE / pcm.size)


def loud_span(pcm: np.ndarray) -> float:
    """Seconds from the first to the last sample above -40 dBFS."""
    loud = np.nonzero(np.abs(pcm.astype(np.int32)) > 328)[0]
    return float(loud[-1] - loud[0]) / RATE if loud.size else 0.0


def recorded_line(log: str, path: Path) -> str | None:
    return next((line for line in log.splitlines() if f"recorded {path}:" in line), None)


async def hostile_participant(server: Any, room_name: str) -> tuple[rtc.Room, str]:
    """A participant whose identity would be a path traversal if used as a file name."""
    identity = f"../{unique('evil')}/x y.wav"
    room = rtc.Room()
    await room.connect(server.url, room_token(server, room_name, identity))
    return room, identity


def recorder_manifest(name: str, start_method: str, directory: Path) -> str:
    return CPU_OFF + agent_table(
        name,
        RECORDER,
        job_type="publisher",
        start_method=start_method,
        env={"RECORDER_DIR": str(directory)},
    )


async def recording_started(room: rtc.Room, tone: Tone, server: Any, agent: str) -> float:
    """Dispatch, publish, and return once the recorder has subscribed to the track (when).

    In that order: a dispatch created while the participant's first track is being published
    is launched for that publisher twice by livekit-server (once by CreateDispatch, once by
    the track-published handler: two recorder jobs, two files), so the dispatch comes first
    and only the publish launches the job."""
    subscribed = asyncio.Event()
    room.on("local_track_subscribed", lambda track: subscribed.set())
    await dispatch(server, room.name, agent)
    await tone.publish()
    await wait_for(subscribed.is_set, 60, what="the recorder's subscription")
    return time.monotonic()


@START_METHODS
async def test_recorder_writes_the_publishers_tone(
    start_daemon: Any, livekit_server: Any, tmp_path: Path, start_method: str
) -> None:
    name, room_name, directory = unique("recorder"), unique("rec"), tmp_path / "recordings"
    daemon = await start_daemon(recorder_manifest(name, start_method, directory))
    room, identity = await hostile_participant(livekit_server, room_name)
    try:
        tone = Tone(room, amplitude=0.25)
        subscribed = await recording_started(room, tone, livekit_server, name)
        await tone.play(3.0)
        await room.local_participant.unpublish_track(tone.track.sid)
        elapsed = time.monotonic() - subscribed
        job = await job_in_room(daemon, room_name, "running")
        [path] = await wait_for(lambda: list(directory.glob("*.wav")), 30, what="a WAV file")
        line = await wait_for(lambda: recorded_line(daemon.log(), path), 30, what="its report")
        await tone.stop()
    finally:
        await room.disconnect()
    # The participant left: the job ends by itself.
    await wait_for(lambda: status_is(daemon, job["id"], "success"), 30, what="the job's end")

    assert path.parent == directory
    assert path.name == f"{recorder.safe_name(identity)}-{job['id']}-1.wav"
    assert "/" not in recorder.safe_name(identity) and ".." not in path.name
    pcm = read_wav(path)
    seconds, tone_seconds = pcm.size / RATE, loud_span(pcm)
    print(
        f"{line} | subscribed {elapsed:.3f} s, tone {tone_seconds:.3f} s,"
        f" dominant {dominant_hz(pcm):.1f} Hz"
    )
    # The 3 s of tone, whole, in a file that ends soon after the unpublish: the recorder keeps
    # the moments of silence around the tone while subscribed (about 0.05 s before it, 0.2 s
    # after it, seen here), and nothing more.
    assert abs(tone_seconds - 3.0) <= 0.3
    assert tone_seconds <= seconds <= elapsed + 0.5
    assert abs(dominant_hz(pcm) - 440) <= 3
    assert f": {seconds:.2f} s, {path.stat().st_size} bytes" in line


@START_METHODS
async def test_killing_the_recorder_mid_recording_leaves_a_valid_wav(
    start_daemon: Any, livekit_server: Any, tmp_path: Path, start_method: str
) -> None:
    name, room_name, directory = unique("recorder"), unique("rec"), tmp_path / "recordings"
    daemon = await start_daemon(recorder_manifest(name, start_method, directory))
    async with observer(livekit_server, room_name) as room:
        tone = Tone(room, amplitude=0.25)
        try:
            await recording_started(room, tone, livekit_server, name)
            tone.start()
            job = await job_in_room(daemon, room_name, "running")
            # Some audio is on disk (written about once a second) before the kill.
            [path] = await wait_for(lambda: list(directory.glob("*.wav")), 30, what="a file")
            await wait_for(lambda: path.stat().st_size > 44 + RATE * 2, 30, what="audio")
            # In a thread: the tone must keep flowing while the CLI runs.
            killed = await asyncio.to_thread(daemon.cli, "jobs", "kill", job["id"])
            assert killed.returncode == 0, killed.stderr
            await wait_for(lambda: status_is(daemon, job["id"], "success"), 30, what="its end")
        finally:
            await tone.stop()
    line = await wait_for(lambda: recorded_line(daemon.log(), path), 10, what="its report")
    pcm = read_wav(path)
    print(f"{line} | tone {loud_span(pcm):.3f} s")
    assert pcm.size >= RATE
    assert abs(dominant_hz(pcm) - 440) <= 3


async def test_a_recording_over_the_size_limit_goes_on_in_numbered_parts(
    start_daemon: Any, livekit_server: Any, tmp_path: Path
) -> None:
    """Issue 17 item 5 end to end: with RECORDER_MAX_BYTES at one second of audio, 2.5 s of
    tone is in -1.wav, -1-part2.wav, ... each a valid WAV within the limit, each reported,
    together the whole tone."""
    name, room_name, directory = unique("recorder"), unique("rec"), tmp_path / "recordings"
    limit = 44 + 2 * RATE
    manifest = CPU_OFF + agent_table(
        name,
        RECORDER,
        job_type="publisher",
        env={"RECORDER_DIR": str(directory), "RECORDER_MAX_BYTES": str(limit)},
    )
    daemon = await start_daemon(manifest)
    async with observer(livekit_server, room_name) as room:
        tone = Tone(room, amplitude=0.25)
        await recording_started(room, tone, livekit_server, name)
        await tone.play(2.5)
        await room.local_participant.unpublish_track(tone.track.sid)
        job = await job_in_room(daemon, room_name, "running")
        first = (
            directory / f"{recorder.safe_name(room.local_participant.identity)}-{job['id']}-1.wav"
        )

        def reported() -> list[Path] | None:
            paths = sorted(directory.glob("*.wav"), key=lambda p: (len(p.name), p.name))
            lines = [recorded_line(daemon.log(), p) for p in paths]
            return paths if len(paths) >= 3 and all(lines) else None

        paths = await wait_for(reported, 30, what="every part closed and reported")
        await tone.stop()
    assert paths[:3] == [first, recorder.part_path(first, 2), recorder.part_path(first, 3)]
    assert paths == [recorder.part_path(first, n) for n in range(1, len(paths) + 1)]
    assert [p.stat().st_size for p in paths[:-1]] == [limit] * (len(paths) - 1)
    pcm = np.concatenate([read_wav(p) for p in paths])
    print(f"{len(paths)} parts, {pcm.size / RATE:.3f} s, tone {loud_span(pcm):.3f} s")
    assert abs(loud_span(pcm) - 2.5) <= 0.3
    assert abs(dominant_hz(pcm) - 440) <= 3
