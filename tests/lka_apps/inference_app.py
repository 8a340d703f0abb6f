"""A bare-function app that uses a local model through the framework's inference executor.

Fixture for the shared inference process: each data message on topic "lka.infer" (a JSON
object, passed to the model as is) gets one reply on "lka.infer.reply": the model's answer
({"answer": {...}}) or the error do_inference raised ({"error": "..."}), with the request's
"n" echoed. The job stays until the room ends.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from livekit import rtc
from livekit.agents import JobContext

from tests.lka_apps.pid_runner import PidModel

REQUEST_TOPIC = "lka.infer"
REPLY_TOPIC = "lka.infer.reply"


async def serve_requests(ctx: JobContext) -> None:
    model = PidModel()
    tasks: set[asyncio.Task[None]] = set()

    async def answer(request: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"n": request.get("n")}
        try:
            reply["answer"] = await model.ask(request)
        except Exception as exc:
            reply["error"] = f"{type(exc).__name__}: {exc}"
        await ctx.room.local_participant.publish_data(
            json.dumps(reply), reliable=True, topic=REPLY_TOPIC
        )

    def on_data(packet: rtc.DataPacket) -> None:
        if packet.topic == REQUEST_TOPIC:
            task = asyncio.create_task(answer(json.loads(packet.data)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    ctx.room.on("data_received", on_data)
    await ctx.connect()
    disconnected = asyncio.Event()
    ctx.room.on("disconnected", lambda *_: disconnected.set())
    if ctx.room.isconnected():
        await disconnected.wait()


async def entrypoint(ctx: JobContext) -> None:
    await serve_requests(ctx)
