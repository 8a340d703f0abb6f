"""A job counts in the load LiveKit compares from the moment it is accepted, and that load
reaches the server before the answer (issue 20, item 6): the agent host's reservation is in
the load the registration sends, and the registration writes the status first, on the same
connection, against a FAKE /agent endpoint (the order is what is tested)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from livekit.protocol import agent as proto

from lkrun import registration
from lkrun.decisions import Acceptance, Decision, Decline
from lkrun.load import WorkerLoad, agent_load
from lkrun.registration import Offer, Registration
from tests.test_agent_host_events import FakeRegistration, Host, make_host  # noqa: F401
from tests.test_registration_faults import FakeServer, job, make_registration, run_until
from tests.test_registration_faults import session as session  # the fixture
from tests.test_supervisor import settle


class Counter:
    """Consumes offers as the agent host does: a yes reserves a slot before it is answered;
    the load is lkrun's for that many jobs out of ``max_jobs``."""

    def __init__(self, max_jobs: int = 10) -> None:
        self.reserved = 0
        self.max_jobs = max_jobs

    def worker_load(self) -> WorkerLoad:
        return agent_load(jobs=self.reserved, max_jobs=self.max_jobs, draining=False)

    async def consume(self, reg: Registration) -> None:
        while True:
            event = await reg.next_event()
            if isinstance(event, Offer):
                decision: Decision = Decline("rooms")
                if not event.job.room.name.startswith("no-"):
                    self.reserved += 1
                    decision = Acceptance(identity=f"agent-{event.job.id}")
                reg.answer(event, decision)


async def test_the_status_counting_an_accepted_offer_goes_before_its_answer(
    session: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """livekit-server handles a worker's messages in order: with the status first, the
    load it keeps for the worker counts the job before the job is even assigned. A decline
    changes no load: no status goes with it."""
    monkeypatch.setattr(registration, "STATUS_REFRESH", 3600.0)  # only changes are sent
    counter = Counter()
    kinds: list[tuple[str, Any]] = []
    done = asyncio.Event()

    async def script(ws: web.WebSocketResponse, server: FakeServer) -> None:
        await server.accept_register(ws)
        offers = (job("J1", "a"), job("J2", "no-b"), job("J3", "c"))
        with contextlib.suppress(AssertionError):  # the client hangs up at the end
            for offered in offers:
                request = proto.AvailabilityRequest(job=offered)
                await ws.send_bytes(proto.ServerMessage(availability=request).SerializeToString())
            while True:
                msg = await server.recv(ws)
                kind = msg.WhichOneof("message")
                if kind == "update_worker":
                    kinds.append((kind, msg.update_worker.job_count))
                elif kind == "availability":
                    kinds.append((kind, msg.availability.job_id))
                if sum(k == "availability" for k, _ in kinds) == len(offers):
                    done.set()

    async with FakeServer(script) as server:
        reg = make_registration(server.url, counter, session)  # type: ignore[arg-type]
        await run_until(reg, done.is_set, counter)  # type: ignore[arg-type]
    answers = [(k, v) for k, v in kinds if k == "availability" or v > 0]
    assert answers == [
        ("update_worker", 1),
        ("availability", "J1"),
        ("availability", "J2"),
        ("update_worker", 2),
        ("availability", "J3"),
    ], kinds


async def test_the_load_an_answer_sends_counts_the_reservation(
    make_host: Callable[..., Host],  # noqa: F811
) -> None:
    """The agent host reserves the slot before it answers: the load the registration reads
    while answering a yes counts that job, though it has not been assigned yet."""
    host, reg = make_host(max_jobs=2)
    seen: list[WorkerLoad] = []
    answer = reg.answer

    def recording(offer: Offer, decision: Decision) -> bool:
        seen.append(reg.load())
        return answer(offer, decision)

    reg.answer = recording  # type: ignore[method-assign]
    reg.offer("J1")
    await settle()
    reg.offer("J2")
    await settle()
    reg.offer("J3")  # no slot left: declined, its answer counts only J1 and J2
    await settle()
    assert [(s.job_count, s.full) for s in seen] == [(1, False), (2, True), (2, True)]
    assert all(j.phase.value == "reserved" for j in host.jobs.jobs.values())
