"""The job lifecycle with scripted fake processes: every transition, in milliseconds."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.decisions import Acceptance
from lkrun.jobs.book import JobBook, JobRecord, JobStatus
from lkrun.supervision import job_process
from lkrun.supervision.job_process import JobProcess, Launched, LaunchError
from lkrun.supervision.lifecycle import (
    Asked,
    Cause,
    Done,
    Event,
    Facts,
    IllegalTransition,
    Phase,
    Verdict,
    allowed,
    conclude,
    transition,
)
from lkrun.supervision.offers import Situation, weigh_offer, weigh_unreserved_assignment
from lkrun.supervision.supervisor import ASSIGNMENT_WAIT, JobSupervisor

_pids = itertools.count(1000)
CLEAN_END = Done(ok=True)  # what a job says when its entrypoint returned


class FakeProcess:
    """A job process whose every step the test performs: ready, running, exit."""

    def __init__(self, *, spawned: bool = False) -> None:
        self.pid: int | None = next(_pids) if spawned else None
        self.running_at: float | None = None
        self.sent = Sent(self)
        self.spawn_gate = asyncio.Event()
        self.spawn_gate.set()
        self.spawn_error: Exception | None = None
        self.on_running: Callable[[], None] | None = None
        self._ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._exit: asyncio.Future[Facts] = asyncio.get_running_loop().create_future()
        self.asked: list[Asked] = []  # as JobProcess keeps them, for the facts of its end
        self.is_running = False
        self.started = False
        self.running_timeout = 0.0
        self.load_timed_out = False
        self.changed = asyncio.Event()

    # -- ProcessHandle
    @property
    def exited(self) -> bool:
        return self._exit.done()

    @property
    def being_killed(self) -> bool:
        return any(m[0] == "kill" for m in self.sent)

    def bind(self, log: Any, on_running: Callable[[], None] | None, sink: Any = None) -> None:
        self.on_running = on_running

    async def spawn(self) -> None:
        self.sent.append(("spawn",))
        await self.spawn_gate.wait()
        if self.spawn_error is not None:
            raise self.spawn_error
        self.pid = next(_pids)

    async def wait_ready(self, timeout: float) -> bool:
        return await self._ready

    def start(self, *, running_timeout: float = 0.0, **payload: Any) -> None:
        assert self.pid is not None
        self.started = True
        self.running_timeout = running_timeout
        self.sent.append(("start", payload))

    def drain(self) -> None:
        self.sent.append(("drain",))

    async def wait(self) -> Facts:
        return await asyncio.shield(self._exit)

    def ask(self, asked: Asked, timeout: float) -> Coroutine[Any, Any, None]:
        assert self.pid is not None, "ask() before spawn()"  # as JobProcess insists
        if not self.exited:  # taken now, as JobProcess takes it
            self.asked.append(asked)
        if asked.force:
            return self._kill(asked.reason, asked.cause)
        return self._stop(asked.reason, asked.cause)

    # The default as JobProcess's: the warm pool and the request process give none.
    async def stop(self, reason: str, timeout: float, *, cause: Cause = Cause.DRAIN) -> None:
        await self.ask(Asked(cause, reason), timeout)

    async def kill(self, why: str, *, cause: Cause = Cause.DRAIN) -> None:
        await self.ask(Asked(cause, why, force=True), 0.0)

    async def _stop(self, reason: str, cause: Cause) -> None:
        self.sent.append(("stop", reason, cause))

    async def _kill(self, why: str, cause: Cause) -> None:
        self.sent.append(("kill", why, cause))
        self.exit(None, exit_code=-15)

    # -- the script
    def ready(self, ok: bool = True) -> None:
        if not self._ready.done():  # not if it exited first
            self._ready.set_result(ok)

    def running(self) -> None:
        self.running_at = 123.0
        self.is_running = True
        assert self.on_running is not None
        self.on_running()

    def exit(self, done: Done | None = CLEAN_END, exit_code: int | None = 0) -> None:
        """It exits, having said ``done`` (None: nothing), with ``exit_code``."""
        if not self._exit.done():
            facts = Facts(tuple(self.asked), exit_code, self.is_running, done)
            self._exit.set_result(facts)
            if not self._ready.done():
                self._ready.set_result(False)

    async def told(self, kind: str) -> None:
        while kind not in self.kinds():
            self.changed.clear()
            await self.changed.wait()

    def kinds(self) -> list[str]:
        return [m[0] for m in self.sent]


class Sent(list[tuple[Any, ...]]):
    """What the supervisor did to a process, in order; each entry wakes whoever waits."""

    def __init__(self, proc: FakeProcess) -> None:
        super().__init__()
        self.proc = proc

    def append(self, item: tuple[Any, ...]) -> None:
        super().append(item)
        self.proc.changed.set()


@dataclass
class FakeProcesses:
    warm: list[FakeProcess] = field(default_factory=list)
    made: list[FakeProcess] = field(default_factory=list)
    replenished: int = 0

    def claim(self) -> tuple[FakeProcess, bool]:
        if self.warm:
            proc = self.warm.pop(0)
            self.made.append(proc)
            return proc, True
        proc = FakeProcess()
        self.made.append(proc)
        return proc, False

    def replenish(self) -> None:
        self.replenished += 1


@dataclass
class FakeReporter:
    updates: list[tuple[str, int, str]] = field(default_factory=list)
    load_changes: int = 0

    def update_job(self, job_id: str, status: int, error: str = "") -> None:
        self.updates.append((job_id, status, error))

    def load_changed(self) -> None:
        self.load_changes += 1

    def statuses(self, job_id: str) -> list[int]:
        return [s for j, s, _ in self.updates if j == job_id]


@dataclass
class Rules:
    max_jobs: int = 2
    rooms: tuple[str, ...] = ()
    prewarm_timeout: float = 10.0
    job_timeout: float = 0.0
    shutdown_timeout: float = 0.0  # the daemon's
    on_failure: str = "none"
    max_redispatches: int = 2
    participant_metadata: str = ""
    empty_timeout: float = 0.0

    def accepts_room(self, room: str) -> bool:
        return not self.rooms or room in self.rooms

    def display_name(self) -> str:
        return "the agent"


@dataclass
class Daemon:
    shutdown_timeout: float


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    sup: JobSupervisor
    procs: FakeProcesses
    reporter: FakeReporter
    book: JobBook
    clock: Clock  # the wall clock: records' timestamps
    mono: Clock  # the monotonic clock: durations
    rules: Rules


def make_world(
    job_logs: Any = None, on_end: Callable[[JobRecord], None] | None = None, **rules: Any
) -> World:
    procs, reporter, book, clock, mono, spec = (
        FakeProcesses(),
        FakeReporter(),
        JobBook(),
        Clock(),
        Clock(),
        Rules(**rules),
    )

    sup = JobSupervisor(
        agent="a",
        rules=spec,
        processes=procs,
        reporter=reporter,
        book=book,
        url="ws://livekit",
        daemon=Daemon(shutdown_timeout=5.0),
        log=logging.LoggerAdapter(logging.getLogger("test.supervisor")),
        job_logs=job_logs,
        on_end=on_end,
        clock=clock,
        monotonic=mono,
    )
    return World(sup, procs, reporter, book, clock, mono, spec)


def assignment(job_id: str, room: str = "r") -> proto.JobAssignment:
    job = proto.Job(id=job_id, room=models.Room(name=room), type=proto.JT_ROOM)
    return proto.JobAssignment(job=job, token="tok")


def offer_and_assign(w: World, job_id: str) -> FakeProcess:
    assert w.sup.offer(job_id, "r") is None
    w.sup.answered(job_id, Acceptance(identity="i", name="agent-name"), connection=1)
    w.sup.assign(assignment(job_id))
    return w.procs.made[-1]


async def settle() -> None:
    """Let every task that can run, run (no time passes for fakes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def phase(w: World, job_id: str) -> Phase:
    return w.sup.jobs[job_id].phase


# -- the state machine itself ----------------------------------------------------------------


def test_every_phase_but_ended_can_be_left_and_ended_is_final() -> None:
    for p in Phase:
        exits = [e for e in Event if allowed(p, e)]
        assert bool(exits) == (p is not Phase.ENDED), p
    with pytest.raises(IllegalTransition, match="a job that is ended cannot be running"):
        transition(Phase.ENDED, Event.RUNNING)
    assert transition(Phase.STARTING, Event.STOP) is Phase.STOPPING
    assert transition(Phase.STOPPING, Event.RUNNING) is Phase.STOPPING
    with pytest.raises(IllegalTransition):
        transition(Phase.RESERVED, Event.RUNNING)  # never without an assignment
    with pytest.raises(IllegalTransition):
        transition(Phase.RUNNING, Event.ASSIGNED)


# -- offer policy with plain values ----------------------------------------------------------


@pytest.mark.parametrize(
    ("situation", "rules", "reason"),
    [
        (Situation(jobs=0), Rules(), None),
        (Situation(jobs=0, accepting=False), Rules(), "not_accepting"),
        (Situation(jobs=0), Rules(rooms=("other",)), "rooms"),
        (Situation(jobs=2), Rules(max_jobs=2), "max_jobs"),
        (Situation(jobs=0, cpu_overload="CPU at 100% for 31s"), Rules(), "cpu"),
        # Draining wins over every other reason: it is what the operator asked for.
        (
            Situation(jobs=5, accepting=False, cpu_overload="busy"),
            Rules(rooms=("x",)),
            "not_accepting",
        ),
    ],
)
def test_offer_policy(situation: Situation, rules: Rules, reason: str | None) -> None:
    decline = weigh_offer("r", rules, situation)
    assert (decline.reason if decline else None) == reason
    if decline is not None:
        assert "'r'" in decline.text  # the room is named in every refusal


def test_an_unreserved_assignment_is_taken_only_with_room_to_spare() -> None:
    assert weigh_unreserved_assignment(Rules(max_jobs=2), Situation(jobs=1)) == ""
    assert "full or draining" in weigh_unreserved_assignment(Rules(max_jobs=1), Situation(jobs=1))
    assert weigh_unreserved_assignment(Rules(), Situation(jobs=0, accepting=False))


# -- supervision -----------------------------------------------------------------------------


async def test_a_job_goes_reserved_starting_running_ended() -> None:
    w = make_world()
    assert w.sup.offer("J1", "r") is None
    assert phase(w, "J1") is Phase.RESERVED and w.sup.count == 1
    w.sup.answered("J1", Acceptance(identity="i", name="agent-name"), connection=1)
    w.sup.assign(assignment("J1"), worker_id="AW_test")  # the registration's it came to
    proc = w.procs.made[-1]
    assert phase(w, "J1") is Phase.STARTING
    record = w.book.get("J1")
    assert record is not None and record.status is JobStatus.STARTING
    assert record.offered_at == 1000.0 and record.worker_id == "AW_test"
    await settle()
    assert proc.kinds() == ["spawn"] and record.pid == proc.pid
    proc.ready()
    await settle()
    kind, start = proc.sent[-1]  # made from the record, the answer and the assignment
    assert kind == "start" and start["job"]["id"] == "J1" and start["token"] == "tok"
    assert (start["name"], start["url"], start["worker_id"]) == ("agent-name", "ws://livekit",
                                                                 "AW_test")  # fmt: skip
    assert proc.running_timeout == 10.0  # the agent's prewarm_timeout, from start to running
    assert w.procs.replenished == 1
    proc.running()
    assert phase(w, "J1") is Phase.RUNNING and record.status is JobStatus.RUNNING
    assert record.started_at == 123.0
    proc.exit(Done(ok=True, reason="room closed"))
    await settle()
    assert "J1" not in w.sup.jobs and w.sup.count == 0
    assert record.status is JobStatus.SUCCESS and record.stop_reason == "room closed"
    assert record.cause == "clean" and record.exit_code == 0
    assert w.reporter.statuses("J1") == [proto.JS_RUNNING, proto.JS_SUCCESS]
    assert w.book.get("J1") is None
    await asyncio.wait_for(w.sup.wait_idle(), 1)


async def test_a_warm_process_is_not_spawned_again() -> None:
    w = make_world()
    w.procs.warm.append(FakeProcess(spawned=True))
    proc = offer_and_assign(w, "J1")
    proc.ready()
    await settle()
    assert proc.kinds() == ["start"]
    record = w.book.get("J1")
    assert record is not None and record.warm


@pytest.mark.parametrize("how", ["stop", "kill", "terminate"])
async def test_a_stop_while_the_process_is_being_launched_takes_effect_once_it_exists(
    how: str,
) -> None:
    w = make_world()
    w.sup.offer("J1", "r")
    w.procs.warm = []
    proc = FakeProcess()
    proc.spawn_gate.clear()  # the fork server is still importing the module
    w.procs.claim = lambda: (proc, False)  # type: ignore[method-assign]
    w.sup.assign(assignment("J1"))
    await settle()
    if how == "kill":
        assert w.sup.kill("J1", "killed by test", cause=Cause.KILLED)
    elif how == "terminate":
        assert w.sup.stop("J1", "terminated by LiveKit", cause=Cause.TERMINATED)
    else:
        assert w.sup.stop("J1", "stop", cause=Cause.DRAIN)
    assert phase(w, "J1") is Phase.STOPPING
    record = w.book.get("J1")
    assert record is not None and record.status is JobStatus.STOPPING
    assert proc.kinds() == ["spawn"]  # nothing can be sent yet: no process
    proc.spawn_gate.set()
    await settle()
    assert proc.kinds()[1] == ("kill" if how == "kill" else "stop")
    proc.ready()  # it may even finish loading: the job is still never started
    proc.exit(None)  # no job, no done
    await settle()
    assert not proc.started
    assert "J1" not in w.sup.jobs
    expected = proto.JS_FAILED if how == "kill" else proto.JS_SUCCESS
    assert w.reporter.statuses("J1") == [expected]
    cause = {"kill": "killed", "terminate": "terminated", "stop": "drain"}[how]
    assert (record.cause, record.stop_reason) == (cause, proc.sent[1][1])


async def test_a_stop_while_loading_reaches_the_process_and_no_start_follows() -> None:
    w = make_world()
    proc = offer_and_assign(w, "J1")
    await settle()  # spawned, not ready
    w.sup.stop("J1", "stop now", cause=Cause.DRAIN)
    await settle()
    assert proc.kinds() == ["spawn", "stop"]
    proc.ready()
    await settle()
    assert not proc.started
    proc.exit()
    await settle()
    assert w.sup.count == 0


async def test_stop_twice_keeps_the_first_reason_and_a_later_failure_sticks() -> None:
    w = make_world()
    proc = offer_and_assign(w, "J1")
    proc.ready()
    await settle()
    proc.running()
    assert w.sup.stop("J1", "first", cause=Cause.TERMINATED)
    assert w.sup.stop("J1", "job exceeded job_timeout=1s", cause=Cause.JOB_TIMEOUT)
    await settle()
    record = w.book.get("J1")
    assert record is not None and record.stop_reason == "first"
    # The first ask's cause, in the history while it stops (a lost job's, after a crash).
    assert (record.status, record.stop_cause) == (JobStatus.STOPPING, "terminated")
    assert [m for m in proc.sent if m[0] == "stop"] == [
        ("stop", "first", Cause.TERMINATED),
        ("stop", "job exceeded job_timeout=1s", Cause.JOB_TIMEOUT),
    ]
    proc.exit()  # it said done, ok: the timeout fails it all the same
    await settle()
    assert (record.status, record.cause) == (JobStatus.FAILED, "terminated")
    assert (record.stop_reason, record.error) == ("first", "job exceeded job_timeout=1s")
    assert w.reporter.updates[-1] == ("J1", proto.JS_FAILED, "job exceeded job_timeout=1s")
    assert not w.sup.stop("J1", "after the end", cause=Cause.DRAIN)  # no such job any more


async def test_running_after_the_stop_was_sent_still_reports_running_first() -> None:
    w = make_world()
    proc = offer_and_assign(w, "J1")
    proc.ready()
    await settle()
    w.sup.stop("J1", "bye", cause=Cause.DRAIN)
    proc.running()  # the entrypoint was already on its way
    assert phase(w, "J1") is Phase.STOPPING
    record = w.book.get("J1")
    assert record is not None and record.status is JobStatus.STOPPING
    proc.exit()
    await settle()
    assert w.reporter.statuses("J1") == [proto.JS_RUNNING, proto.JS_SUCCESS]


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ValueError("embedded null byte"), "cannot start job process: ValueError"),
        (LaunchError("fork server failed: boom"), "fork server failed: boom"),
        (PermissionError("denied"), "cannot start job process: denied"),
    ],
)
async def test_an_exception_while_starting_fails_the_job_and_frees_its_slot(
    error: Exception, text: str
) -> None:
    w = make_world()
    w.sup.offer("J1", "r")
    proc = FakeProcess()
    proc.spawn_error = error
    w.procs.claim = lambda: (proc, False)  # type: ignore[method-assign]
    w.sup.assign(assignment("J1"))
    await settle()
    assert w.sup.count == 0
    [(job_id, status, message)] = w.reporter.updates
    assert (job_id, status) == ("J1", proto.JS_FAILED) and text in message
    await asyncio.wait_for(w.sup.wait_idle(), 1)


async def test_an_exception_before_any_process_fails_the_job() -> None:
    w = make_world()
    w.sup.offer("J1", "r")

    def broken() -> tuple[FakeProcess, bool]:
        raise OSError("cannot open the job's log file")

    w.procs.claim = broken  # type: ignore[method-assign]
    w.sup.assign(assignment("J1"))
    assert w.sup.count == 0
    [(_, status, message)] = w.reporter.updates
    assert status == proto.JS_FAILED and "cannot open the job's log file" in message


async def test_a_termination_before_the_assignment_releases_the_slot() -> None:
    w = make_world(max_jobs=1)
    w.sup.offer("J1", "r")
    assert w.sup.stop("J1", "terminated by LiveKit", cause=Cause.TERMINATED)
    assert w.sup.count == 0 and not w.reporter.updates and not w.procs.made
    assert not w.sup.owns("J1")


async def test_a_reservation_expires_when_no_assignment_comes() -> None:
    w = make_world(max_jobs=1)
    w.sup.offer("J1", "r")
    decline = w.sup.offer("J2", "r")
    assert decline is not None and decline.reason == "max_jobs"
    w.mono.now += ASSIGNMENT_WAIT + 1
    assert w.sup.offer("J2", "r") is None  # J1's slot expired
    assert list(w.sup.jobs) == ["J2"]


async def test_a_reservation_expires_on_time_when_the_wall_clock_steps_back() -> None:
    w = make_world(max_jobs=1)
    w.sup.offer("J1", "r")
    w.clock.now -= 3600  # NTP stepped the clock back an hour
    w.mono.now += ASSIGNMENT_WAIT + 1
    assert w.sup.offer("J2", "r") is None  # J1's slot expired all the same
    assert list(w.sup.jobs) == ["J2"]
    w.clock.now += 7200  # and forward: a fresh reservation does not expire early
    assert w.sup.offer("J3", "r") is not None


async def test_a_repeated_offer_is_declined_and_keeps_the_first_reservation() -> None:
    w = make_world(max_jobs=3)
    assert w.sup.offer("J1", "r") is None
    w.mono.now += 5
    decline = w.sup.offer("J1", "r")
    assert decline is not None and decline.reason == "duplicate"
    assert "J1" in decline.text and "'r'" in decline.text
    assert w.sup.count == 1 and w.sup.jobs["J1"].reserved_at == 1000.0
    w.sup.assign(assignment("J1"))  # the one assignment gets the one slot
    assert phase(w, "J1") is Phase.STARTING
    decline = w.sup.offer("J1", "r")  # and once it starts, too
    assert decline is not None and decline.reason == "duplicate" and w.sup.count == 1


class BrokenJobLogs:
    """Job log files that cannot be opened for some job ids (nor closed)."""

    def writer(self, job_id: str) -> Any:
        raise ValueError(f"odd job id {job_id!r}")


@pytest.mark.parametrize("warm", [True, False])
async def test_a_failure_after_the_process_is_claimed_ends_it_and_raises_nothing(
    warm: bool,
) -> None:
    w = make_world(job_logs=BrokenJobLogs())
    warm_proc = FakeProcess(spawned=True)
    if warm:
        w.procs.warm.append(warm_proc)
    assert w.sup.offer("J/odd", "r") is None
    w.sup.assign(assignment("J/odd"))  # must not raise into the registration's reader
    await settle()
    assert w.sup.count == 0
    [(job_id, status, error)] = w.reporter.updates
    assert (job_id, status) == ("J/odd", proto.JS_FAILED) and "odd job id" in error
    proc = w.procs.made[-1]
    if warm:
        assert proc is warm_proc and proc.kinds() == ["kill"] and proc.exited
    else:
        assert proc.kinds() == []  # a cold one was never started: nothing to end
    assert w.procs.replenished == 1  # the pool makes another
    await asyncio.wait_for(w.sup.wait_tasks(), 1)


async def test_assignments_that_would_overwrite_or_overfill_are_refused() -> None:
    w = make_world(max_jobs=1)
    proc = offer_and_assign(w, "J1")
    first = w.book.get("J1")
    w.sup.assign(assignment("J1"))  # again, while it starts
    assert w.book.get("J1") is first and len(w.procs.made) == 1
    w.sup.assign(assignment("J_stray"))  # no slot was reserved, and the agent is full
    assert w.book.get("J_stray") is None
    assert w.reporter.statuses("J_stray") == [proto.JS_FAILED]
    proc.exit()
    await settle()
    w.sup.assign(assignment("J_late"))  # no slot reserved, but room to spare: taken
    assert phase(w, "J_late") is Phase.STARTING


async def test_drain_tells_running_jobs_and_jobs_yet_to_start() -> None:
    w = make_world()
    running = offer_and_assign(w, "J1")
    running.ready()
    await settle()
    loading = offer_and_assign(w, "J2")
    w.sup.drain()
    assert running.kinds()[-1] == "drain"
    await settle()
    loading.ready()
    await settle()
    assert loading.kinds()[-2:] == ["drain", "start"]  # told before its start
    decline = w.sup.offer("J3", "r")
    assert decline is not None and decline.reason == "not_accepting"


async def test_job_timeout_stops_the_job_as_failed() -> None:
    w = make_world(job_timeout=0.01)
    proc = offer_and_assign(w, "J1")
    proc.ready()
    await settle()
    proc.running()
    await asyncio.wait_for(proc.told("stop"), 2)
    [stop] = [m for m in proc.sent if m[0] == "stop"]
    assert stop == ("stop", "job exceeded job_timeout=0.01s", Cause.JOB_TIMEOUT)
    assert phase(w, "J1") is Phase.STOPPING


async def test_stop_all_waits_for_every_job_and_kill_all_reaches_unspawned_ones() -> None:
    w = make_world(max_jobs=3)
    started = offer_and_assign(w, "J1")
    started.ready()
    await settle()
    gated = FakeProcess()
    gated.spawn_gate.clear()
    w.procs.claim = lambda: (gated, False)  # type: ignore[method-assign]
    w.sup.offer("J2", "r")
    w.sup.assign(assignment("J2"))
    await settle()
    w.sup.kill_all("daemon killed")
    gated.spawn_gate.set()
    await asyncio.wait_for(w.sup.stop_all("daemon shutting down"), 2)
    assert w.sup.count == 0
    assert "kill" in started.kinds() and "kill" in gated.kinds()


async def test_on_end_is_told_once_of_each_final_record() -> None:
    ended: list[tuple[str, JobStatus, str, bool]] = []
    w = make_world(
        on_end=lambda r: ended.append((r.id, r.status, r.cause, w.book.get(r.id) is None))
    )
    proc = offer_and_assign(w, "J1")
    proc.ready()
    await settle()
    proc.running()
    proc.exit(Done(ok=False, error="boom"), exit_code=1)
    await settle()
    w.sup.offer("J2", "r")
    w.sup.release("J2")  # never assigned: no record, nothing to tell
    assert ended == [("J1", JobStatus.FAILED, "raised", True)]


async def test_a_job_s_record_keeps_its_agent_s_recovery_policy() -> None:
    """What `lkrun recover` applies if the daemon dies: the policy when the job began."""
    ended: list[JobRecord] = []
    w = make_world(on_end=ended.append, on_failure="redispatch", max_redispatches=3)
    offer_and_assign(w, "J1").exit(Done(ok=False, error="boom"), exit_code=1)
    await settle()
    assert [(r.on_failure, r.max_redispatches) for r in ended] == [("redispatch", 3)]


async def test_a_failing_on_end_hook_does_not_hold_the_job() -> None:
    def broken(record: JobRecord) -> None:
        raise RuntimeError("recovery bug")

    w = make_world(on_end=broken)
    proc = offer_and_assign(w, "J1")
    proc.exit()
    await settle()
    assert w.sup.count == 0 and w.reporter.statuses("J1") == [proto.JS_SUCCESS]


# -- what was asked, and when ------------------------------------------------------------------


async def test_a_stop_is_taken_by_the_process_when_asked_not_when_its_task_runs() -> None:
    w = make_world()
    proc = offer_and_assign(w, "J1")
    await settle()
    proc.ready()
    proc.running()
    assert w.sup.stop("J1", "terminated by LiveKit", cause=Cause.TERMINATED)
    assert proc.asked == [Asked(Cause.TERMINATED, "terminated by LiveKit")]  # no await between
    await settle()
    assert proc.sent[-1] == ("stop", "terminated by LiveKit", Cause.TERMINATED)
    proc.exit()
    await settle()


class PipesHeldOpen:
    """FAKE launch of a process that dies by SIGSEGV at once while a grandchild that left
    its group keeps its pipes open: its exit code is known TERM_GRACE before its end."""

    def __init__(self) -> None:
        self.stdout = asyncio.StreamReader()
        self.stderr = asyncio.StreamReader()
        self.died = asyncio.Event()

    async def __call__(self, role: str = "job") -> Launched:
        class Stdin:
            def write(self, data: bytes) -> None:
                pass

            def is_closing(self) -> bool:
                return False

            def close(self) -> None:
                pass

        async def wait() -> int:
            self.died.set()
            return -11

        return Launched(999_999_999, Stdin(), self.stdout, self.stderr, wait, lambda: None)


async def test_an_ask_after_the_exit_code_is_known_is_not_the_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGSEGV stays a crash (redispatched by on_failure) when LiveKit's termination, or
    any stop, comes while the dead process's pipes are still held open."""
    monkeypatch.setattr(job_process, "TERM_GRACE", 0.2)
    monkeypatch.setattr(job_process.pdeathsig, "signal_group", lambda pid, sig: None)
    launch = PipesHeldOpen()
    proc = JobProcess(launcher=launch, log=logging.LoggerAdapter(logging.getLogger("t"), {}))
    await proc.spawn()
    await asyncio.wait_for(launch.died.wait(), 5)
    await settle()
    assert not proc.exited  # its pipes are open: TERM_GRACE to go
    stopping = asyncio.ensure_future(
        proc.stop("terminated by LiveKit", 5.0, cause=Cause.TERMINATED)
    )
    facts = await asyncio.wait_for(proc.wait(), 5)
    await asyncio.wait_for(stopping, 5)
    assert facts.asked == ()
    assert conclude(facts) == Verdict(
        JobStatus.FAILED, Cause.SIGNAL, error="job process killed by SIGSEGV"
    )
