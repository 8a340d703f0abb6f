"""An AgentServer with non-default settings and a request handler that accepts or rejects.

Fixture for "lkrun hosts unmodified livekit-agents apps": rooms named "deny-*" are rejected;
elsewhere the agent joins as "gate-<room>" with attribute lka.gate=yes, then publishes its
identity and attributes once on topic "lka.hello" and stays until the room ends.
"""

from __future__ import annotations

import asyncio
import json

from livekit.agents import (
    AgentServer,
    JobContext,
    JobRequest,
    WorkerPermissions,
    cli,
)

HELLO_TOPIC = "lka.hello"

server = AgentServer(
    permissions=WorkerPermissions(
        can_publish=False,
        can_subscribe=True,
        can_publish_data=True,
        can_update_metadata=True,
        hidden=False,
    ),
    num_idle_processes=1,
    job_memory_limit_mb=400,
    initialize_process_timeout=20,
    shutdown_process_timeout=7,
)


async def on_request(req: JobRequest) -> None:
    if req.room.name.startswith("deny-"):
        await req.reject()
        return
    await req.accept(
        identity=f"gate-{req.room.name}", name="Gatekeeper", attributes={"lka.gate": "yes"}
    )


@server.rtc_session(agent_name="lka-gate", on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    me = ctx.room.local_participant
    hello = {"identity": me.identity, "attrs": dict(me.attributes)}
    await me.publish_data(json.dumps(hello), reliable=True, topic=HELLO_TOPIC)
    disconnected = asyncio.Event()
    ctx.room.on("disconnected", lambda *_: disconnected.set())
    if ctx.room.isconnected():
        await disconnected.wait()


if __name__ == "__main__":
    cli.run_app(server)
