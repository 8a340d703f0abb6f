"""A programmatic participant as bare functions (no AgentServer): listens to a microphone.

Fixture for "lkrun hosts unmodified livekit-agents apps": the entrypoint subscribes to audio
only, waits for the first participant's microphone track, reads about one second of audio
with rtc.AudioStream, then publishes one reliable data message on topic "lka.report" and stays
until the room ends.
"""

from __future__ import annotations

import asyncio
import json
import math

from livekit import rtc
from livekit.agents import (
    AutoSubscribe,
    JobContext,
    JobProcess,
    WorkerOptions,
    cli,
    get_job_context,
)

REPORT_TOPIC = "lka.report"
LISTEN_SECONDS = 1.0


def prewarm(proc: JobProcess) -> None:
    proc.userdata["warm"] = True


async def _microphone_track(room: rtc.Room, participant: rtc.RemoteParticipant) -> rtc.Track:
    """The participant's subscribed microphone track, waiting for it if needed."""
    for pub in participant.track_publications.values():
        if pub.source == rtc.TrackSource.SOURCE_MICROPHONE and pub.track is not None:
            return pub.track
    subscribed: asyncio.Future[rtc.Track] = asyncio.get_running_loop().create_future()

    def on_track_subscribed(
        track: rtc.Track, pub: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant
    ) -> None:
        is_mic = pub.source == rtc.TrackSource.SOURCE_MICROPHONE
        if p.identity == participant.identity and is_mic and not subscribed.done():
            subscribed.set_result(track)

    room.on("track_subscribed", on_track_subscribed)
    try:
        return await subscribed
    finally:
        room.off("track_subscribed", on_track_subscribed)


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect(auto_subscribe=AutoSubscribe.AUDIO_ONLY)
    participant = await ctx.wait_for_participant()
    track = await _microphone_track(ctx.room, participant)

    frames, samples, square_sum, sample_rate = 0, 0, 0.0, 0
    stream = rtc.AudioStream(track)
    try:
        async for event in stream:
            frame = event.frame
            sample_rate = frame.sample_rate
            frames += 1
            data = frame.data  # int16 samples
            samples += len(data)
            square_sum += sum(float(s) * s for s in data)
            if samples >= LISTEN_SECONDS * sample_rate * frame.num_channels:
                break
    finally:
        await stream.aclose()

    report = {
        "participant": participant.identity,
        "frames": frames,
        "sample_rate": sample_rate,
        "rms": math.sqrt(square_sum / samples) if samples else 0.0,
        "warm": ctx.proc.userdata.get("warm"),
        "job_context_ok": get_job_context() is ctx,
    }
    await ctx.room.local_participant.publish_data(
        json.dumps(report), reliable=True, topic=REPORT_TOPIC
    )
    # The job lasts while the room is connected: returning here would not end it either,
    # but waiting makes the intent explicit.
    disconnected = asyncio.Event()
    ctx.room.on("disconnected", lambda *_: disconnected.set())
    if ctx.room.isconnected():
        await disconnected.wait()


if __name__ == "__main__":
    cli.run_app(
        WorkerOptions(entrypoint_fnc=entrypoint, prewarm_fnc=prewarm, agent_name="lka-listener")
    )
