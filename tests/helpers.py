"""Helpers shared by the end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from livekit import api, rtc

from lkrun.agent_host import AgentHost, HostSettings
from lkrun.credentials import Credentials
from lkrun.jobs.book import JobBook
from lkrun.manifest import ManifestError, parse_manifest
from tests.conftest import REPO, livekit_api, wait_for


def agent_table(
    name: str, entrypoint: str = "lkrun.examples.echo:entrypoint", **fields: Any
) -> str:
    lines = [f"[agents.{name}]", f'entrypoint = "{entrypoint}"']
    for key, value in fields.items():
        if isinstance(value, dict):  # an inline table
            items = ", ".join(f"{k} = {json.dumps(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {items} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


async def echo_roundtrip(room: rtc.Room, agent_identity: str, payload: bytes) -> bytes:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_data(packet: rtc.DataPacket) -> None:
        if packet.participant and packet.participant.identity == agent_identity and not got.done():
            got.set_result(packet.data)

    room.on("data_received", on_data)
    try:
        await room.local_participant.publish_data(
            payload, destination_identities=[agent_identity], topic="test"
        )
        return await asyncio.wait_for(got, 15)
    finally:
        room.off("data_received", on_data)


async def dispatch(server: Any, room: str, agent: str, metadata: str = "") -> str:
    async with livekit_api(server) as lk:
        d = await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=agent, room=room, metadata=metadata)
        )
    return d.id


async def job_in_room(daemon: Any, room: str, status: str | None = None) -> dict[str, Any]:
    async def find() -> dict[str, Any] | None:
        for job in await daemon.jobs():
            if job["room"] == room and (status is None or job["status"] == status):
                return job
        return None

    return await wait_for(find, 30, what=f"a {status or ''} job in room {room}")


async def status_is(daemon: Any, job_id: str, status: str) -> bool:
    job = await daemon.job(job_id)
    return job is not None and job["status"] == status


async def agent_full(daemon: Any, full: bool) -> bool:
    return (await daemon.status())["agents"][0]["full"] is full


def unit_host(session: Any, spec: Any, **extra: Any) -> AgentHost:
    """An AgentHost for tests that drive it directly: a LiveKit URL nothing listens on, a
    fresh job book, a 5 s shutdown timeout (``extra``: e.g. a fake registration)."""
    return AgentHost(
        spec=spec,
        workdir=Path(REPO),
        credentials=Credentials("ws://127.0.0.1:1", "key", "secret"),
        book=JobBook(),
        session=session,
        settings=HostSettings(shutdown_timeout=5),
        **extra,
    )


def assert_manifest_error(text: str, agent: str | None, field: str, message: str) -> None:
    """``text`` (an agents.toml, dedented) is refused with one line naming file, agent, field."""
    with pytest.raises(ManifestError) as info:
        parse_manifest(textwrap.dedent(text), "agents.toml")
    err = info.value
    assert (err.agent, err.field, err.message) == (agent, field, message)
    where = f"agent {agent!r}: " if agent else ""
    assert str(err) == f"agents.toml: {where}field {field!r}: {message}"
