"""A text-only AgentSession that says which livekit-agents it runs on.

Fixture for tests/test_framework_versions.py: one file, importing only livekit-agents and the
standard library (not lkrun, not tests.*), so it runs under any virtualenv that has
livekit-agents; the manifest names it as a file entrypoint. It is written against the API
every version lkrun hosts shares (1.7 and 1.8: AgentServer, TurnHandlingOptions,
room_io.RoomOptions, llm.LLMStream._run).

Text sent on topic lk.chat is answered on lk.transcription with "<version>: <text>", where
<version> is the ``livekit.agents.__version__`` the job imported, and the agent participant
carries the attributes ``lka.version`` (the same) and ``lka.prefix`` (sys.prefix: the
virtualenv). If LKA_EVENTS names a file, the job appends one JSON line per event to it:
``entrypoint`` (with the version, the prewarm pid and the job context's session directory,
which the framework's cleanup removes), ``session_closed`` (the AgentSession's "close", with
its reason) and ``shutdown`` (with the job's reason).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import livekit.agents
from livekit.agents import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    Agent,
    AgentServer,
    AgentSession,
    APIConnectOptions,
    JobContext,
    JobProcess,
    NotGivenOr,
    TurnHandlingOptions,
    llm,
    room_io,
)

VERSION = livekit.agents.__version__


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


class VersionEchoLLM(llm.LLM):
    """Answers "<livekit-agents version>: <last user message>"."""

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> VersionEchoStream:
        return VersionEchoStream(
            self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options
        )


class VersionEchoStream(llm.LLMStream):
    async def _run(self) -> None:
        user_text = next(
            (m.text_content or "" for m in reversed(self.chat_ctx.messages()) if m.role == "user"),
            "",
        )
        delta = llm.ChoiceDelta(role="assistant", content=f"{VERSION}: {user_text}")
        self._event_ch.send_nowait(llm.ChatChunk(id="echo", delta=delta))


def prewarm(proc: JobProcess) -> None:
    proc.userdata["prewarm_pid"] = os.getpid()


server = AgentServer(setup_fnc=prewarm)


# The manifest key is the name lkrun registers; the same name here spares a check warning.
@server.rtc_session(agent_name=os.environ.get("LKA_AGENT_NAME", "lka-versions"))
async def entrypoint(ctx: JobContext) -> None:
    log_event(
        "entrypoint",
        job_id=ctx.job.id,
        version=VERSION,
        prefix=sys.prefix,
        prewarm_pid=ctx.proc.userdata.get("prewarm_pid"),
        session_directory=str(ctx.session_directory),
    )

    async def on_shutdown(reason: str) -> None:
        log_event("shutdown", job_id=ctx.job.id, reason=reason)

    ctx.add_shutdown_callback(on_shutdown)
    # vad=None and turn_detection=None: no default silero VAD and no (cloud) turn detector.
    session: AgentSession = AgentSession(
        llm=VersionEchoLLM(), vad=None, turn_handling=TurnHandlingOptions(turn_detection=None)
    )
    session.on("close", lambda ev: log_event("session_closed", reason=ev.reason.value))
    await session.start(
        room=ctx.room,
        agent=Agent(instructions="Repeat what the user says."),
        room_options=room_io.RoomOptions(
            audio_input=False, audio_output=False, text_input=True, text_output=True
        ),
    )
    await ctx.room.local_participant.set_attributes(
        {"lka.version": VERSION, "lka.prefix": sys.prefix}
    )
