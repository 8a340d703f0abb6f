"""Registration against a FAKE agent endpoint, for faults the real server cannot produce.

The happy path is covered against the real livekit-server in test_serve.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from google.protobuf.message import DecodeError
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun import registration
from lkrun.credentials import Credentials
from lkrun.decisions import Acceptance, Decision, Decline
from lkrun.load import WorkerLoad
from lkrun.registration import (
    Assigned,
    AuthError,
    AvailableSeen,
    Lost,
    Offer,
    Registered,
    Registration,
    Terminated,
    WorkerSpec,
)
from lkrun.shared.text import one_line

Script = Callable[[web.WebSocketResponse, "FakeServer"], Awaitable[None]]


class FakeServer:
    """A stand-in /agent endpoint that runs a scripted conversation per connection."""

    def __init__(self, script: Script, status: int = 101) -> None:
        self.script = script
        self.status = status
        self.connections = 0
        self.received: list[proto.WorkerMessage] = []
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    async def hang(self) -> None:
        """Keep the connection open, saying nothing, until the fake shuts down."""
        await self._closing.wait()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.status != 101:
            return web.Response(status=self.status, text="unauthorized")
        self.connections += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await self.script(ws, self)
        await ws.close()
        return ws

    async def recv(self, ws: web.WebSocketResponse) -> proto.WorkerMessage:
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        parsed = proto.WorkerMessage.FromString(msg.data)
        self.received.append(parsed)
        return parsed

    async def accept_register(
        self, ws: web.WebSocketResponse, *, pong: bool = True
    ) -> proto.RegisterWorkerRequest:
        msg = await self.recv(ws)
        assert msg.WhichOneof("message") == "register"
        reply = proto.ServerMessage(
            register=proto.RegisterWorkerResponse(
                worker_id=f"AW_fake{self.connections}",
                server_info=models.ServerInfo(version="fake"),
            )
        )
        await ws.send_bytes(reply.SerializeToString())
        if pong:
            await self.answer_ping(ws)
        return msg.register

    async def answer_ping(self, ws: web.WebSocketResponse) -> None:
        """Like the real server once the worker is in its pool: pong the worker's ping."""
        ping = await self.recv(ws)
        assert ping.WhichOneof("message") == "ping", ping
        pong = proto.WorkerPong(last_timestamp=ping.ping.timestamp, timestamp=1)
        await ws.send_bytes(proto.ServerMessage(pong=pong).SerializeToString())

    async def __aenter__(self) -> FakeServer:
        app = web.Application()
        app.router.add_get("/agent", self.handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        self._closing.set()
        await self._runner.cleanup()


MARKER = proto.WorkerMessage(ping=proto.WorkerPing(timestamp=424242))


class Handler:
    """Consumes the registration's events as lkrun.agent_host does, with a fixed policy:
    rooms named no-* are declined. ``hold`` offers are answered only once their connection
    was lost (as an app's on_request still deciding then would)."""

    def __init__(self, hold: tuple[str, ...] = (), *, late_on_registered: bool = False) -> None:
        self.assignments: list[proto.JobAssignment] = []
        self.terminations: list[str] = []
        self.full = False
        self.answered: list[tuple[str, Decision, float]] = []
        self.registered: list[tuple[str, bool]] = []
        self.hold = hold
        self.held: list[Offer] = []
        self.late: list[tuple[str, bool]] = []  # held offers answered late: whether it went
        # Answer the held offers once registered again (the next connection up), not at Lost.
        self.late_on_registered = late_on_registered

    async def consume(self, reg: Registration) -> None:
        while True:
            event = await reg.next_event()
            if isinstance(event, Offer):
                if event.job.id in self.hold:
                    self.held.append(event)
                else:
                    self.answer(reg, event)
            elif isinstance(event, Assigned):
                self.assignments.append(event.assignment)
            elif isinstance(event, Terminated):
                self.terminations.append(event.job_id)
            elif isinstance(event, Registered):
                self.registered.append((event.worker_id, event.again))
                if event.again and self.late_on_registered:
                    self.answer_held(reg)
            elif isinstance(event, Lost) and not self.late_on_registered:
                self.answer_held(reg)

    def answer_held(self, reg: Registration) -> None:
        for offer in self.held:
            self.late.append((offer.job.id, self.answer(reg, offer)))
        # Behind any answer in the connection's outbox: once the server has this, it has
        # whatever the answers put there.
        reg._put(MARKER)

    def answer(self, reg: Registration, offer: Offer) -> bool:
        decision: Decision = Acceptance(identity=f"agent-{offer.job.id}")
        if offer.job.room.name.startswith("no-"):
            decision = Decline("rooms")
        sent = reg.answer(offer, decision)
        if sent:
            self.answered.append((offer.job.id, decision, time.perf_counter() - offer.received))
        return sent

    def worker_load(self) -> WorkerLoad:
        return WorkerLoad(full=self.full, load=0.5 if self.full else 0.0, job_count=0)


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registration, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(registration, "BACKOFF_CAP", 0.05)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def make_registration(url: str, handler: Handler, session: aiohttp.ClientSession) -> Registration:
    return Registration(
        label="test",
        spec=WorkerSpec(
            agent_name="tester",
            job_type="room",
            namespace="",
            permissions=models.ParticipantPermission(can_publish=True),
        ),
        credentials=Credentials(url, "key", "secret"),
        load=handler.worker_load,
        session=session,
    )


async def run_until(
    reg: Registration, condition: Callable[[], bool], handler: Handler | None = None
) -> None:
    """Run the registration (and ``handler`` on its events) until ``condition``."""
    task = asyncio.create_task(reg.run())
    consumer = asyncio.create_task(handler.consume(reg)) if handler else None
    try:
        deadline = time.monotonic() + 10
        while not condition():
            for running in (task, consumer):
                if running is not None and running.done():
                    running.result()
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.01)
    finally:
        for running in (task, consumer):
            if running is not None:
                running.cancel()
        await asyncio.gather(*(t for t in (task, consumer) if t), return_exceptions=True)


def record_session_ends(reg: Registration) -> list[tuple[BaseException | None, str]]:
    """How each of ``reg``'s connections ended: the exception (None if it returned) and the
    ``last_error`` that status showed right after."""
    ended: list[tuple[BaseException | None, str]] = []
    session = reg._session
    disconnected = reg._disconnected
    raised: list[BaseException | None] = []

    async def recorded() -> None:
        try:
            await session()
        except Exception as exc:
            raised.append(exc)
            raise
        raised.append(None)

    def on_disconnect() -> None:
        ended.append((raised[-1] if raised else None, reg.state.last_error))
        disconnected()

    reg._session = recorded  # type: ignore[method-assign]
    reg._disconnected = on_disconnect  # type: ignore[method-assign]
    return ended


def job(job_id: str, room: str) -> proto.Job:
    return proto.Job(id=job_id, room=models.Room(name=room), type=proto.JT_ROOM)


async def test_register_then_offer_assignment_termination(session: Any) -> None:
    answers: list[tuple[proto.AvailabilityResponse, float]] = []

    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        register = await server.accept_register(ws)
        assert register.agent_name == "tester" and register.allowed_permissions.can_publish
        for job_id, room in (("AJ_1", "yes-room"), ("AJ_2", "no-room")):
            sent = time.perf_counter()
            await ws.send_bytes(
                proto.ServerMessage(
                    availability=proto.AvailabilityRequest(job=job(job_id, room))
                ).SerializeToString()
            )
            while (msg := await server.recv(ws)).WhichOneof("message") != "availability":
                pass
            answers.append((msg.availability, time.perf_counter() - sent))
        await ws.send_bytes(
            proto.ServerMessage(
                assignment=proto.JobAssignment(job=job("AJ_1", "yes-room"), token="tok")
            ).SerializeToString()
        )
        await ws.send_bytes(
            proto.ServerMessage(termination=proto.JobTermination(job_id="AJ_1")).SerializeToString()
        )
        await server.hang()

    handler = Handler()
    async with FakeServer(script) as server:
        reg = make_registration(server.url, handler, session)
        await run_until(reg, lambda: bool(handler.terminations), handler)
    (yes, yes_latency), (no, _) = answers
    assert yes.available and yes.participant_identity == "agent-AJ_1"
    assert not no.available
    assert yes_latency < 1.0  # generous: the server allows ~3 s
    assert [a.token for a in handler.assignments] == ["tok"]
    assert handler.terminations == ["AJ_1"]
    # Each answer was timed from the frame's arrival to the decision.
    assert [(j, type(d).__name__) for j, d, _ in handler.answered] == [
        ("AJ_1", "Acceptance"),
        ("AJ_2", "Decline"),
    ]
    assert all(0 <= s < 1.0 for _, _, s in handler.answered)
    assert reg.state.worker_id == "AW_fake1" and reg.state.server_version == "fake"


async def offer_then_hang_up(ws: web.WebSocketResponse, server: FakeServer) -> None:
    """The first connection offers AJ_held and hangs up; the next ones only listen."""
    await server.accept_register(ws)
    if server.connections == 1:
        offer = proto.AvailabilityRequest(job=job("AJ_held", "yes-room"))
        await ws.send_bytes(proto.ServerMessage(availability=offer).SerializeToString())
        return
    with contextlib.suppress(AssertionError):  # the client hangs up at the end
        while True:
            await server.recv(ws)


async def test_an_offer_of_a_lost_connection_is_answered_never(session: Any) -> None:
    """Decided after its connection dropped: the server forgot it, nothing goes out."""

    handler = Handler(hold=("AJ_held",))
    async with FakeServer(offer_then_hang_up) as server:
        reg = make_registration(server.url, handler, session)
        await run_until(reg, lambda: bool(handler.late) and server.connections >= 2, handler)
    assert handler.late == [("AJ_held", False)] and handler.answered == []
    assert not [m for m in server.received if m.WhichOneof("message") == "availability"]


async def test_an_offer_of_a_lost_connection_is_not_answered_on_the_next(session: Any) -> None:
    """Decided once the next connection is registered: the answer must not go out on it
    (the real Registration's check, not a fake's)."""

    handler = Handler(hold=("AJ_held",), late_on_registered=True)
    async with FakeServer(offer_then_hang_up) as server:
        reg = make_registration(server.url, handler, session)
        await run_until(reg, lambda: MARKER in server.received, handler)
    assert handler.registered == [("AW_fake1", False), ("AW_fake2", True)]
    assert handler.late == [("AJ_held", False)] and handler.answered == []
    assert not [m for m in server.received if m.WhichOneof("message") == "availability"]


async def test_auth_failure_is_fatal(session: Any) -> None:
    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        raise AssertionError("never connects")

    async with FakeServer(script, status=401) as server:
        reg = make_registration(server.url, Handler(), session)
        with pytest.raises(AuthError, match="rejected API key 'key'"):
            await asyncio.wait_for(reg.run(), 10)


async def test_malformed_frame_reconnects(session: Any) -> None:
    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        await server.accept_register(ws)
        if server.connections == 1:
            await ws.send_bytes(b"\xff\xff\xff not protobuf")
        await server.hang()

    handler = Handler()
    async with FakeServer(script) as server:
        reg = make_registration(server.url, handler, session)
        ended = record_session_ends(reg)
        await run_until(reg, lambda: len(handler.registered) >= 2 and reg.state.connected, handler)
    assert reg.state.reconnects >= 1
    # The first connection ended on the bad frame: a protocol error caused by the decoder,
    # with the reason shown in status until the registration was confirmed again.
    first, reason = ended[0]
    assert isinstance(first, registration.ProtocolError)
    assert isinstance(first.__cause__, DecodeError)
    assert reason == one_line(first)
    assert reg.state.last_error == ""  # cleared by the new registration
    assert [again for _, again in handler.registered][:2] == [False, True]


async def test_server_that_never_answers_register_is_retried(
    session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registration, "REGISTER_TIMEOUT", 0.2)

    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        if server.connections == 1:
            await server.recv(ws)  # swallow the register request, say nothing
            await server.hang()
        await server.accept_register(ws)
        await server.hang()

    async with FakeServer(script) as server:
        reg = make_registration(server.url, Handler(), session)
        await run_until(reg, lambda: reg.state.connected)
    assert server.connections == 2


async def test_job_updates_survive_a_reconnect(session: Any) -> None:
    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        if server.connections == 1:
            await server.accept_register(ws, pong=False)
            return  # drop the connection before the registration is confirmed
        await server.accept_register(ws)
        with contextlib.suppress(AssertionError):  # the client hangs up at the end
            while True:
                await server.recv(ws)

    handler = Handler()
    async with FakeServer(script) as server:
        reg = make_registration(server.url, handler, session)
        # Reported while no connection is up: must be delivered after the reconnect.
        reg.update_job("AJ_9", proto.JS_FAILED, "boom")

        def delivered() -> bool:
            return any(
                m.WhichOneof("message") == "update_job" and m.update_job.job_id == "AJ_9"
                for m in server.received
            )

        await run_until(reg, delivered)
    update = next(m.update_job for m in server.received if m.WhichOneof("message") == "update_job")
    assert update.status == proto.JS_FAILED and update.error == "boom"


async def test_worker_status_carries_load_and_full(
    session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registration, "STATUS_REFRESH", 3600.0)  # only changes are sent
    full_seen = asyncio.Event()

    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        await server.accept_register(ws)
        with contextlib.suppress(AssertionError):  # the client hangs up at the end
            while True:
                msg = await server.recv(ws)
                if msg.HasField("update_worker") and msg.update_worker.status == proto.WS_FULL:
                    full_seen.set()

    handler = Handler()
    async with FakeServer(script) as server:
        reg = make_registration(server.url, handler, session)

        def statuses() -> list[proto.UpdateWorkerStatus]:
            return [
                m.update_worker
                for m in server.received
                if m.WhichOneof("message") == "update_worker"
            ]

        async def flip() -> None:
            await reg.wait_registered()
            handler.full = True
            reg.load_changed()
            await full_seen.wait()
            handler.full = False  # a job ended: AVAILABLE goes out at once, not at a refresh
            reg.load_changed()

        flipper = asyncio.create_task(flip())
        await run_until(reg, lambda: [s.status for s in statuses()][-1:] == [proto.WS_AVAILABLE]
                        and len(statuses()) == 3)  # fmt: skip
        await flipper
    first, full, available = statuses()
    assert first.status == proto.WS_AVAILABLE and first.load == 0.0
    assert full.status == proto.WS_FULL and full.load == pytest.approx(0.5)
    assert available.status == proto.WS_AVAILABLE


async def test_available_is_seen_only_once_the_server_pongs_the_ping_behind_it(
    session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first AVAILABLE of a connection is followed by a ping: its pong, not the write,
    says the server has taken the status (what readiness and restart recovery wait for).
    A FULL first sends no such ping; the AVAILABLE after it does."""
    monkeypatch.setattr(registration, "STATUS_REFRESH", 3600.0)
    handler = Handler()
    handler.full = True
    seen: list[AvailableSeen] = []
    before_pong: list[bool] = []

    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        await server.accept_register(ws)
        first = await server.recv(ws)
        assert first.update_worker.status == proto.WS_FULL
        handler.full = False
        reg.load_changed()
        available = await server.recv(ws)
        assert available.update_worker.status == proto.WS_AVAILABLE
        ping = await server.recv(ws)
        assert ping.WhichOneof("message") == "ping"
        before_pong.append(reg.state.available_seen)  # written and read, not answered
        pong = proto.WorkerPong(last_timestamp=ping.ping.timestamp, timestamp=2)
        await ws.send_bytes(proto.ServerMessage(pong=pong).SerializeToString())
        await server.hang()

    async def consume(reg: Registration) -> None:
        while True:
            if isinstance(event := await reg.next_event(), AvailableSeen):
                seen.append(event)

    async with FakeServer(script) as server:
        reg = make_registration(server.url, handler, session)
        consumer = asyncio.create_task(consume(reg))
        try:
            await run_until(reg, lambda: bool(seen))
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
    assert before_pong == [False]
    assert [e.connection for e in seen] == [1]
    pings = [m for m in server.received if m.WhichOneof("message") == "ping"]
    assert len(pings) == 2 and pings[0].ping.timestamp != pings[1].ping.timestamp


async def test_registration_counts_only_once_the_server_pongs(
    session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server answers register before the worker is in its pool; only a pong proves it."""
    monkeypatch.setattr(registration, "REGISTER_TIMEOUT", 0.3)
    states: list[bool] = []

    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        if server.connections == 1:
            await server.accept_register(ws, pong=False)
            await server.hang()  # registered in name only: never pongs
        await server.accept_register(ws, pong=False)
        states.append(reg.state.connected)  # register answered, ping not yet
        await server.answer_ping(ws)
        await server.hang()

    handler = Handler()
    async with FakeServer(script) as server:
        reg = make_registration(server.url, handler, session)
        await run_until(reg, lambda: bool(handler.registered), handler)
    assert server.connections == 2
    assert states == [False]
    assert [again for _, again in handler.registered] == [False]


@pytest.mark.parametrize(("up", "stable", "expected"), [(0.0, 30.0, [0, 1, 2, 3]),
                                                         (0.3, 0.2, [0, 0, 0, 0])])  # fmt: skip
async def test_backoff_resets_only_after_a_connection_that_lasted(
    session: Any, monkeypatch: pytest.MonkeyPatch, up: float, stable: float, expected: list[int]
) -> None:
    """A server that accepts, confirms and closes at once is not retried at full speed."""
    monkeypatch.setattr(registration, "STABLE_CONNECTION", stable)
    seen: list[int] = []
    original = registration.backoff

    def recording(failures: int) -> float:
        seen.append(failures)
        return original(failures)

    monkeypatch.setattr(registration, "backoff", recording)

    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        await server.accept_register(ws)
        await asyncio.sleep(up)  # then a clean close

    async with FakeServer(script) as server:
        reg = make_registration(server.url, Handler(), session)
        await run_until(reg, lambda: len(seen) >= 4)
    assert seen[:4] == expected


async def test_job_updates_keep_their_order_when_a_write_fails(session: Any) -> None:
    class BrokenSocket:
        async def send_bytes(self, data: bytes) -> None:
            raise ConnectionResetError("gone")

    reg = make_registration("ws://127.0.0.1:1", Handler(), session)
    reg._registered.set()  # as after the server's pong
    reg.update_job("AJ_1", proto.JS_RUNNING)
    reg.update_job("AJ_1", proto.JS_SUCCESS)
    with pytest.raises(ConnectionResetError):
        await reg._deliver_updates(BrokenSocket())  # type: ignore[arg-type]
    statuses = [u.status for u in reg.updates.unsent()]
    assert statuses == [proto.JS_RUNNING, proto.JS_SUCCESS]


async def test_no_answer_is_taken_once_the_connection_s_reader_ended(session: Any) -> None:
    """Between the server's hang-up and the connection's teardown an answer would be queued
    for a writer about to be cancelled: answer() says False from the reader's end on."""

    class ClosedSocket:
        close_code = 1000

        def __aiter__(self) -> ClosedSocket:
            return self

        async def __anext__(self) -> Any:
            raise StopAsyncIteration

    reg = make_registration("ws://127.0.0.1:1", Handler(), session)
    reg._connection = 1
    reg._outbox = outbox = asyncio.Queue()  # as while connection 1 is up
    offer = Offer(job("AJ_1", "yes-room"), received=0.0, connection=1)
    await reg._read(ClosedSocket())  # type: ignore[arg-type]
    assert not reg.answer(offer, Acceptance(identity="i"))
    assert outbox.empty()
