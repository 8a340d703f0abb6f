"""Asking LiveKit to send an agent to a room (AgentDispatchService)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
from livekit import api

from lkrun.credentials import Credentials


class DispatchError(Exception):
    """LiveKit could not be reached or refused the dispatch."""


@dataclass(frozen=True)
class Dispatch:
    id: str
    agent: str
    room: str
    metadata: str


async def create_dispatch(creds: Credentials, *, room: str, agent: str, metadata: str) -> Dispatch:
    request = api.CreateAgentDispatchRequest(agent_name=agent, room=room, metadata=metadata)
    try:
        async with api.LiveKitAPI(
            url=creds.http_url,
            api_key=creds.api_key,
            api_secret=creds.api_secret,
            timeout=aiohttp.ClientTimeout(total=15),
            failover=False,  # region failover is a LiveKit Cloud feature; stay on this URL
        ) as lkapi:
            result = await lkapi.agent_dispatch.create_dispatch(request)
    except api.TwirpError as exc:
        raise DispatchError(f"LiveKit at {creds.url} refused the dispatch: {exc.message}") from exc
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        raise DispatchError(f"cannot reach LiveKit at {creds.url}: {reason}") from exc
    return Dispatch(
        id=result.id, agent=result.agent_name, room=result.room, metadata=result.metadata
    )
