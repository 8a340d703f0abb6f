"""`lkrun protocol-test`: puts a program through the job pipe protocol as the daemon would.

The daemon's own side of a job process (lkrun.supervision.job_process.JobProcess) drives the
program, so what passes here is what the daemon takes: the same framing, limits, order
checks, version check, stop and kill. Each scenario starts the program afresh and gives it
a real job (a token for a throwaway room on a real LiveKit server), then sends what the
daemon may send at that point, or does what a fault would (a SIGTERM, stdin closed, lines
that are not messages). Every check comes out passed, failed with a reason, or skipped;
their names are stable (docs/protocol.md lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from google.protobuf.json_format import MessageToDict
from livekit import api
from livekit.protocol import agent as proto
from livekit.protocol import models

from lkrun.credentials import Credentials
from lkrun.jobs.fields import JobStatus
from lkrun.manifest import AgentSpec
from lkrun.shared import jobpipe, pdeathsig
from lkrun.shared.text import describe
from lkrun.supervision import agent_processes
from lkrun.supervision.job_process import (
    TERM_GRACE,
    CommandLauncher,
    JobProcess,
    Launched,
    LaunchError,
)
from lkrun.supervision.lifecycle import Facts, conclude

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
AGENT = "protocol-test"
PADDING = "x-protocol-test-padding"
WARM_HOLD = 1.0  # how long a process that says warm is kept waiting for its start
DRAIN_HOLD = 2.0  # how long a drained job is watched before it is shut down
EOF_LIMIT = 5.0  # how soon a process must exit once its stdin is closed (the daemon is gone)
# How soon after it exited its participant must be gone from the room. A leave shows in the
# server's room API at once; a participant whose program just vanished is kept by the server
# until its own timeout, far longer.
LEAVE_LIMIT = 3.0
POLL = 0.1

# Lines that are not protocol messages, and a message of a kind no version has: the
# receiver drops each one and reads on (docs/protocol.md, "Faults").
GARBAGE = (
    b"this is not JSON\n",
    b"\n",
    b"[1, 2, 3]\n",
    b'{"no_type": true}\n',
    b'{"type": 42}\n',
    b'{"type": "start"\n',  # a start cut short: not a start
    b"\xff\xfe not UTF-8\n",
    b'{"type": "x-protocol-test-unknown", "n": 1}\n',
)


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # PASSED | FAILED | SKIPPED
    detail: str  # what was seen; for a failure, why


@dataclass(frozen=True)
class Settings:
    """What the kit runs and against what; the timeouts are the daemon's defaults."""

    command: Sequence[str]
    credentials: Credentials
    cwd: Path = field(default_factory=Path.cwd)
    ready_timeout: float = 60.0  # an agent's prewarm_timeout
    shutdown_timeout: float = 10.0  # the daemon's shutdown_timeout
    join_timeout: float = 20.0  # start -> running, and running -> in the room
    pass_credentials: bool = False  # the agent's pass_credentials
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass
class Report:
    command: list[str]
    url: str
    checks: list[Check] = field(default_factory=list)
    protocol: int = jobpipe.PROTOCOL

    @property
    def ok(self) -> bool:
        return all(check.status != FAILED for check in self.checks)

    def count(self, status: str) -> int:
        return sum(check.status == status for check in self.checks)

    def as_dict(self) -> dict[str, Any]:
        summary = {status: self.count(status) for status in (PASSED, FAILED, SKIPPED)}
        return {
            "protocol": self.protocol,
            "command": self.command,
            "url": self.url,
            "ok": self.ok,
            "summary": summary,
            "checks": [asdict(check) for check in self.checks],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)


def job_env(settings: Settings) -> dict[str, str]:
    """The program's environment as the daemon gives it to an agent without an ``env``
    table, the kit's directory standing for the manifest's."""
    spec = AgentSpec(name=AGENT, pass_credentials=settings.pass_credentials)
    return agent_processes.job_env(spec, settings.credentials, settings.env, settings.cwd)


class Subject:
    """One run of the program, as the daemon holds a job process."""

    def __init__(self, kit: Kit, scenario: str) -> None:
        self.kit = kit
        self.scenario = scenario
        self.launched: Launched | None = None
        self.running = asyncio.Event()
        self.proc = JobProcess(launcher=self._launch, log=kit.job_log, on_running=self.running.set)
        self.proc.sink = self._log_line
        self.proc.on_violation = self._violation
        self.violations: list[str] = []  # what the daemon dropped of what it wrote, and why
        self.identity = f"{AGENT}-{scenario}-{uuid.uuid4().hex[:6]}"
        self.started = False  # it was sent its start
        self._outcome: asyncio.Future[Facts] | None = None

    async def _launch(self, role: str = "job") -> Launched:
        self.launched = await self.kit.launcher(role)
        return self.launched

    def _violation(self, why: str) -> None:
        self.violations.append(why)
        self.kit.violations.append(f"{why} ({self.scenario})")

    def _log_line(self, line: str) -> None:
        if self.kit.on_log is not None:
            self.kit.on_log(self.scenario, line)

    async def spawn(self) -> None:
        await self.proc.spawn()
        self._outcome = asyncio.ensure_future(self.proc.wait())

    async def outcome(self) -> Facts:
        assert self._outcome is not None
        return await self._outcome

    async def ready(self) -> Check:
        """Wait for ready as the daemon does (prewarm_timeout, then it is killed)."""
        began = time.monotonic()
        ready = await self.proc.wait_ready(self.kit.settings.ready_timeout)
        took = time.monotonic() - began
        msg = self.proc.ready_message
        if not ready:
            outcome = await self.outcome()
            if msg is not None or not self.proc.being_killed:  # refused, or exited on its own
                error = conclude(outcome).error
                return Check("ready", FAILED, f"the daemon records: {error}")
            timeout = self.kit.settings.ready_timeout
            return Check("ready", FAILED, f"no ready within {timeout:g}s; the daemon kills it then")
        assert msg is not None
        if problem := ready_problem(msg):
            return Check("ready", FAILED, problem)
        warm = "warm" if msg.get("warm") is True else "not warm (started per job)"
        return Check("ready", PASSED, f"protocol {jobpipe.PROTOCOL}, {warm}, after {took:.2f}s")

    def start(self, payload: dict[str, Any] | None = None) -> None:
        self.started = True
        self.proc.start(**(payload or self.kit.start_payload(self.identity)))

    async def until(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait for ``event`` while the process lives; whether it came."""
        assert self._outcome is not None
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait(
                {waiter, self._outcome}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        return event.is_set()

    async def exits_within(self, timeout: float) -> Facts | None:
        """Its outcome if it exits within ``timeout``, else None (and it goes on)."""
        assert self._outcome is not None
        with contextlib.suppress(asyncio.TimeoutError):
            return await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
        return None

    async def wait_running(self) -> Check:
        began = time.monotonic()
        timeout = self.kit.settings.join_timeout
        if await self.until(self.running, timeout):
            return Check("running", PASSED, f"after {time.monotonic() - began:.2f}s")
        if self.proc.exited:
            outcome = await self.outcome()
            return Check("running", FAILED, f"exited without running: {self.said(outcome)}")
        return Check("running", FAILED, f"no running within {timeout:g}s of start")

    async def shut_down(self, name: str, reason: str, timeout: float, before: str = "") -> Check:
        """Send shutdown as the daemon does, and judge how the job ended."""
        if self.proc.exited:
            outcome = await self.outcome()
            return Check(name, FAILED, f"exited before the shutdown{before}: {self.said(outcome)}")
        began = time.monotonic()
        await self.proc.stop(reason, timeout)
        outcome = await self.outcome()
        took = time.monotonic() - began
        if self.proc.being_killed:
            return Check(name, FAILED, f"did not exit within {timeout:g}s of a shutdown{before}")
        if conclude(outcome).status is not JobStatus.SUCCESS:
            return Check(name, FAILED, f"after a shutdown{before}: {self.said(outcome)}")
        if outcome.exit_code not in (0, None):
            return Check(name, FAILED, f"ended well, but with exit code {outcome.exit_code}")
        done = "done ok" if self.proc.done_message is not None else "no job, no done"
        return Check(name, PASSED, f"{done}, exit 0, {took:.2f}s after a shutdown{before}")

    def said(self, outcome: Facts) -> str:
        """How the daemon would record ``outcome``."""
        error = conclude(outcome).error
        if self.proc.done_message is None and not self.proc.being_killed:
            return f"exited without done; the daemon records: {error or 'success'}"
        return f"the daemon records: {error or 'success'}"

    def write(self, data: bytes) -> None:
        """Raw bytes on its stdin, as no daemon would send them."""
        assert self.launched is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.launched.stdin.write(data)

    def close_stdin(self) -> None:
        assert self.launched is not None
        self.launched.stdin.close()

    async def close(self) -> None:
        """End what is left of it, as the daemon would."""
        if self._outcome is None:
            return
        if not self.proc.exited:
            await self.proc.kill("protocol-test is over")
        await self.outcome()


def padded(payload: dict[str, Any]) -> dict[str, Any]:
    """A start payload whose line (newline included) is MAX_LINE bytes long: padded with a
    field no version has, which the receiver must ignore."""
    payload = {**payload, PADDING: ""}
    size = len(jobpipe.encode(jobpipe.START, protocol=jobpipe.PROTOCOL, **payload))
    return {**payload, PADDING: "x" * (jobpipe.MAX_LINE - size)}


def ready_problem(msg: Mapping[str, Any]) -> str:
    """What is wrong with a ready the daemon took, by the letter of the spec; "" if nothing."""
    if "protocol" not in msg:
        return f'ready has no "protocol": {jobpipe.PROTOCOL} (the daemon assumes it; say it)'
    pid, ts, warm = msg.get("pid"), msg.get("ts"), msg.get("warm")
    if pid is not None and type(pid) is not int:
        return f"ready's pid is {pid!r}, not a whole number"
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
        return f"ready's ts is {ts!r}, not a number"
    if warm is not None and not isinstance(warm, bool):
        return f"ready's warm is {warm!r}, not true or false"
    return ""


class Kit:
    """Runs every scenario against one program."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_check: Callable[[Check], None] | None = None,
        on_log: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_check = on_check
        self.on_log = on_log
        self.launcher = CommandLauncher(
            command=settings.command, cwd=settings.cwd, env=job_env(settings)
        )
        self.violations: list[str] = []
        self.report = Report(list(settings.command), settings.credentials.url)
        quiet = logging.getLogger("lkrun.conformance.job")
        quiet.propagate = False  # the kit reports; the daemon's warnings would repeat it
        quiet.addHandler(logging.NullHandler())
        self.job_log = logging.LoggerAdapter(quiet, {"agent": AGENT, "job_id": "kit"})
        self.room = f"{AGENT}-{uuid.uuid4().hex[:10]}"
        self.room_sid = ""
        self.lkapi: api.LiveKitAPI | None = None

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> Report:
        creds = self.settings.credentials
        self.lkapi = api.LiveKitAPI(creds.http_url, creds.api_key, creds.api_secret, failover=False)
        try:
            try:
                created = await self.lkapi.room.create_room(api.CreateRoomRequest(name=self.room))
            except (api.TwirpError, aiohttp.ClientError) as exc:
                raise KitError(f"cannot create a room at {creds.url}: {describe(exc)}") from exc
            self.room_sid = created.sid
            if await self.job_scenario():
                for scenario in self.scenarios():
                    await scenario()
            else:
                for name in LATER_CHECKS:
                    self.add(Check(name, SKIPPED, "not run: the program gave no usable ready"))
            self.stdout_check()
        finally:
            with contextlib.suppress(Exception):  # the room expires by itself anyway
                await self.lkapi.room.delete_room(api.DeleteRoomRequest(room=self.room))
            await self.lkapi.aclose()
        return self.report

    def scenarios(self) -> list[Callable[[], Awaitable[None]]]:
        return [
            self.shutdown_before_ready,
            self.shutdown_before_start,
            self.shutdown_before_running,
            self.sigterm,
            self.drain,
            self.eof_before_start,
            self.eof,
            self.garbage,
            self.oversized,
            self.largest_start,
        ]

    def add(self, check: Check) -> Check:
        self.report.checks.append(check)
        if self.on_check is not None:
            self.on_check(check)
        return check

    def start_payload(self, identity: str) -> dict[str, Any]:
        """A start as lkrun.agent_host makes it, for a job in the kit's room."""
        creds = self.settings.credentials
        job_id = f"AJ_{uuid.uuid4().hex[:12]}"
        job = proto.Job(
            id=job_id,
            type=proto.JT_ROOM,
            room=models.Room(sid=self.room_sid, name=self.room),
            agent_name=AGENT,
            state=proto.JobState(participant_identity=identity),
        )
        token = (
            api.AccessToken(creds.api_key, creds.api_secret)
            .with_identity(identity)
            .with_kind("agent")
            .with_grants(
                api.VideoGrants(
                    room_join=True, room=self.room, agent=True, can_update_own_metadata=True
                )
            )
            .to_jwt()
        )
        now = time.time()
        return {
            "job": MessageToDict(job),
            "url": creds.url,
            "token": token,
            "identity": identity,
            "agent": AGENT,
            "shutdown_timeout": self.settings.shutdown_timeout,
            "name": "",
            "metadata": "",
            "attributes": {},
            "worker_id": f"{AGENT}-worker",
            "received_at": now,
            "assigned_at": now,
        }

    async def subject(self, scenario: str, check: str = "") -> Subject | None:
        """The program started for ``scenario``; None if it cannot be (then ``check``, by
        default the scenario's, failed)."""
        subject = Subject(self, scenario)
        try:
            await subject.spawn()
        except OSError as exc:  # LaunchError: the launcher's words are the job's error
            why = str(exc) if isinstance(exc, LaunchError) else f"cannot start it: {exc}"
            self.add(Check(check or scenario, FAILED, why))
            return None
        return subject

    @contextlib.asynccontextmanager
    async def started(self, scenario: str, *, ready: bool = True) -> Any:
        """The program for one scenario, ready unless asked otherwise; ended afterwards.
        Yields None when it could not be started or gave no ready (that check failed)."""
        subject = await self.subject(scenario)
        try:
            if subject is not None and ready:
                check = await subject.ready()
                if check.status != PASSED:
                    self.add(Check(scenario, FAILED, f"no usable ready: {check.detail}"))
                    subject = None
            yield subject
        finally:
            if subject is not None:
                await subject.close()

    # -- scenarios -------------------------------------------------------------------------

    async def job_scenario(self) -> bool:
        """A job from ready to done; False if there was no usable ready (nothing else can run)."""
        subject = await self.subject("job", "ready")
        if subject is None:
            return False
        try:
            ready = self.add(await subject.ready())
            if ready.status != PASSED:
                return False
            await self.warm_check(subject)
            subject.start()
            self.add(await subject.wait_running())
            joined = self.add(await self.joins(subject))
            reason = "protocol-test: the job is over"
            ended = self.add(
                await subject.shut_down("shutdown", reason, self.settings.shutdown_timeout)
            )
            if joined.status != PASSED:
                self.add(Check("leaves", SKIPPED, "it never joined"))
            elif ended.status != PASSED:
                self.add(Check("leaves", SKIPPED, "its job did not end well"))
            else:
                self.add(await self.leaves(subject))
            return True
        finally:
            await subject.close()

    async def warm_check(self, subject: Subject) -> None:
        msg = subject.proc.ready_message or {}
        if msg.get("warm") is not True:
            self.add(
                Check("warm", SKIPPED, "ready does not say warm: the daemon starts it per job")
            )
            return
        before = len(subject.violations)
        outcome = await subject.exits_within(WARM_HOLD)
        if outcome is not None:
            why = f"said warm, but exited while waiting for a start: {subject.said(outcome)}"
            self.add(Check("warm", FAILED, why))
        elif said := subject.violations[before:]:  # a running with no start, say
            self.add(Check("warm", FAILED, f"said warm, but while it waited: {said[0]}"))
        else:
            self.add(Check("warm", PASSED, f"waited {WARM_HOLD:g}s for its start"))

    async def joins(self, subject: Subject) -> Check:
        """The job's participant is in the room (the server's word, not the program's)."""
        timeout = self.settings.join_timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if subject.identity in await self.participants():
                return Check("joins", PASSED, f"{subject.identity} is in room {self.room}")
            if subject.proc.exited:
                outcome = await subject.outcome()
                return Check("joins", FAILED, f"exited before joining: {subject.said(outcome)}")
            await asyncio.sleep(POLL)
        return Check("joins", FAILED, f"{subject.identity} not in the room within {timeout:g}s")

    async def leaves(self, subject: Subject) -> Check:
        """Its participant is gone soon after it exited: it left, the server did not time
        it out."""
        if await self.gone(subject):
            return Check("leaves", PASSED, "its participant left the room with the job")
        why = f"still in the room {LEAVE_LIMIT:g}s after it exited: it did not leave"
        return Check("leaves", FAILED, why)

    async def gone(self, subject: Subject) -> bool:
        """Whether its participant is not in the room within LEAVE_LIMIT (it exited)."""
        deadline = time.monotonic() + LEAVE_LIMIT
        while time.monotonic() < deadline:
            if subject.identity not in await self.participants():
                return True
            await asyncio.sleep(POLL)
        return False

    async def participants(self) -> set[str]:
        assert self.lkapi is not None
        found = await self.lkapi.room.list_participants(api.ListParticipantsRequest(room=self.room))
        return {p.identity for p in found.participants}

    async def shutdown_before_ready(self) -> None:
        name = "shutdown-before-ready"
        async with self.started(name, ready=False) as subject:
            if subject is None:
                return
            timeout = self.settings.ready_timeout + self.settings.shutdown_timeout
            reason = "protocol-test: stopped while it loads"
            self.add(await subject.shut_down(name, reason, timeout, " before its ready"))

    async def shutdown_before_start(self) -> None:
        name = "shutdown-before-start"
        async with self.started(name) as subject:
            if subject is None:
                return
            reason = "protocol-test: stopped before its start"
            before = len(subject.violations)
            check = await subject.shut_down(
                name, reason, self.settings.shutdown_timeout, " before its start"
            )
            if check.status == PASSED and (said := subject.violations[before:]):
                check = Check(name, FAILED, f"with no start: {said[0]}")
            self.add(check)

    async def shutdown_before_running(self) -> None:
        name = "shutdown-before-running"
        async with self.started(name) as subject:
            if subject is None:
                return
            subject.start()  # and the shutdown at once, before any running could come
            reason = "protocol-test: stopped as it starts"
            timeout = self.settings.shutdown_timeout
            check = await subject.shut_down(name, reason, timeout, " right after its start")
            if check.status == PASSED and not await self.gone(subject):
                # It joined, or went on joining after the shutdown, and did not leave.
                why = f"its participant is still in the room {LEAVE_LIMIT:g}s after it exited"
                check = Check(name, FAILED, f"{why}: a join under way must end, then leave")
            self.add(check)

    async def sigterm(self) -> None:
        name = "sigterm"
        async with self.started(name) as subject:
            if subject is None or not await self.running(name, subject):
                return
            assert subject.proc.pid is not None
            began = time.monotonic()
            pdeathsig.signal_group(subject.proc.pid, signal.SIGTERM)
            outcome = await subject.exits_within(TERM_GRACE)
            if outcome is None:
                why = f"still running {TERM_GRACE:g}s after SIGTERM to its group: the daemon "
                self.add(Check(name, FAILED, why + "SIGKILLs it then"))
            else:
                took = time.monotonic() - began
                self.add(Check(name, PASSED, f"exited {took:.2f}s after SIGTERM to its group"))

    async def drain(self) -> None:
        name = "drain"
        async with self.started(name) as subject:
            if subject is None or not await self.running(name, subject):
                return
            subject.proc.drain()
            outcome = await subject.exits_within(DRAIN_HOLD)
            if outcome is None:
                reason = "protocol-test: drained, and now over"
                check = await subject.shut_down(name, reason, self.settings.shutdown_timeout)
                if check.status == PASSED:
                    check = Check(name, PASSED, f"went on after drain; then {check.detail}")
            elif (
                conclude(outcome).status is JobStatus.SUCCESS
                and subject.proc.done_message is not None
            ):
                check = Check(name, PASSED, "ended its job after drain: done ok")
            else:
                check = Check(name, FAILED, f"after drain: {subject.said(outcome)}")
            self.add(check)

    async def eof_before_start(self) -> None:
        await self.eof_check("eof-before-start", start=False)

    async def eof(self) -> None:
        await self.eof_check("eof", start=True)

    async def eof_check(self, name: str, *, start: bool) -> None:
        async with self.started(name) as subject:
            if subject is None or (start and not await self.running(name, subject)):
                return
            began = time.monotonic()
            subject.close_stdin()
            outcome = await subject.exits_within(EOF_LIMIT)
            when = "while running" if start else "before its start"
            if outcome is None:
                why = f"still running {EOF_LIMIT:g}s after its stdin closed {when}"
                self.add(Check(name, FAILED, why))
            else:
                took = time.monotonic() - began
                self.add(Check(name, PASSED, f"exited {took:.2f}s after its stdin closed {when}"))

    async def garbage(self) -> None:
        name = "garbage"
        async with self.started(name) as subject:
            if subject is None:
                return
            for line in GARBAGE:
                subject.write(line)
            what = f"ignored {len(GARBAGE)} lines that are not messages or of an unknown kind"
            await self.job_after(name, subject, what)

    async def oversized(self) -> None:
        name = "oversized"
        async with self.started(name) as subject:
            if subject is None:
                return
            pad = b"x" * jobpipe.MAX_LINE
            subject.write(b'{"type": "x-protocol-test-oversized", "pad": "' + pad + b'"}\n')
            await self.job_after(
                name, subject, f"read on past a line over {jobpipe.MAX_LINE} bytes"
            )

    async def largest_start(self) -> None:
        name = "largest-start"
        async with self.started(name) as subject:
            if subject is None:
                return
            subject.start(padded(self.start_payload(subject.identity)))
            what = f"took a start of {jobpipe.MAX_LINE} bytes with a field it does not know"
            await self.job_after(name, subject, what)

    async def job_after(self, name: str, subject: Subject, what: str) -> None:
        """After ``what``, the program still runs a job through to its done."""
        if not await self.running(name, subject):
            return
        reason = f"protocol-test: {name} is over"
        check = await subject.shut_down(name, reason, self.settings.shutdown_timeout)
        if check.status == PASSED:
            check = Check(name, PASSED, f"{what}; then ran its job: {check.detail}")
        self.add(check)

    async def running(self, name: str, subject: Subject) -> bool:
        """Its job started (the start is sent unless it was): if it never runs, ``name``
        failed."""
        if not subject.started:
            subject.start()
        check = await subject.wait_running()
        if check.status != PASSED:
            self.add(Check(name, FAILED, f"no job to test: {check.detail}"))
            return False
        return True

    def stdout_check(self) -> None:
        if not self.violations:
            self.add(Check("stdout", PASSED, "every line it wrote was a message, in order"))
            return
        more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
        self.add(Check("stdout", FAILED, f"{self.violations[0]}{more}"))


# Checks that need the program's ready first: skipped when it gave none.
LATER_CHECKS = (
    "warm",
    "running",
    "joins",
    "shutdown",
    "leaves",
    "shutdown-before-ready",
    "shutdown-before-start",
    "shutdown-before-running",
    "sigterm",
    "drain",
    "eof-before-start",
    "eof",
    "garbage",
    "oversized",
    "largest-start",
)
CHECKS = ("ready", *LATER_CHECKS, "stdout")


async def run_kit(
    settings: Settings,
    *,
    on_check: Callable[[Check], None] | None = None,
    on_log: Callable[[str, str], None] | None = None,
) -> Report:
    """Every check against ``settings.command``; never raises for the program's faults."""
    try:
        return await Kit(settings, on_check=on_check, on_log=on_log).run()
    except (api.TwirpError, aiohttp.ClientError) as exc:  # the server, not the program
        raise KitError(f"LiveKit at {settings.credentials.url}: {describe(exc)}") from exc


class KitError(Exception):
    """The kit itself cannot run (no LiveKit server); the text says why."""
