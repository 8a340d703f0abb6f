"""What an entrypoint receives: the job, an unconnected room, and the job's lifecycle hooks.

An entrypoint is ``async def entrypoint(ctx: JobContext) -> None``. The job lasts
while the room is connected: returning from the entrypoint after ``connect()``
keeps the job alive until the room disconnects or ``ctx.shutdown()`` is called.
Returning without connecting ends the job.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from livekit import rtc

from lkrun.shared import empty_room
from lkrun.shared.jobpipe import RoomGone
from lkrun.shared.lineage import ATTEMPT, RECOVERED_FROM, lineage
from lkrun.shared.participant_kinds import is_dependent
from lkrun.shared.tasks import BackgroundTasks

ShutdownCallback = Callable[[str], Awaitable[None] | None]
# What on_track runs for each subscribed track: handler(track, publication, participant).
TrackHandler = Callable[
    [rtc.Track, rtc.RemoteTrackPublication, rtc.RemoteParticipant], Awaitable[None]
]
_T = TypeVar("_T")
SID_TIMEOUT = 5.0  # how long the room's sid may take to arrive after a connect


class RoomGoneError(Exception):
    """The room the job was assigned no longer exists: joining it made a new one."""


@dataclass(frozen=True)
class JobInfo:
    """The job LiveKit assigned, as plain values."""

    id: str
    agent_name: str
    job_type: str  # room | publisher | participant
    room: str
    room_sid: str
    dispatch_id: str
    metadata: str  # the dispatch's metadata
    namespace: str
    participant_identity: str  # the participant a publisher/participant job is about
    raw: Mapping[str, Any] = field(repr=False)  # the protobuf Job as a dict
    # The dispatch's attributes (lkrun's recovery puts lkrun.recovered_from there).
    attributes: Mapping[str, str] = field(default_factory=dict)
    # A redispatch of a failed job (lkrun.recovery): the job it replaces ("" if none) and
    # its attempt (0 for a call's first job, 1 for its first redispatch...).
    recovered_from: str = ""
    attempt: int = 0

    @classmethod
    def from_dict(cls, job: Mapping[str, Any], start: Mapping[str, Any] | None = None) -> JobInfo:
        """From the start message's ``job``; the start message itself (``start``) says
        whether it recovers a failed job (else the job's attributes do, as an older daemon's
        start has no such fields)."""
        room = job.get("room") or {}
        participant = job.get("participant") or {}
        job_type = str(job.get("type", "JT_ROOM")).removeprefix("JT_").lower()
        attributes = {str(k): str(v) for k, v in (job.get("attributes") or {}).items()}
        start = start or {}
        recovered_from, attempt = lineage(
            start.get("recovered_from", attributes.get(RECOVERED_FROM)),
            start.get("attempt", attributes.get(ATTEMPT)),
        )
        return cls(
            id=job.get("id", ""),
            agent_name=job.get("agentName", ""),
            job_type=job_type,
            room=room.get("name", ""),
            room_sid=room.get("sid", ""),
            dispatch_id=job.get("dispatchId", ""),
            metadata=job.get("metadata", ""),
            namespace=job.get("namespace", ""),
            participant_identity=participant.get("identity", ""),
            raw=job,
            attributes=attributes,
            recovered_from=recovered_from,
            attempt=attempt,
        )


class JobContext:
    """The entrypoint's handle on its job. Created by the runner, one per process."""

    def __init__(
        self,
        *,
        job: JobInfo,
        url: str,
        token: str,
        identity: str,
        logger: logging.Logger,
        userdata: Any = None,
        empty_timeout: float = 0.0,
    ) -> None:
        self.job = job
        self.identity = identity
        self.logger = logger
        self.userdata = userdata  # what the agent's prewarm function returned
        self.room = rtc.Room()
        self._url = url
        self._token = token
        self._callbacks: list[ShutdownCallback] = []
        self._shutdown = asyncio.Event()
        self._shutdown_reason = ""
        self._failure = ""  # why the job failed, if the context found out (see connect)
        self._room_gone: RoomGone | None = None  # the daemon's to clean up (see connect)
        self._cause = ""  # why the job ended, for the daemon, when the context knows best
        # The agent's empty_timeout: alone in the room that long (after connect), it ends.
        self._empty = (
            empty_room.EmptyRoomWatch(
                self.room, empty_timeout, self._room_empty, logger, is_company
            )
            if empty_timeout > 0
            else None
        )
        self._drain = asyncio.Event()
        self._drain_callbacks: list[Callable[[], Awaitable[None] | None]] = []
        self._background = BackgroundTasks(on_error=self._task_failed)
        self._after_connect: list[Callable[[], None]] = []
        self._joining: asyncio.Future[None] | None = None  # the room's connect (see _leave)
        self.room.on("disconnected", self._on_disconnected)

    @property
    def recovered_from(self) -> str:
        """The id of the failed job this one replaces ("" if none): lkrun redispatched the
        agent to the call after its job crashed (manifest ``on_failure = "redispatch"``).
        The caller was already talking to an agent: resume, do not greet anew."""
        return self.job.recovered_from

    @property
    def attempt(self) -> int:
        """0 for a call's first job, 1 for its first redispatch, 2 for the next..."""
        return self.job.attempt

    async def connect(self, *, auto_subscribe: bool = True, announce: bool = True) -> None:
        """Join the room with the token LiveKit minted for this job.

        With ``announce``, the participant then sets its attribute ``lkrun.job_id``. Besides
        telling clients which job serves them, an attribute change makes LiveKit announce the
        participant to the room at once; a participant that publishes nothing is otherwise
        announced in the server's next 3-second batch.
        """
        options = rtc.RoomOptions(auto_subscribe=auto_subscribe)
        self._joining = asyncio.ensure_future(self.room.connect(self._url, self._token, options))
        await asyncio.shield(self._joining)  # a job that ends meanwhile still leaves: _leave
        if gone := await room_gone(self.room, self.job.room, self.job.room_sid, self.logger):
            self._failure, self._room_gone = str(gone), gone
            self.shutdown(str(gone))  # the first reason is recorded, before "disconnected"
            await self.room.disconnect()
            raise RoomGoneError(str(gone))
        if self._empty is not None:
            self._empty.start()
        for hook in self._after_connect:  # e.g. on_track(subscribe=True): who is already in
            hook()
        if announce:
            self._background.spawn(self._announce())

    async def _announce(self) -> None:
        try:
            await asyncio.wait_for(
                self.room.local_participant.set_attributes({"lkrun.job_id": self.job.id}), 5
            )
        except Exception as exc:  # e.g. no can_update_metadata permission: only slower
            self.logger.debug("could not set the lkrun.job_id attribute: %r", exc)

    def create_task(
        self, coro: Coroutine[Any, Any, _T], *, name: str | None = None
    ) -> asyncio.Future[_T]:
        """Run ``coro`` beside the entrypoint for as long as the job lasts.

        The job owns the task: it is cancelled when the job ends (after the shutdown
        callbacks, before the room disconnects), and an exception it raises is logged
        rather than lost. For fire-and-forget work from event handlers, such as
        ``ctx.create_task(ctx.room.local_participant.publish_data(...))``.
        """
        return self._background.spawn(coro, name=name)

    def on_track(
        self,
        handler: TrackHandler,
        *,
        kind: rtc.TrackKind.ValueType | None = None,
        sources: Collection[rtc.TrackSource.ValueType] = (),
        identity: str | None = None,
        subscribe: bool = False,
    ) -> None:
        """Run ``handler(track, publication, participant)`` as a job task for every remote
        track subscribed (of ``kind``, from one of ``sources``, of the participant
        ``identity``, each if given), those already subscribed included. The task is
        cancelled when its track is unsubscribed (its participant left, or unpublished it)
        or the job ends: put cleanup in ``finally``.

        With ``subscribe``, for ``connect(auto_subscribe=False)``, it also subscribes to
        every matching publication, present or future, and to nothing else.

        Call it before ``connect()`` so no track is missed.
        """
        wanted = _TrackFilter(kind, frozenset(sources), identity)
        running: dict[str, asyncio.Future[None]] = {}

        def start(
            track: rtc.Track, pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
        ) -> None:
            if not wanted.matches(pub, who) or track.sid in running:
                return
            task = self.create_task(handler(track, pub, who), name=f"track {track.sid}")
            running[track.sid] = task
            task.add_done_callback(
                lambda t: running.pop(track.sid, None) if running.get(track.sid) is t else None
            )

        def stop(
            track: rtc.Track, pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant
        ) -> None:
            task = running.pop(track.sid, None)
            if task is not None:
                task.cancel()

        self.room.on("track_subscribed", start)
        self.room.on("track_unsubscribed", stop)
        for who, pub in _publications(self.room):
            if pub.track is not None and pub.subscribed:
                start(pub.track, pub, who)
        if subscribe:
            self._subscribe(wanted)

    def _subscribe(self, wanted: _TrackFilter) -> None:
        """Subscribe to every publication ``wanted`` matches: those there at connect, and
        those that come later."""

        def want(pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant) -> None:
            if wanted.matches(pub, who) and not pub.subscribed:
                pub.set_subscribed(True)

        def joined(who: rtc.RemoteParticipant) -> None:
            for pub in who.track_publications.values():
                want(pub, who)

        def everyone() -> None:
            for who, pub in _publications(self.room):
                want(pub, who)

        self.room.on("track_published", want)
        self.room.on("participant_connected", joined)
        self._after_connect.append(everyone)
        if self.room.isconnected():
            everyone()

    def _task_failed(self, task: asyncio.Future[Any], exc: BaseException) -> None:
        name = task.get_name() if isinstance(task, asyncio.Task) else "a job task"
        self.logger.error("%s failed", name, exc_info=exc)

    async def _leave(self, grace: float) -> None:
        """Leave the room, also when the job ended while it was joining: a join cut short
        leaves a participant that nobody drives in the room until the server times it out
        (some 20 s). So the join ends first (bounded), then the room is left."""
        if self._empty is not None:
            self._empty.close()
        if self._joining is not None and not self._joining.done():
            with contextlib.suppress(Exception):  # a join that fails has nothing to leave
                await asyncio.wait_for(asyncio.shield(self._joining), grace)
        await asyncio.wait_for(self.room.disconnect(), grace)

    async def _close_tasks(self, grace: float) -> None:
        """Cancel what the job still runs in the background, and wait for it (bounded)."""
        self._background.cancel()
        try:
            await asyncio.wait_for(self._background.join(), grace)
        except asyncio.TimeoutError:
            self.logger.warning("job tasks still running %.1fs after being cancelled", grace)

    def add_shutdown_callback(self, callback: ShutdownCallback) -> None:
        """Run ``callback(reason)`` when the job ends, before the room disconnects."""
        self._callbacks.append(callback)

    def shutdown(self, reason: str = "") -> None:
        """End the job. The first reason given is the one recorded."""
        if not self._shutdown.is_set():
            self._shutdown_reason = reason
            self._shutdown.set()

    @property
    def draining(self) -> bool:
        """True once the daemon began draining: finish the conversation, then end the job."""
        return self._drain.is_set()

    async def wait_for_drain(self) -> None:
        await self._drain.wait()

    def add_drain_callback(self, callback: Callable[[], Awaitable[None] | None]) -> None:
        """Run ``callback()`` once when the daemon starts draining (deploy, scale-down)."""
        self._drain_callbacks.append(callback)

    def _start_drain(self) -> None:
        if self._drain.is_set():
            return
        self._drain.set()
        for callback in self._drain_callbacks:
            try:
                result = callback()
                if inspect.isawaitable(result):
                    self._background.spawn(result)
            except Exception:
                self.logger.exception("drain callback %r failed", callback)

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    @property
    def shutdown_reason(self) -> str:
        return self._shutdown_reason

    async def wait_for_shutdown(self) -> str:
        await self._shutdown.wait()
        return self._shutdown_reason

    async def wait_for_participant(self, identity: str | None = None) -> rtc.RemoteParticipant:
        """Wait until a participant (a given one, or any) is in the room."""
        found: asyncio.Future[rtc.RemoteParticipant] = asyncio.get_running_loop().create_future()

        def match(p: rtc.RemoteParticipant) -> None:
            if not found.done() and (identity is None or p.identity == identity):
                found.set_result(p)

        for p in self.room.remote_participants.values():
            match(p)
        self.room.on("participant_connected", match)
        try:
            return await found
        finally:
            self.room.off("participant_connected", match)

    def _room_empty(self) -> None:
        if not self._shutdown.is_set():  # only when it is why the job ends
            self._cause = empty_room.CAUSE
            self.shutdown(empty_room.REASON)

    def _on_disconnected(self, reason: Any = None) -> None:
        self.shutdown(f"room disconnected ({_reason_name(reason)})")

    async def _run_shutdown_callbacks(self, timeout: float) -> None:
        async def run_all() -> None:
            for callback in self._callbacks:
                try:
                    result = callback(self._shutdown_reason)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    self.logger.exception("shutdown callback %r failed", callback)

        try:
            await asyncio.wait_for(run_all(), timeout)
        except asyncio.TimeoutError:
            self.logger.warning("shutdown callbacks still running after %.1fs; going on", timeout)


@dataclass(frozen=True)
class _TrackFilter:
    kind: rtc.TrackKind.ValueType | None
    sources: frozenset[rtc.TrackSource.ValueType]
    identity: str | None

    def matches(self, pub: rtc.TrackPublication, who: rtc.RemoteParticipant) -> bool:
        return (
            (self.kind is None or pub.kind == self.kind)
            and (not self.sources or pub.source in self.sources)
            and (self.identity is None or who.identity == self.identity)
        )


def _publications(
    room: rtc.Room,
) -> Iterator[tuple[rtc.RemoteParticipant, rtc.RemoteTrackPublication]]:
    for who in list(room.remote_participants.values()):
        for pub in list(who.track_publications.values()):
            yield who, pub


def is_company(participant: rtc.RemoteParticipant) -> bool:
    """Whether a remote participant keeps a job company (its ``empty_timeout``): anyone
    livekit-server does not count as dependent (a caller, a SIP leg, an ingress...); agents
    of any name and egress (a recording) do not."""
    return not is_dependent(participant.kind)


async def room_gone(
    room: rtc.Room, name: str, assigned_sid: str, logger: logging.Logger
) -> RoomGone | None:
    """How the room just joined is not the one the job was assigned, or None if it is.

    A room deleted between the assignment and the join is created anew by the join, under a
    new sid; a job there would wait for ever in an empty room.
    """
    if not assigned_sid:  # nothing to compare with
        return None
    try:
        joined = await asyncio.wait_for(room.sid, SID_TIMEOUT)
    except asyncio.TimeoutError:
        logger.warning("the room's sid did not arrive within %gs; not checked", SID_TIMEOUT)
        return None
    if joined == assigned_sid:
        return None
    return RoomGone(room=name, assigned_sid=assigned_sid, joined_sid=joined)


def _reason_name(reason: Any) -> str:
    try:
        return rtc.DisconnectReason.Name(reason)  # type: ignore[attr-defined]
    except (AttributeError, ValueError, TypeError):
        return str(reason)
