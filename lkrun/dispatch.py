"""Asking LiveKit to send an agent to a room (AgentDispatchService)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from livekit import api
from livekit.protocol import models

from lkrun.api.control import DaemonStatus
from lkrun.credentials import Credentials

# The attribute the official worker, and lkrun, give an agent participant: its agent name.
AGENT_NAME_ATTRIBUTE = "lk.agent.name"
# lkrun's: the name of the daemon that runs the job ([daemon] name, else the host name).
DAEMON_ATTRIBUTE = "lkrun.daemon"


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
    job_id: str  # "" when only the agent participant was seen (not an lkrun agent)
    participant_identity: str
    worker_id: str
    seconds: float
    seen_in: str  # where the start was seen: "this host", "the room" or "the dispatch record"
    daemon: str = ""  # the lkrun daemon that runs it, when known


class WaitTimeout(Exception):
    """No job for the dispatch was running in time."""


LocalJobs = Callable[[], Awaitable[list[dict[str, Any]]]]
RECORD_EVERY = 10  # polls of the room between two reads of the server's dispatch record


async def wait_running(
    creds: Credentials,
    dispatch: Dispatch,
    *,
    started: float,
    timeout: float,
    local_jobs: LocalJobs | None = None,
) -> Started:
    """Poll until a job of this dispatch is running, seen where it shows first: the local
    daemon's record, the agent participant in the room (whichever host took the job), or
    the server's dispatch record, which lags: livekit-server fills it only when its agent
    check ends, up to 5 s after the job started."""
    loop = asyncio.get_running_loop()
    since_ms = int(time.time() * 1000) - int((loop.time() - started) * 1000) - CLOCK_SLACK_MS
    polls = 0
    try:
        async with _api(creds) as lkapi:
            while loop.time() - started < timeout:
                found = await _on_this_host(local_jobs, dispatch)
                found = found or await _in_the_room(lkapi, dispatch, since_ms)
                if found is None and polls % RECORD_EVERY == 0:
                    found = await _in_the_record(lkapi, dispatch)
                if found is not None:
                    job_id, identity, worker, where, daemon = found
                    seconds = loop.time() - started
                    return Started(job_id, identity, worker, seconds, where, daemon)
                polls += 1
                await asyncio.sleep(0.1)
    except api.TwirpError as exc:
        raise DispatchError(f"LiveKit at {creds.url} refused a request: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise DispatchError(f"cannot reach LiveKit at {creds.url}: {exc}") from exc
    raise WaitTimeout


CLOCK_SLACK_MS = 2000  # the server's clock and ours: an agent that joined since then is ours

# When a dispatch shows no job by then, the server dropped it: its agent check (5 s, see
# wait_running) is over, so the record lists every job the dispatch got.
RETRY_AFTER = 8.0
RETRIES = 2

# Called as (dropped dispatch, its replacement, seconds since the first was created).
OnRetry = Callable[[Dispatch, Dispatch, float], None]


async def dispatch_and_wait(
    creds: Credentials,
    *,
    room: str,
    agent: str,
    metadata: str,
    timeout: float,
    local_jobs: LocalJobs | None = None,
    retry_after: float = RETRY_AFTER,
    retries: int = RETRIES,
    on_retry: OnRetry | None = None,
) -> tuple[Dispatch, Started | None]:
    """Create a dispatch and wait until its job runs; None if none did within ``timeout``.

    LiveKit drops a dispatch that finds no available worker (every one full, draining, or
    at load >= 0.7) and never retries it, though CreateDispatch succeeded. So when no job
    of the dispatch exists ``retry_after`` seconds on, neither on this host nor in the
    server's record, it is deleted and created again, at most ``retries`` times.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    created = await create_dispatch(creds, room=room, agent=agent, metadata=metadata)
    left = retries
    while True:
        elapsed = loop.time() - started
        window = min(timeout, elapsed + retry_after) if left else timeout
        try:
            running = await wait_running(
                creds, created, started=started, timeout=window, local_jobs=local_jobs
            )
            return created, running
        except WaitTimeout:
            pass
        if loop.time() - started >= timeout:
            return created, None
        if await job_exists(creds, created, local_jobs):
            left = 0  # it got a job that is still starting: wait for it, not for another
            continue
        left -= 1
        await delete_dispatch(creds, created)
        dropped, created = (
            created,
            await create_dispatch(creds, room=room, agent=agent, metadata=metadata),
        )
        if on_retry is not None:
            on_retry(dropped, created, loop.time() - started)


async def job_exists(creds: Credentials, dispatch: Dispatch, local_jobs: LocalJobs | None) -> bool:
    """Whether the dispatch got a job at all, in any state, here or on any host."""
    if local_jobs is not None:
        try:
            if any(j.get("dispatch_id") == dispatch.id for j in await local_jobs()):
                return True
        except Exception:  # no local daemon: the record tells
            pass
    try:
        async with _api(creds) as lkapi:
            found = await lkapi.agent_dispatch.list_dispatch(room_name=dispatch.room)
    except api.TwirpError as exc:
        raise DispatchError(f"LiveKit at {creds.url} refused a request: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise DispatchError(f"cannot reach LiveKit at {creds.url}: {exc}") from exc
    return any(d.id == dispatch.id and d.state.jobs for d in found)


async def delete_dispatch(creds: Credentials, dispatch: Dispatch) -> None:
    """Delete a dispatch that got no job, so that it cannot get one late as well."""
    try:
        async with _api(creds) as lkapi:
            await lkapi.agent_dispatch.delete_dispatch(dispatch.id, dispatch.room)
    except api.TwirpError as exc:
        if exc.code != api.TwirpErrorCode.NOT_FOUND:  # gone already: as good
            raise DispatchError(f"LiveKit at {creds.url} refused a request: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise DispatchError(f"cannot reach LiveKit at {creds.url}: {exc}") from exc


Found = tuple[str, str, str, str, str]  # job id, identity, worker id, where, daemon


async def _on_this_host(local_jobs: LocalJobs | None, dispatch: Dispatch) -> Found | None:
    if local_jobs is None:
        return None
    try:
        jobs = await local_jobs()
    except Exception:  # no local daemon (or an old one): the room tells
        return None
    for job in jobs:
        if job.get("dispatch_id") == dispatch.id and job.get("status") in ("running", "success"):
            return (
                str(job["id"]),
                str(job.get("identity", "")),
                str(job.get("worker_id", "")),
                "this host",
                str(job.get("daemon", "")),
            )
    return None


async def _in_the_room(lkapi: api.LiveKitAPI, dispatch: Dispatch, since_ms: int) -> Found | None:
    try:
        listed = await lkapi.room.list_participants(api.ListParticipantsRequest(room=dispatch.room))
    except api.TwirpError as exc:
        if exc.code == api.TwirpErrorCode.NOT_FOUND:  # the room is not there yet
            return None
        raise
    for p in listed.participants:
        if (
            p.kind == models.ParticipantInfo.Kind.AGENT
            and p.attributes.get(AGENT_NAME_ATTRIBUTE) == dispatch.agent
            and p.joined_at_ms >= since_ms
        ):
            job_id = p.attributes.get("lkrun.job_id", "")
            return job_id, p.identity, "", "the room", p.attributes.get(DAEMON_ATTRIBUTE, "")
    return None


async def _in_the_record(lkapi: api.LiveKitAPI, dispatch: Dispatch) -> Found | None:
    found = await lkapi.agent_dispatch.list_dispatch(room_name=dispatch.room)
    for job in (j for d in found if d.id == dispatch.id for j in d.state.jobs):
        if job.state.status in (api.JobStatus.JS_RUNNING, api.JobStatus.JS_SUCCESS):
            state = job.state
            identity, worker = state.participant_identity, state.worker_id
            return job.id, identity, worker, "the dispatch record", ""
    return None


def _api(creds: Credentials) -> api.LiveKitAPI:
    return api.LiveKitAPI(
        url=creds.http_url,
        api_key=creds.api_key,
        api_secret=creds.api_secret,
        timeout=aiohttp.ClientTimeout(total=15),
        failover=False,  # region failover is a LiveKit Cloud feature; stay on this URL
    )


def diagnose(agent: str, room: str, local: DaemonStatus | None) -> list[str]:
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
