"""The agent host's event loop against a FAKE registration (no server): offers decided
concurrently by tasks it owns, an offer of a lost connection answered never and its slot
released, the answer stored once when made, a fault in one event not stopping the loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.agent_host import AgentHost
from lkrun.decisions import Acceptance, Decision, Decline
from lkrun.manifest import AgentSpec
from lkrun.registration import (
    Assigned,
    Lost,
    Offer,
    Registered,
    Registration,
    Terminated,
)
from lkrun.supervision.request_process import RequestRefused
from lkrun.supervision.supervisor import ASSIGNMENT_WAIT
from tests.helpers import unit_host
from tests.test_supervisor import FakeProcess, FakeProcesses, settle


class FakeRegistration(Registration):
    """FAKE transport: the test says what the server says (``feed``), and reads the answers
    that went out on the connection now up (``connection``)."""

    def __init__(self, **fields: Any) -> None:
        super().__init__(**fields)
        self.connection = 1
        self.answers: list[tuple[str, Decision]] = []
        self.state.connected = True

    def feed(self, event: Any) -> None:
        self._events.put_nowait(event)

    def offer(self, job_id: str, room: str = "r", *, connection: int = 0) -> Offer:
        job = proto.Job(id=job_id, room=models.Room(name=room), type=proto.JT_ROOM)
        offer = Offer(job, received=0.0, connection=connection or self.connection)
        self.feed(offer)
        return offer

    def answer(self, offer: Offer, decision: Decision) -> bool:
        if offer.connection != self.connection:
            return False
        self.answers.append((offer.job.id, decision))
        return True

    def answered(self) -> dict[str, str]:
        return {job_id: type(d).__name__ for job_id, d in self.answers}


class FakeRequests:
    """FAKE request process: each offer waits until the test decides it."""

    ready = True
    last_error = ""

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.cancelled: list[str] = []

    async def ask(self, job: proto.Job) -> dict[str, Any]:
        self.pending[job.id] = asyncio.get_running_loop().create_future()
        try:
            return await self.pending[job.id]
        except asyncio.CancelledError:
            self.cancelled.append(job.id)
            raise

    def decide(self, job_id: str, **answer: Any) -> None:
        self.pending[job_id].set_result(answer)

    def refuse(self, job_id: str, why: str) -> None:
        self.pending[job_id].set_exception(RequestRefused(why))


Host = tuple[AgentHost, FakeRegistration]


@pytest.fixture
async def make_host() -> AsyncIterator[Callable[..., Host]]:
    consumers: list[asyncio.Task[None]] = []
    hosts: list[AgentHost] = []
    async with aiohttp.ClientSession() as session:

        def make(*, requests: FakeRequests | None = None, **fields: Any) -> Host:
            spec = AgentSpec(name="a", entrypoint="m:f", start_method="spawn", **fields)
            host = unit_host(session, spec, registration=FakeRegistration)
            processes: Any = host.processes
            processes._loaded = True  # as once its code loaded: offers are weighed
            processes.requests = requests
            host.jobs.processes = FakeProcesses()  # type: ignore[assignment]
            consumers.append(asyncio.create_task(host.consume()))
            hosts.append(host)
            assert isinstance(host.registration, FakeRegistration)
            return host, host.registration

        yield make
        # The loops, and the offers still being decided (tasks each host owns).
        tasks = [*consumers, *(task for host in hosts for task in host._offers)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def offers_answered(host: AgentHost, result: str) -> float | None:
    return host.settings.metrics.registry.get_sample_value(
        "lkrun_offers_total", {"agent": "a", "result": result}
    )


async def test_offers_without_on_request_are_answered_by_the_rules(
    make_host: Callable[..., Host],
) -> None:
    host, reg = make_host(rooms=("r",), max_jobs=1)
    reg.offer("J1")
    reg.offer("J2", room="elsewhere")
    reg.offer("J3")  # the one slot is held by J1
    await settle()
    decisions = dict(reg.answers)
    assert isinstance(decisions["J1"], Acceptance) and decisions["J1"].identity
    assert [decisions[j].reason for j in ("J2", "J3")] == ["rooms", "max_jobs"]  # type: ignore[union-attr]
    assert host.job_count() == 1  # J1's reservation
    assert host.jobs.jobs["J1"].acceptance == decisions["J1"]  # stored as it went out
    assert (offers_answered(host, "accepted"), offers_answered(host, "declined")) == (1, 2)
    declines = host.settings.metrics.registry.get_sample_value(
        "lkrun_offer_declines_total", {"agent": "a", "reason": "max_jobs"}
    )
    assert declines == 1


async def test_the_loop_goes_on_while_an_app_decides(make_host: Callable[..., Host]) -> None:
    requests = FakeRequests()
    host, reg = make_host(requests=requests, max_jobs=4)
    reg.offer("J_slow")
    reg.offer("J_fast")
    reg.feed(Terminated("J_other"))  # read while both are being decided
    await settle()
    assert set(requests.pending) == {"J_slow", "J_fast"} and host.job_count() == 2
    requests.decide("J_fast", accept=True, name="Fast")
    requests.refuse("J_slow", "no answer from on_request within request_timeout=5s")
    await settle()
    assert [job_id for job_id, _ in reg.answers] == ["J_fast", "J_slow"]
    fast, slow = (d for _, d in reg.answers)
    assert isinstance(fast, Acceptance) and fast.name == "Fast"
    assert isinstance(slow, Decline) and slow.reason == "on_request"
    assert host.job_count() == 1  # the decline's slot went back at once


async def test_an_offer_whose_connection_dropped_is_never_answered(
    make_host: Callable[..., Host],
) -> None:
    requests = FakeRequests()
    host, reg = make_host(requests=requests, max_jobs=4)
    reg.offer("J_lost")
    reg.offer("J_late")
    await settle()
    assert host.job_count() == 2
    # The connection drops: J_lost's decision is given up at once. J_late's app answers
    # in the same moment, before the loop hears of the loss: it is not sent either.
    requests.decide("J_late", accept=True)
    reg.connection = 2
    reg.feed(Lost(1))
    await settle()
    assert requests.cancelled == ["J_lost"]
    assert reg.answers == [] and host.job_count() == 0
    assert offers_answered(host, "accepted") is None  # nothing was answered
    reg.offer("J_new")  # the new connection's offers are answered as ever
    await settle()
    requests.decide("J_new", accept=True)
    await settle()
    assert reg.answered() == {"J_new": "Acceptance"}


async def test_a_lost_connection_releases_the_offers_answered_on_it(
    make_host: Callable[..., Host],
) -> None:
    """The server forgets an answered offer with its connection and offers the job again
    on the next: the slot is free at once, and the job taken, not declined as a duplicate."""
    host, reg = make_host(max_jobs=1)
    reg.offer("J1")
    await settle()
    assert reg.answered() == {"J1": "Acceptance"} and host.job_count() == 1
    reg.connection = 2
    reg.feed(Lost(1))
    await settle()
    assert host.job_count() == 0
    reg.offer("J1")  # LiveKit's second try, on connection 2
    await settle()
    assert [type(d).__name__ for _, d in reg.answers] == ["Acceptance", "Acceptance"]
    assert host.job_count() == 1 and host.jobs.jobs["J1"].connection == 2


async def test_an_assignment_starts_with_the_answer_the_app_gave(
    make_host: Callable[..., Host],
) -> None:
    requests = FakeRequests()
    host, reg = make_host(requests=requests)
    offer = reg.offer("J1")
    await settle()
    requests.decide("J1", accept=True, identity="me", name="Mine", attributes={"k": "v"})
    await settle()
    reg.feed(Assigned(proto.JobAssignment(job=offer.job, token="tok"), worker_id="AW_1"))
    await settle()
    procs: Any = host.jobs.processes
    [proc] = procs.made
    assert isinstance(proc, FakeProcess)
    proc.ready()
    await proc.told("start")
    _, start = proc.sent[-1]
    assert (start["name"], start["token"], start["url"]) == ("Mine", "tok", "ws://127.0.0.1:1")
    assert (start["worker_id"], start["shutdown_timeout"]) == ("AW_1", 5)  # the daemon's
    assert start["attributes"]["k"] == "v" and start["attributes"]["lk.agent.name"] == "a"
    proc.exit()
    await settle()


@pytest.mark.parametrize(
    ("identity", "sid"),
    [
        ("al", "PA_al"),  # another participant
        ("bob", "PA_bob2"),  # bob again, rejoined: the original dispatch serves him
    ],
)
async def test_an_offer_for_another_participant_is_declined_for_good(
    make_host: Callable[..., Host], identity: str, sid: str
) -> None:
    """A recovery's dispatch names its participant and session (lkrun.recovery): not ours
    to take."""
    host, reg = make_host(job_type="publisher")
    job = proto.Job(
        id="J1",
        room=models.Room(name="r"),
        type=proto.JT_PUBLISHER,
        participant=models.ParticipantInfo(identity=identity, sid=sid),
        attributes={"lkrun.participant": "bob", "lkrun.participant_sid": "PA_bob1"},
    )
    reg.feed(Offer(job, received=0.0, connection=1))
    await settle()
    [(_, decision)] = reg.answers
    assert isinstance(decision, Decline) and (decision.reason, decision.terminate) == (
        "participant",
        True,
    )
    assert host.job_count() == 0


async def test_a_fault_in_one_event_does_not_stop_the_loop(
    make_host: Callable[..., Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, reg = make_host()

    def broken(assignment: proto.JobAssignment, *, worker_id: str) -> None:
        raise ValueError("odd job id")

    monkeypatch.setattr(host.jobs, "assign", broken)
    job = proto.Job(id="J1", room=models.Room(name="r"))
    reg.feed(Assigned(proto.JobAssignment(job=job), worker_id="AW_1"))
    reg.feed(Registered("AW_2", again=True))
    reg.offer("J2")
    await settle()
    assert reg.answered() == {"J2": "Acceptance"}
    reconnects = host.settings.metrics.registry.get_sample_value(
        "lkrun_registration_reconnects_total", {"agent": "a"}
    )
    assert reconnects == 1


async def test_a_failing_decision_is_a_decline(
    make_host: Callable[..., Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = FakeRequests()
    host, reg = make_host(requests=requests)

    async def broken(job: proto.Job) -> dict[str, Any]:
        raise KeyError("accept")

    monkeypatch.setattr(requests, "ask", broken)
    reg.offer("J1")
    await settle()
    [(_, decision)] = reg.answers
    assert isinstance(decision, Decline) and decision.reason == "error"
    assert host.job_count() == 0


async def test_an_answer_that_cannot_be_sent_releases_its_slot(
    make_host: Callable[..., Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    host, reg = make_host()

    def broken(offer: Offer, decision: Decision) -> bool:
        raise TypeError("bad attribute value")

    monkeypatch.setattr(reg, "answer", broken)
    reg.offer("J1")
    await settle()
    assert host.job_count() == 0 and reg.answers == []


async def test_an_app_slower_than_the_assignment_wait_is_declined(
    make_host: Callable[..., Host],
) -> None:
    """Its reservation expired while on_request decided (request_timeout may be longer):
    no yes goes out for a slot that is no longer held."""
    requests = FakeRequests()
    host, reg = make_host(requests=requests)
    reg.offer("J1")
    await settle()
    assert host.job_count() == 1
    later = time.monotonic() + ASSIGNMENT_WAIT + 1
    host.jobs.monotonic = lambda: later
    requests.decide("J1", accept=True)
    await settle()
    [(_, decision)] = reg.answers
    assert isinstance(decision, Decline) and decision.reason == "expired"
    assert host.job_count() == 0
    declines = host.settings.metrics.registry.get_sample_value(
        "lkrun_offer_declines_total", {"agent": "a", "reason": "expired"}
    )
    assert declines == 1
