"""Deleting the room a job's join made anew (issue 17, item 16).

A room deleted between LiveKit's assignment and the agent's join is created again by the
join (the server's auto_create), under a new sid. The job notices, leaves and fails at once
(lkrun.context.room_gone), but the room would stay until the server's empty_timeout, and a
client could join it meanwhile. The daemon, which has the API key, deletes it: only if it is
the room that join made (the sid the job joined, not the one it was assigned) and nobody but
agents is in it, so that it is purely our own side effect.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
from livekit import api
from livekit.protocol import models

from lkrun.credentials import Credentials
from lkrun.shared.jobpipe import RoomGone
from lkrun.shared.participant_kinds import is_dependent
from lkrun.shared.text import describe

log = logging.getLogger("lkrun.rooms")

API_TIMEOUT = 5.0  # for the whole clean-up: not worth holding the daemon's shutdown for long
# What a call to LiveKit's server API may raise: it refused (TwirpError) or was not reached.
API_ERRORS = (api.TwirpError, aiohttp.ClientError, asyncio.TimeoutError, OSError)


def livekit_api(credentials: Credentials) -> api.LiveKitAPI:
    """A client of LiveKit's server API (RoomService, AgentDispatchService) for the daemon's
    own calls; callers bound them with asyncio.wait_for."""
    return api.LiveKitAPI(
        url=credentials.http_url,
        api_key=credentials.api_key,
        api_secret=credentials.api_secret,
        failover=False,  # region failover is a LiveKit Cloud feature; stay on this URL
    )


def not_found(exc: api.TwirpError) -> bool:
    """Whether LiveKit answered that the room or participant does not exist."""
    return exc.code == api.TwirpErrorCode.NOT_FOUND


def keep_reason(
    gone: RoomGone, room: models.Room | None, participants: Sequence[models.ParticipantInfo]
) -> str:
    """Why the room now named ``gone.room`` must not be deleted, or "" if it may be.

    The rule: it is the room the job's join made (its sid is the joined one, so not the
    assigned one) and no one but agents is in it.
    """
    if room is None:
        return "it is gone already"
    if room.sid == gone.assigned_sid:
        return "it is the room the job was assigned"
    if room.sid != gone.joined_sid:
        return f"it is another room (sid {room.sid}) than the one the job's join made"
    others = [p.identity for p in participants if not is_dependent(p.kind)]
    if others:
        return f"participants other than agents and egress are in it: {', '.join(others[:5])}"
    return ""


class RoomJanitor:
    """Deletes the rooms jobs' joins made anew, through LiveKit's room service."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    async def remove_recreated(self, gone: RoomGone, *, agent: str, job_id: str) -> bool:
        """Delete the room ``gone`` describes if ``keep_reason`` allows; whether it was.
        Never raises for LiveKit's faults: the job has ended either way."""
        data: dict[str, Any] = gone.fields()  # the JSON log line's fields
        extra = {"agent": agent, "job_id": job_id, "fields": data}
        try:
            # Three calls at most, bounded together: a daemon's shutdown waits for this.
            # (wait_for, not asyncio.timeout: lkrun runs on Python 3.10.)
            why_not = await asyncio.wait_for(self._clean(gone), API_TIMEOUT)
        except API_ERRORS as exc:
            data.update(deleted=False, error=describe(exc))
            log.warning("could not delete room %r, made anew by a join", gone.room, extra=extra)
            return False
        data["deleted"] = not why_not
        if why_not:
            data["kept"] = why_not
            log.info("room %r, made anew by a join, kept: %s", gone.room, why_not, extra=extra)
            return False
        log.info(
            "deleted room %r (sid %s), which the job's join had made anew after the assigned "
            "room (sid %s) was deleted",
            gone.room,
            gone.joined_sid,
            gone.assigned_sid,
            extra=extra,
        )
        return True

    async def _clean(self, gone: RoomGone) -> str:
        """Delete the room if keep_reason allows; why it was kept ("" if deleted)."""
        async with self._api() as lkapi:
            why_not = await self._check(lkapi, gone)
            if not why_not:
                await lkapi.room.delete_room(api.DeleteRoomRequest(room=gone.room))
        return why_not

    async def _check(self, lkapi: api.LiveKitAPI, gone: RoomGone) -> str:
        listed = await lkapi.room.list_rooms(api.ListRoomsRequest(names=[gone.room]))
        room = next((r for r in listed.rooms if r.name == gone.room), None)
        if room is None:
            return keep_reason(gone, None, [])
        try:
            people = await lkapi.room.list_participants(api.ListParticipantsRequest(room=gone.room))
        except api.TwirpError as exc:
            if not_found(exc):  # deleted meanwhile: as good
                return keep_reason(gone, None, [])
            raise
        return keep_reason(gone, room, people.participants)

    def _api(self) -> api.LiveKitAPI:
        return livekit_api(self.credentials)
