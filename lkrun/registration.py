"""One agent's worker registration with LiveKit: the /agent WebSocket, kept alive forever.

The registration is a transport. What the server says comes out as events, in the order it
said them (``next_event``): an offer, an assignment, a termination, the registration
confirmed, a connection lost. What goes back goes through it: the answer to an offer
(``answer``), job statuses (``update_job``: in order, handed to a live socket at least
once, through lkrun.job_updates), the worker's load (``load_changed``, on connecting and every
STATUS_REFRESH). It reconnects with capped backoff. What to answer, and what to do with a
job, is its consumer's business (lkrun.agent_host).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from google.protobuf.message import DecodeError
from livekit import api
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun import __version__
from lkrun.credentials import Credentials
from lkrun.decisions import Decision, Decline
from lkrun.job_updates import JobUpdates
from lkrun.load import WorkerLoad
from lkrun.logs import agent_logger
from lkrun.shared.text import one_line

log = logging.getLogger("lkrun.registration")

REGISTER_TIMEOUT = 10.0
HEARTBEAT = 10.0  # WebSocket ping interval; the connection is dropped if a pong is late
STATUS_REFRESH = 5.0  # resend the worker status this often even if nothing changed
BACKOFF_BASE = 0.5
BACKOFF_CAP = 15.0
STABLE_CONNECTION = 30.0  # seconds up after which a lost connection starts the backoff anew

JOB_TYPES = {
    "room": proto.JT_ROOM,
    "publisher": proto.JT_PUBLISHER,
    "participant": proto.JT_PARTICIPANT,
}


class AuthError(Exception):
    """The server rejected our credentials: retrying cannot help."""


@dataclass(frozen=True)
class WorkerSpec:
    """What LiveKit sees of an agent; changing any of it needs a new registration."""

    agent_name: str  # "" for automatic dispatch
    job_type: str
    namespace: str
    permissions: models.ParticipantPermission


# -- what the server says: the events ----------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """The server asks whether we take ``job``: Registration.answer says."""

    job: proto.Job
    received: float  # time.perf_counter() when its frame arrived: how long answering took
    connection: int  # the connection it came on: the answer goes on that one or nowhere


@dataclass(frozen=True)
class Assigned:
    """The server gives us a job we (most likely) said yes to."""

    assignment: proto.JobAssignment
    worker_id: str  # the registration's it came to


@dataclass(frozen=True)
class Terminated:
    """The server ends a job: its dispatch was deleted, or its agent left the room."""

    job_id: str


@dataclass(frozen=True)
class Registered:
    """The server confirmed the registration (its pong): dispatches reach the worker now."""

    worker_id: str
    again: bool  # not the first: the registration had been lost


@dataclass(frozen=True)
class AvailableSeen:
    """The server has taken the connection's first AVAILABLE status: a dispatch made from
    now on finds this worker (before, it finds it FULL, or not at all, and is dropped)."""

    connection: int


@dataclass(frozen=True)
class Lost:
    """A connection ended: the server forgot the offers it made on it."""

    connection: int


RegistrationEvent = Offer | Assigned | Terminated | Registered | AvailableSeen | Lost


def availability_response(job_id: str, decision: Decision) -> proto.AvailabilityResponse:
    if isinstance(decision, Decline):
        return proto.AvailabilityResponse(
            job_id=job_id, available=False, terminate=decision.terminate
        )
    return proto.AvailabilityResponse(
        job_id=job_id,
        available=True,
        participant_identity=decision.identity,
        participant_name=decision.name,
        participant_metadata=decision.metadata,
        participant_attributes=dict(decision.attributes),
    )


def agent_ws_url(url: str) -> str:
    if url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    return url.rstrip("/") + "/agent"


@dataclass
class RegistrationState:
    connected: bool = False
    worker_id: str = ""
    server_version: str = ""
    reconnects: int = 0
    last_error: str = ""
    connected_since: float | None = None  # time.monotonic(): only durations are taken of it
    available_seen: bool = False  # the server took this connection's first AVAILABLE


class Registration:
    """Keeps one worker registered, reconnecting with capped backoff until cancelled."""

    def __init__(
        self,
        *,
        label: str,
        spec: WorkerSpec,
        credentials: Credentials,
        load: Callable[[], WorkerLoad],
        session: aiohttp.ClientSession,
    ) -> None:
        self.label = label  # the agent's name in the manifest, for logs
        self.log = agent_logger(log, label)
        self.spec = spec
        self.credentials = credentials
        self.load = load  # the worker's load now, as the server should see it
        self.session = session
        self.state = RegistrationState()
        # Job status updates must reach the server even across a reconnect.
        self.updates = JobUpdates()
        self._events: asyncio.Queue[RegistrationEvent] = asyncio.Queue()
        self._connection = 0  # the number of the current (or last) connection
        # The current connection's messages other than job updates; None between connections.
        self._outbox: asyncio.Queue[proto.WorkerMessage] | None = None
        self._last_load: WorkerLoad | None = None
        self._registered = asyncio.Event()
        self._registrations = 0
        self._last_ping = 0  # the newest ping's timestamp: each one differs from the last
        self._seen_ping: int | None = None  # the ping behind this connection's first AVAILABLE
        # Each job assigned and not yet ended -> the connection its assignment came on.
        self._assigned_on: dict[str, int] = {}

    async def wait_registered(self) -> None:
        await self._registered.wait()

    async def next_event(self) -> RegistrationEvent:
        """What the server said next (or that a connection was confirmed, or lost)."""
        return await self._events.get()

    async def run(self) -> None:
        """Stay registered. Returns never; raises AuthError on bad credentials."""
        failures = 0
        while True:
            try:
                await self._session()
            except AuthError:
                raise
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ProtocolError) as exc:
                self.state.last_error = one_line(exc)
            except Exception as exc:  # a bug must not end the registration for good
                self.log.exception("unexpected error in the registration")
                self.state.last_error = one_line(exc)
            # Only a connection that stayed up a while resets the backoff: a server that
            # accepts and then closes at once must not be hammered several times a second.
            up_since = self.state.connected_since
            if up_since is not None and time.monotonic() - up_since >= STABLE_CONNECTION:
                failures = 0
            self._disconnected()
            delay = backoff(failures)
            failures += 1
            self.log.warning(
                "registration lost (%s); reconnecting in %.1fs",
                self.state.last_error or "connection closed",
                delay,
            )
            await asyncio.sleep(delay)
            self.state.reconnects += 1

    # -- what goes back ------------------------------------------------------------------

    def answer(self, offer: Offer, decision: Decision) -> bool:
        """Send ``decision`` as the answer to ``offer``. False, and nothing is sent, when the
        connection the offer came on is gone: the server forgot the offer with it."""
        if self._outbox is None or offer.connection != self._connection:
            return False
        response = availability_response(offer.job.id, decision)
        # A yes holds a slot from its reservation on: the status that counts it goes first,
        # on the same connection, so the server has the load (it handles a worker's
        # messages in order) before it assigns this job, and before it weighs any job
        # request made after the assignment.
        self.load_changed()
        self._outbox.put_nowait(proto.WorkerMessage(availability=response))
        return True

    def update_job(self, job_id: str, status: proto.JobStatus.ValueType, error: str = "") -> None:
        # Tagged with the connection the job came on: after that one ends, livekit-server
        # ignores the job's updates (see lkrun.job_updates), and flush need not wait for them.
        if status in (proto.JS_SUCCESS, proto.JS_FAILED):
            connection = self._assigned_on.pop(job_id, None)
        else:
            connection = self._assigned_on.get(job_id)
        self.updates.put(job_id, status, error, connection=connection)

    async def flush(self, timeout: float) -> bool:
        """Wait until every job status update a server can still take was handed to the
        socket; False on timeout. (Not that the server read it: see lkrun.job_updates.)"""
        return await self.updates.flush(timeout)

    def load_changed(self) -> None:
        """Push the current load now if it differs from what the server last saw."""
        if self._outbox is not None:
            self._send_load(force=False)

    # -- the connection ----------------------------------------------------------------

    async def _session(self) -> None:
        headers = {"Authorization": f"Bearer {self._token()}"}
        try:
            ws = await self.session.ws_connect(
                agent_ws_url(self.credentials.url),
                headers=headers,
                heartbeat=HEARTBEAT,
                timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                max_msg_size=16 * 1024 * 1024,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise AuthError(
                    f"LiveKit at {self.credentials.url} rejected API key "
                    f"{self.credentials.api_key!r} (HTTP {exc.status}): check the key and secret"
                ) from exc
            raise
        async with ws:
            await self._register(ws)
            self._connection += 1  # offers may come from here on
            self._outbox = outbox = asyncio.Queue()
            reader = asyncio.create_task(self._read(ws))
            writer = asyncio.create_task(self._write(ws, outbox))
            deliverer = asyncio.create_task(self._deliver_updates(ws))
            refresher = asyncio.create_task(self._refresh_load())
            watchdog = asyncio.create_task(self._expect_confirmation(ws))
            tasks = (reader, writer, deliverer, refresher, watchdog)
            try:
                self._send_load(force=True)
                # Until the server hangs up or a write fails: that ends the connection too.
                await asyncio.wait((reader, writer, deliverer), return_when=asyncio.FIRST_COMPLETED)
                for task in (reader, writer, deliverer):
                    if task.done():
                        task.result()  # why it ended, for the log and status
            finally:
                self._outbox = None
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                self.updates.connection_ended(self._connection)
                self._events.put_nowait(Lost(self._connection))

    def _token(self) -> str:
        return (
            api.AccessToken(self.credentials.api_key, self.credentials.api_secret)
            .with_grants(api.VideoGrants(agent=True))
            .to_jwt()
        )

    async def _register(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        request = proto.RegisterWorkerRequest(
            type=JOB_TYPES[self.spec.job_type],
            agent_name=self.spec.agent_name,
            version=f"lkrun/{__version__}",
            namespace=self.spec.namespace,
            allowed_permissions=self.spec.permissions,
        )
        await ws.send_bytes(proto.WorkerMessage(register=request).SerializeToString())
        msg = await asyncio.wait_for(ws.receive(), REGISTER_TIMEOUT)
        if msg.type != aiohttp.WSMsgType.BINARY:
            raise ProtocolError(f"expected a register response, got {msg.type.name}")
        reply = proto.ServerMessage.FromString(msg.data)
        if reply.WhichOneof("message") != "register":
            raise ProtocolError(f"expected a register response, got {reply.WhichOneof('message')}")
        self.state.worker_id = reply.register.worker_id
        self.state.server_version = reply.register.server_info.version
        # The server answers register *before* it adds the worker to its pool; a dispatch in
        # between finds no worker and is dropped. It answers a ping only from its pool, so
        # the pong is what makes the registration real.
        await ws.send_bytes(self._ping().SerializeToString())

    def _ping(self) -> proto.WorkerMessage:
        # Pongs echo the timestamp: a distinct one per ping tells which ping was answered.
        self._last_ping = max(int(time.time() * 1000), self._last_ping + 1)
        return proto.WorkerMessage(ping=proto.WorkerPing(timestamp=self._last_ping))

    def _confirmed(self) -> None:
        if self.state.connected:
            return
        self.state.connected = True
        self.state.connected_since = time.monotonic()
        self.state.last_error = ""
        self._registered.set()
        self._registrations += 1
        self._events.put_nowait(Registered(self.state.worker_id, self._registrations > 1))
        self.log.info(
            "registered as worker %s (%s, LiveKit %s)",
            self.state.worker_id,
            self.spec.agent_name or "automatic dispatch",
            self.state.server_version or "unknown version",
        )

    async def _expect_confirmation(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            await asyncio.wait_for(self._registered.wait(), REGISTER_TIMEOUT)
        except asyncio.TimeoutError:
            self.state.last_error = "the server did not answer the registration's ping"
            await ws.close()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    received = time.perf_counter()
                    try:
                        decoded = proto.ServerMessage.FromString(msg.data)
                    except DecodeError as exc:
                        raise ProtocolError(f"undecodable message from server: {exc}") from exc
                    self._dispatch(decoded, received)
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    raise ProtocolError(f"websocket error: {ws.exception()}")
            code = ws.close_code
            self.state.last_error = f"server closed the connection (code {code})"
        finally:
            # The connection is over from this moment: an answer made before _session
            # wakes up to tear it down would be queued for a writer about to be cancelled,
            # and answer() would say it went.
            self._outbox = None

    def _dispatch(self, msg: proto.ServerMessage, received: float) -> None:
        kind = msg.WhichOneof("message")
        if kind == "availability":
            self._events.put_nowait(Offer(msg.availability.job, received, self._connection))
        elif kind == "assignment":
            self._assigned_on[msg.assignment.job.id] = self._connection
            self._events.put_nowait(Assigned(msg.assignment, self.state.worker_id))
        elif kind == "termination":
            self._events.put_nowait(Terminated(msg.termination.job_id))
        elif kind == "pong":
            self._confirmed()
            if msg.pong.last_timestamp == self._seen_ping and not self.state.available_seen:
                self.state.available_seen = True
                self._events.put_nowait(AvailableSeen(self._connection))
        elif kind == "go_away":
            self.log.info("server asked us to go away: %s", msg.go_away.reason)

    def _send_load(self, *, force: bool) -> None:
        load = self.load()
        if not force and not load.differs(self._last_load):
            return
        self._last_load = load
        status = proto.WS_FULL if load.full else proto.WS_AVAILABLE
        # Always send load: an update without it resets the server's view to 0.
        update = proto.UpdateWorkerStatus(status=status, load=load.load, job_count=load.job_count)
        self._put(proto.WorkerMessage(update_worker=update))
        if status == proto.WS_AVAILABLE and self._seen_ping is None and self._outbox is not None:
            # The server handles a worker's messages in order and answers a ping at once:
            # the pong to this one says the AVAILABLE before it has been taken.
            ping = self._ping()
            self._seen_ping = ping.ping.timestamp
            self._put(ping)

    async def _refresh_load(self) -> None:
        while True:
            await asyncio.sleep(STATUS_REFRESH)
            self._send_load(force=True)

    def _put(self, msg: proto.WorkerMessage) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    async def _write(
        self, ws: aiohttp.ClientWebSocketResponse, outbox: asyncio.Queue[proto.WorkerMessage]
    ) -> None:
        # Beside _deliver_updates: aiohttp writes each frame whole, whoever sends it.
        try:
            while True:
                msg = await outbox.get()
                await ws.send_bytes(msg.SerializeToString())
        finally:
            self._outbox = None  # nothing written from here: answer() must say so (see _read)

    async def _deliver_updates(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Job status updates, oldest first, once the registration is confirmed. One that is
        not written (the connection dropped) stays first in line for the next connection."""
        await self._registered.wait()
        while True:
            update = await self.updates.next()
            await ws.send_bytes(proto.WorkerMessage(update_job=update).SerializeToString())
            self.updates.sent(update)

    def _disconnected(self) -> None:
        if self.state.connected:
            self.state.connected = False
            self.state.connected_since = None
        self._registered.clear()
        self._last_load = None
        self._seen_ping = None
        self.state.available_seen = False


class ProtocolError(Exception):
    """The server said something we did not expect."""


def backoff(failures: int) -> float:
    """Capped exponential backoff with jitter, so a fleet does not reconnect in lockstep."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2**failures))
    return random.uniform(ceiling / 2, ceiling)
