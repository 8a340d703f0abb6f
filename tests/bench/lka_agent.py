"""The agent of the bench's ``agents`` workload: one livekit-agents module, run by both hosts.

A text-only ``AgentSession`` with an in-process echo LLM, started the way
``tests/lka_apps/voice.py`` starts one: no STT, TTS or VAD, turn detection off, room audio
off, text in and out, so nothing leaves the machine. It imports only livekit-agents,
livekit-rtc and the standard library, never lkrun.

- lkrun runs it from a manifest entry ``entrypoint = "tests.bench.lka_agent:server"``.
- The official worker runs it through ``tests/bench/official_worker.py`` with
  ``BENCH_WORKLOAD=agents``, which applies the bench's load settings to this very
  ``server`` and calls ``cli.run_app(server)``; ``python lka_agent.py start`` runs it with
  the framework's defaults.

Events go to $BENCH_EVENTS as JSON lines (one ``O_APPEND`` write each), on both hosts:

- ``prewarm``: the setup function ran in a job process (idle or on demand), with its pid.
- ``entrypoint``: the entrypoint was called; ``entrypoint_at`` is ``time.time()`` in the
  job process and ``received_at`` is ``RunningJobInfo.received_at``: the official worker's
  wall-clock receipt of the AvailabilityRequest, or under lkrun the daemon's ``offered_at``
  (handed to the job in its start message). ``entrypoint_at - received_at`` is
  offer -> entrypoint.
- ``session_started``: ``AgentSession.start`` returned (the agent is in the room).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

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
    cli,
    get_job_context,
    llm,
    room_io,
)

EVENTS = os.environ.get("BENCH_EVENTS", "")


def emit(event: str, **fields: Any) -> None:
    if not EVENTS:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}) + "\n"
    # One O_APPEND write per line: lines from many processes never interleave.
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class EchoLLM(llm.LLM):
    """Answers "<prefix>: <last user message>"; the prefix is the job process's userdata."""

    def chat(
        self,
        *,
        chat_ctx: llm.ChatContext,
        tools: list[llm.Tool] | None = None,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
        parallel_tool_calls: NotGivenOr[bool] = NOT_GIVEN,
        tool_choice: NotGivenOr[llm.ToolChoice] = NOT_GIVEN,
        extra_kwargs: NotGivenOr[dict[str, Any]] = NOT_GIVEN,
    ) -> EchoLLMStream:
        return EchoLLMStream(self, chat_ctx=chat_ctx, tools=tools or [], conn_options=conn_options)


class EchoLLMStream(llm.LLMStream):
    async def _run(self) -> None:
        user_text = next(
            (m.text_content or "" for m in reversed(self.chat_ctx.messages()) if m.role == "user"),
            "",
        )
        prefix = get_job_context().proc.userdata["prefix"]
        delta = llm.ChoiceDelta(role="assistant", content=f"{prefix}: {user_text}")
        self._event_ch.send_nowait(llm.ChatChunk(id="echo", delta=delta))


def prewarm(proc: JobProcess) -> None:
    proc.userdata["prefix"] = "echo"
    emit("prewarm")


server = AgentServer(setup_fnc=prewarm)


@server.rtc_session(agent_name=os.environ.get("BENCH_AGENT_NAME", "bench-lka"))
async def entrypoint(ctx: JobContext) -> None:
    entrypoint_at = time.time()
    info = ctx._info  # RunningJobInfo: the host's dispatch timeline for this job
    emit(
        "entrypoint",
        job_id=ctx.job.id,
        room=ctx.job.room.name,
        entrypoint_at=entrypoint_at,
        received_at=info.received_at or None,
        accepted_at=getattr(info, "accepted_at", 0.0) or None,
        assigned_at=getattr(info, "assigned_at", 0.0) or None,
        launched_at=getattr(info, "launched_at", 0.0) or None,
    )
    # vad=None and turn_detection=None: no default silero VAD and no (cloud) turn detector.
    session: AgentSession = AgentSession(
        llm=EchoLLM(), vad=None, turn_handling=TurnHandlingOptions(turn_detection=None)
    )
    await session.start(
        room=ctx.room,
        agent=Agent(instructions="Repeat what the user says."),
        room_options=room_io.RoomOptions(
            audio_input=False, audio_output=False, text_input=True, text_output=True
        ),
    )
    emit("session_started", job_id=ctx.job.id, room=ctx.job.room.name)
    # Returning keeps the job (and its session) alive until the room disconnects.


if __name__ == "__main__":
    cli.run_app(server)
