"""A text-only AgentSession with an in-process echo LLM, in the shape the official docs use.

Fixture for "lkrun hosts unmodified livekit-agents apps": AgentServer with a setup function,
an rtc_session with on_session_end, and shutdown callbacks. Text sent on topic lk.chat is
answered on lk.transcription with "<prefix>: <text>", where the prefix comes from prewarm.
No STT, TTS, VAD or turn detector, so nothing leaves the machine. If LKA_EVENTS names a file,
the job appends one JSON line per lifecycle event to it (for a shutdown-order test):
entrypoint, session_closed (AgentSession "close"), session_end (on_session_end),
room_disconnected (the room's "disconnected" event), room_state_disconnected (its connection
state turning disconnected), shutdown_callback (with the reason) and shutdown_callback_noarg.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import aiohttp
from livekit import rtc
from livekit.agents import (
    Agent,
    AgentServer,
    AgentSession,
    CloseEvent,
    JobContext,
    JobProcess,
    TurnHandlingOptions,
    cli,
    get_job_context,
    room_io,
)
from livekit.agents.utils import http_context

# The bench's agent answers the same way; one fake LLM for both (it imports no lkrun either).
from tests.bench.lka_agent import EchoLLM


def log_event(event: str, **fields: Any) -> None:
    """Append one JSON line to $LKA_EVENTS, in a single O_APPEND write."""
    path = os.environ.get("LKA_EVENTS")
    if not path:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def prewarm(proc: JobProcess) -> None:
    proc.userdata["prefix"] = "echo"
    proc.userdata["prewarm_pid"] = os.getpid()


async def on_session_end(ctx: JobContext) -> None:
    log_event("session_end", job_id=ctx.job.id)


server = AgentServer(setup_fnc=prewarm)


@server.rtc_session(agent_name="lka-voice", on_session_end=on_session_end)
async def entrypoint(ctx: JobContext) -> None:
    log_event(
        "entrypoint",
        job_id=ctx.job.id,
        room=ctx.room.name,
        agent_name=ctx.job.agent_name,
        prefix=ctx.proc.userdata.get("prefix"),
        prewarm_pid=ctx.proc.userdata.get("prewarm_pid"),
        job_context_ok=get_job_context() is ctx,
        http_session=isinstance(http_context.http_session(), aiohttp.ClientSession),
    )

    async def on_shutdown(reason: str) -> None:
        log_event("shutdown_callback", reason=reason)

    async def on_shutdown_noarg() -> None:
        log_event("shutdown_callback_noarg")

    ctx.add_shutdown_callback(on_shutdown)
    ctx.add_shutdown_callback(on_shutdown_noarg)

    def on_room_disconnected(reason: int) -> None:
        log_event("room_disconnected", reason=reason)

    # livekit-rtc 1.1.21 sometimes flips the state to disconnected without emitting
    # "disconnected" when the job itself disconnects; the state change is always emitted.
    def on_connection_state(state: int) -> None:
        if state == rtc.ConnectionState.CONN_DISCONNECTED:
            log_event("room_state_disconnected")

    ctx.room.on("disconnected", on_room_disconnected)
    ctx.room.on("connection_state_changed", on_connection_state)

    # vad=None and turn_detection=None: no default silero VAD and no (cloud) turn detector.
    session: AgentSession = AgentSession(
        llm=EchoLLM(), vad=None, turn_handling=TurnHandlingOptions(turn_detection=None)
    )

    def on_session_closed(ev: CloseEvent) -> None:
        log_event("session_closed", reason=ev.reason.value)

    session.on("close", on_session_closed)
    await session.start(
        room=ctx.room,
        agent=Agent(instructions="Repeat what the user says."),
        room_options=room_io.RoomOptions(
            audio_input=False, audio_output=False, text_input=True, text_output=True
        ),
    )


if __name__ == "__main__":
    cli.run_app(server)
