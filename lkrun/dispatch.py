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
        async with _api(creds) as lkapi:
            result = await lkapi.agent_dispatch.create_dispatch(request)
    except api.TwirpError as exc:
        raise DispatchError(f"LiveKit at {creds.url} refused the dispatch: {exc.message}") from exc
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        reason = str(exc) or type(exc).__name__
        raise DispatchError(f"cannot reach LiveKit at {creds.url}: {reason}") from exc
    return Dispatch(
        id=result.id, agent=result.agent_name, room=result.room, metadata=result.metadata
    )


@dataclass(frozen=True)
class Started:
    job_id: str
    participant_identity: str
    worker_id: str
    seconds: float


class WaitTimeout(Exception):
    """No job for the dispatch was running in time."""


async def wait_running(
    creds: Credentials, dispatch: Dispatch, *, started: float, timeout: float
) -> Started:
    """Poll the server's dispatch state until a job of this dispatch is running.

    The server's state, not a local daemon's, so it works whichever host took the job.
    """
    loop = asyncio.get_running_loop()
    try:
        async with _api(creds) as lkapi:
            while loop.time() - started < timeout:
                found = await lkapi.agent_dispatch.list_dispatch(room_name=dispatch.room)
                for job in (j for d in found if d.id == dispatch.id for j in d.state.jobs):
                    if job.state.status in (api.JobStatus.JS_RUNNING, api.JobStatus.JS_SUCCESS):
                        return Started(
                            job_id=job.id,
                            participant_identity=job.state.participant_identity,
                            worker_id=job.state.worker_id,
                            seconds=loop.time() - started,
                        )
                await asyncio.sleep(0.1)
    except api.TwirpError as exc:
        raise DispatchError(f"LiveKit at {creds.url} refused ListDispatch: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise DispatchError(f"cannot reach LiveKit at {creds.url}: {exc}") from exc
    raise WaitTimeout


def _api(creds: Credentials) -> api.LiveKitAPI:
    return api.LiveKitAPI(
        url=creds.http_url,
        api_key=creds.api_key,
        api_secret=creds.api_secret,
        timeout=aiohttp.ClientTimeout(total=15),
        failover=False,  # region failover is a LiveKit Cloud feature; stay on this URL
    )


def diagnose(agent: str, room: str, local: dict[str, object] | None) -> list[str]:
    """The likely reasons no job started, most specific first, each with how to check it."""
    import fnmatch

    agents = local.get("agents", []) if local else []
    mine = [a for a in agents if isinstance(a, dict) and a.get("registered_name") == agent]
    if not mine:
        where = "the local lkrun daemon does not serve it" if local else "no local lkrun daemon"
        return [
            f"no worker is registered under the name {agent!r} ({where}): check `lkrun status` "
            "on each host that should serve it; names are case-sensitive, and automatic agents "
            "register without a name, so they cannot be dispatched by name",
            "a brand-new name can take a moment to reach the room service: try again",
        ]
    status = mine[0]
    reasons = []
    if local and local.get("phase") in ("draining", "stopping"):
        reasons.append(
            "the local lkrun daemon is draining (it received SIGTERM) and takes no new jobs"
        )
    if not status.get("connected"):
        reasons.append(
            f"agent {agent!r} on this host is not registered with LiveKit "
            f"({status.get('last_error') or 'connecting'}): check `lkrun status`"
        )
    rooms = status.get("rooms") or []
    if isinstance(rooms, list) and rooms and not any(fnmatch.fnmatchcase(room, g) for g in rooms):
        reasons.append(
            f"room {room!r} matches none of agent {agent!r}'s rooms patterns {rooms}: "
            "this host declines it (see the daemon log for 'declined job')"
        )
    if status.get("full"):
        reasons.append(
            f"agent {agent!r} on this host is full ({status.get('jobs')}/{status.get('max_jobs')} "
            "jobs, or CPU over load_threshold, or draining): check `lkrun status` and "
            "`lkrun jobs ls`"
        )
    if not reasons:
        reasons.append(
            f"agent {agent!r} on this host is registered and accepting, so another worker with "
            "that name may have taken or declined the job: check `lkrun jobs ls --all` on each "
            "host and the daemon logs for 'declined job'"
        )
    return reasons
