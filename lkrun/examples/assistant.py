"""A voice assistant written for livekit-agents, exactly as its docs write one.

Nothing here knows about lkrun: the same file runs with ``python assistant.py start`` under
the official worker, or under lkrun from a manifest entry naming ``...assistant:server``.
Its speech-to-text, LLM and text-to-speech go through LiveKit Inference, which signs its
requests with the project's API key, so the manifest entry sets ``pass_credentials = true``
and the URL must be a LiveKit Cloud project's.
"""

from livekit import agents
from livekit.agents import Agent, AgentServer, AgentSession, JobProcess, inference


class Assistant(Agent):
    def __init__(self) -> None:
        super().__init__(
            instructions="You are a helpful voice AI assistant. Keep your answers short."
        )


def prewarm(proc: JobProcess) -> None:
    # Once per process, before its job: the voice activity detector's model.
    proc.userdata["vad"] = inference.VAD(model="silero")


server = AgentServer(setup_fnc=prewarm)


@server.rtc_session(agent_name="assistant")
async def assistant(ctx: agents.JobContext) -> None:
    session = AgentSession(
        stt="assemblyai/universal-streaming:en",
        llm="openai/gpt-4.1-mini",
        tts="cartesia/sonic-3:9626c31c-bec5-4cca-baa8-f8ba9e84c8bc",
        vad=ctx.proc.userdata["vad"],
    )
    await session.start(room=ctx.room, agent=Assistant())
    await session.generate_reply(instructions="Greet the user and offer your assistance.")


if __name__ == "__main__":
    agents.cli.run_app(server)
