"""One agent's worker registration with LiveKit: the /agent WebSocket, kept alive forever.

The registration speaks the protocol and nothing else. What to answer to an
offer, and what to do with an assignment, is the handler's business.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import aiohttp
from google.protobuf.message import DecodeError
from livekit import api
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun import __version__
from lkrun.credentials import Credentials
from lkrun.job_updates import JobUpdates
from lkrun.load import WorkerLoad
from lkrun.logs import agent_logger
from lkrun.shared.text import one_line

log = logging.getLogger("lkrun.registration")

_T = TypeVar("_T")

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


@dataclass(frozen=True)
class Acceptance:
    identity: str
    name: str = ""
    metadata: str = ""
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Decline:
    reason: str  # a short code for metrics: rooms, max_jobs, cpu, not_accepting, error
    text: str = ""
    terminate: bool = False  # end the job: LiveKit offers it to no other worker


Decision = Acceptance | Decline


class WorkerHandler(Protocol):
    # A decision, or one to come (an app's own request function): answered when it is made.
    def on_availability(self, job: proto.Job) -> Decision | Awaitable[Decision]: ...
    def on_answered(self, job_id: str, decision: Decision, seconds: float) -> None: ...
    def on_assignment(self, assignment: proto.JobAssignment) -> None: ...
    def on_termination(self, job_id: str) -> None: ...
    def on_registered(self, worker_id: str, again: bool) -> None: ...
    def worker_load(self) -> WorkerLoad: ...


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


class Registration:
    """Keeps one worker registered, reconnecting with capped backoff until cancelled."""

    def __init__(
        self,
        *,
        label: str,
        spec: WorkerSpec,
        credentials: Credentials,
        handler: WorkerHandler,
        session: aiohttp.ClientSession,
    ) -> None:
        self.label = label  # the agent's name in the manifest, for logs
        self.log = agent_logger(log, label)
        self.spec = spec
        self.credentials = credentials
        self.handler = handler
        self.session = session
        self.state = RegistrationState()
        self._outbox: asyncio.Queue[proto.WorkerMessage] | None = None
        # Job status updates must reach the server even across a reconnect.
        self.updates = JobUpdates()
        self._last_load: WorkerLoad | None = None
        self._registered = asyncio.Event()
        self._answers: dict[str, tuple[float, Decision]] = {}  # offers answered, not yet sent
        # Offers whose decision is to come (an app's own request function weighs them).
        self._deciding: dict[str, asyncio.Future[Decision]] = {}
        self._registrations = 0

    async def wait_registered(self) -> None:
        await self._registered.wait()

    async def run(self) -> None:
        """Stay registered. Returns never; raises AuthError on bad credentials."""
        try:
            await self._stay_registered()
        finally:
            self._drop_undecided()

    async def _stay_registered(self) -> None:
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

    # -- called by the handler's side -------------------------------------------------

    @property
    def worker_id(self) -> str:
        return self.state.worker_id

    def update_job(self, job_id: str, status: proto.JobStatus.ValueType, error: str = "") -> None:
        self.updates.put(job_id, status, error)

    async def flush(self, timeout: float) -> bool:
        """Wait until every job status update was written to the server; False on timeout."""
        return await self.updates.flush(timeout)

    def load_changed(self) -> None:
        """Push the handler's current load now if it differs from what the server last saw."""
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
            outbox: asyncio.Queue[proto.WorkerMessage] = asyncio.Queue()
            self._outbox = outbox
            writer = asyncio.create_task(self._write(ws, outbox))
            deliverer = asyncio.create_task(self._deliver_updates(ws))
            refresher = asyncio.create_task(self._refresh_load())
            watchdog = asyncio.create_task(self._expect_confirmation(ws))
            tasks = (writer, deliverer, refresher, watchdog)
            try:
                self._send_load(force=True)
                await self._read(ws, (writer, deliverer))
            finally:
                self._outbox = None
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

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
        ping = proto.WorkerPing(timestamp=int(time.time() * 1000))
        await ws.send_bytes(proto.WorkerMessage(ping=ping).SerializeToString())

    def _confirmed(self) -> None:
        if self.state.connected:
            return
        self.state.connected = True
        self.state.connected_since = time.monotonic()
        self.state.last_error = ""
        self._registered.set()
        self._registrations += 1
        self.handler.on_registered(self.state.worker_id, self._registrations > 1)
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

    async def _read(
        self, ws: aiohttp.ClientWebSocketResponse, writers: tuple[asyncio.Task[None], ...]
    ) -> None:
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
            for writer in writers:
                if writer.done():
                    writer.result()  # surface a write failure
                    return
        code = ws.close_code
        self.state.last_error = f"server closed the connection (code {code})"

    def _dispatch(self, msg: proto.ServerMessage, received: float) -> None:
        kind = msg.WhichOneof("message")
        if kind == "availability":
            self._answer(msg.availability.job, received)
        elif kind == "assignment":
            self._tell(self.handler.on_assignment, msg.assignment, msg.assignment.job.id)
        elif kind == "termination":
            self._tell(self.handler.on_termination, msg.termination.job_id, msg.termination.job_id)
        elif kind == "pong":
            self._confirmed()
        elif kind == "go_away":
            self.log.info("server asked us to go away: %s", msg.go_away.reason)

    def _tell(self, callback: Callable[[_T], None], arg: _T, job_id: str) -> None:
        """A handler's fault concerns one job: it must not drop the connection of them all."""
        try:
            callback(arg)
        except Exception:
            self.log.exception("handling a message about job %s failed", job_id)

    def _answer(self, job: proto.Job, received: float) -> None:
        # Answer at once: the server gives up on us after a few seconds.
        accept: Decision | Awaitable[Decision]
        try:
            accept = self.handler.on_availability(job)
        except Exception as exc:
            self.log.exception("deciding on job %s failed; declining", job.id)
            accept = Decline("error", str(exc))
        if inspect.isawaitable(accept):
            decision = asyncio.ensure_future(accept)
            self._deciding[job.id] = decision
            decision.add_done_callback(
                functools.partial(self._decided, job, received, self._outbox)
            )
            return
        self._send_answer(job, received, accept)

    def _decided(
        self,
        job: proto.Job,
        received: float,
        outbox: asyncio.Queue[proto.WorkerMessage] | None,
        decision: asyncio.Future[Decision],
    ) -> None:
        self._deciding.pop(job.id, None)
        if decision.cancelled():  # its connection dropped: the server forgot the offer
            return
        if (exc := decision.exception()) is not None:
            self.log.error("deciding on job %s failed; declining", job.id, exc_info=exc)
            accept: Decision = Decline("error", str(exc))
        else:
            accept = decision.result()
        if self._outbox is outbox:  # an offer of a lost connection gets no answer
            self._send_answer(job, received, accept)

    def _drop_undecided(self) -> None:
        for decision in list(self._deciding.values()):
            decision.cancel()
        self._deciding.clear()

    def _send_answer(self, job: proto.Job, received: float, accept: Decision) -> None:
        if isinstance(accept, Decline):
            response = proto.AvailabilityResponse(
                job_id=job.id, available=False, terminate=accept.terminate
            )
        else:
            response = proto.AvailabilityResponse(
                job_id=job.id,
                available=True,
                participant_identity=accept.identity,
                participant_name=accept.name,
                participant_metadata=accept.metadata,
                participant_attributes=dict(accept.attributes),
            )
        self._answers[job.id] = (received, accept)
        self._put(proto.WorkerMessage(availability=response))
        self.load_changed()

    def _send_load(self, *, force: bool) -> None:
        load = self.handler.worker_load()
        if not force and not load.differs(self._last_load):
            return
        self._last_load = load
        status = proto.WS_FULL if load.full else proto.WS_AVAILABLE
        # Always send load: an update without it resets the server's view to 0.
        update = proto.UpdateWorkerStatus(status=status, load=load.load, job_count=load.job_count)
        self._put(proto.WorkerMessage(update_worker=update))

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
        while True:
            msg = await outbox.get()
            await ws.send_bytes(msg.SerializeToString())
            if msg.WhichOneof("message") == "availability":
                self._answered(msg.availability.job_id)

    async def _deliver_updates(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Job status updates, oldest first, once the registration is confirmed. One that is
        not written (the connection dropped) stays first in line for the next connection."""
        await self._registered.wait()
        while True:
            update = await self.updates.next()
            await ws.send_bytes(proto.WorkerMessage(update_job=update).SerializeToString())
            self.updates.sent(update)

    def _answered(self, job_id: str) -> None:
        received, decision = self._answers.pop(job_id, (None, None))
        if received is not None and decision is not None:
            self.handler.on_answered(job_id, decision, time.perf_counter() - received)

    def _disconnected(self) -> None:
        self._answers.clear()
        self._drop_undecided()  # their offers died with the connection
        if self.state.connected:
            self.state.connected = False
            self.state.connected_since = None
        self._registered.clear()
        self._last_load = None


class ProtocolError(Exception):
    """The server said something we did not expect."""


def backoff(failures: int) -> float:
    """Capped exponential backoff with jitter, so a fleet does not reconnect in lockstep."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (2**failures))
    return random.uniform(ceiling / 2, ceiling)
