"""The job pipe protocol's edge cases, both ends, with scripted streams instead of processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lkrun.child.runner import JobRun
from lkrun.jobs.fields import JobStatus
from lkrun.shared import jobpipe
from lkrun.supervision.job_process import CommandLauncher, JobProcess, Launched
from lkrun.supervision.lifecycle import Cause, Verdict, conclude
from tests.conftest import wait_for


class FakeStdin:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


SUCCESS, FAILED = JobStatus.SUCCESS, JobStatus.FAILED


def line(kind: str, **fields: Any) -> bytes:
    return jobpipe.encode(kind, **fields)


async def scripted_job(
    *lines: bytes, on_running: Callable[[JobProcess], None] | None = None
) -> Verdict:
    """How the job of a JobProcess whose process printed ``lines`` on its protocol stdout,
    then exited 0, is judged."""
    stdout = asyncio.StreamReader(limit=jobpipe.MAX_LINE)
    for data in lines:
        stdout.feed_data(data)
    stdout.feed_eof()
    stderr = asyncio.StreamReader()
    stderr.feed_eof()

    async def wait() -> int:
        return 0

    launched = Launched(999_999_999, FakeStdin(), stdout, stderr, wait, lambda: None)

    async def launcher(role: str = "job") -> Launched:
        return launched

    log = logging.LoggerAdapter(logging.getLogger("test.pipe"), {})
    proc = JobProcess(launcher=launcher, log=log)
    if on_running is not None:
        proc.on_running = lambda: on_running(proc)
    await proc.spawn()
    proc.start(job={"id": "AJ_1"})  # sent before its lines are read: they are its answers
    return conclude(await asyncio.wait_for(proc.wait(), 5))


async def test_the_usual_order_succeeds() -> None:
    outcome = await scripted_job(
        line("ready", pid=1), line("running", ts=1.0), line("done", ok=True, reason="over")
    )
    assert outcome == Verdict(SUCCESS, Cause.CLEAN, reason="over")


async def test_an_out_of_range_number_costs_that_message_only() -> None:
    too_big = b'{"type": "running", "ts": 1' + b"0" * 400 + b"}\n"
    outcome = await scripted_job(line("ready"), too_big, line("done", ok=True, reason="r"))
    assert outcome.status is SUCCESS and outcome.reason == "r"


async def test_running_before_ready_or_twice_is_ignored() -> None:
    started: list[float] = []
    await scripted_job(
        line("running", ts=1.0),
        line("ready"),
        line("running", ts=2.0),
        line("running", ts=3.0),
        line("done", ok=True),
        on_running=lambda proc: started.append(proc.running_at or 0),
    )
    assert started == [2.0]  # once, after ready


async def test_done_twice_keeps_the_first_and_error_texts_are_capped() -> None:
    huge = "x" * 1_000_000
    outcome = await scripted_job(
        line("ready"), line("done", ok=False, error=huge), line("done", ok=True)
    )
    assert outcome.status is FAILED
    assert len(outcome.error) <= jobpipe.MAX_TEXT and outcome.error.endswith("(cut off)")


async def test_a_non_boolean_ok_is_not_a_success() -> None:
    outcome = await scripted_job(line("ready"), line("done", ok="yes", error="said yes"))
    assert outcome.status is FAILED and outcome.error == "said yes"


class FakePipe:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send(self, kind: str, **fields: Any) -> None:
        self.sent.append((kind, fields))


async def test_child_reader_survives_an_oversized_line_and_bad_json() -> None:
    run = JobRun(FakePipe(), app=None)  # type: ignore[arg-type]
    reader = asyncio.StreamReader(limit=1024)
    reader.feed_data(b'{"type": "start", "pad": "' + b"x" * 5000 + b'"}\n')
    reader.feed_data(b"not json\n")
    reader.feed_data(b'{"no type": 1}\n')
    reader.feed_data(json.dumps({"type": "shutdown", "reason": "stop"}).encode() + b"\n")
    reader.feed_eof()
    await asyncio.wait_for(run.read_stdin(reader), 5)
    # The shutdown after the bad lines still arrived: before any start, it ends the wait.
    assert run.start_msg.done() and "stop" in str(run.start_msg.exception())


def test_rtc_chatter_on_the_root_logger_stays_out_of_the_job_log() -> None:
    from lkrun.child.runner import QuietRtc

    def record(path: str, level: int, name: str = "root") -> logging.LogRecord:
        return logging.LogRecord(name, level, path, 1, "ignoring byte stream", None, None)

    quiet = QuietRtc()
    rtc_room = "/venv/site-packages/livekit/rtc/room.py"
    assert not quiet.filter(record(rtc_room, logging.INFO))
    assert quiet.filter(record(rtc_room, logging.WARNING))
    assert quiet.filter(record("/app/agent.py", logging.INFO))  # the user's own root logs
    assert quiet.filter(record(rtc_room, logging.INFO, name="livekit"))  # its level decides


async def test_a_ready_of_another_protocol_version_is_refused_with_a_clear_error() -> None:
    outcome = await scripted_job(
        line("ready", protocol=2), line("running", ts=1.0), line("done", ok=True)
    )
    assert (outcome.status, outcome.cause) == (FAILED, Cause.START_FAILED)
    assert outcome.error == (
        "job process speaks job protocol 2; this lkrun speaks 1 (docs/protocol.md)"
    )


async def test_a_ready_without_a_version_is_version_1() -> None:
    outcome = await scripted_job(line("ready"), line("running"), line("done", ok=True))
    assert outcome.status is SUCCESS


def test_only_the_integer_1_is_version_1() -> None:
    assert jobpipe.speaks_ours({"type": "ready", "protocol": 1})
    assert jobpipe.speaks_ours({"type": "ready"})
    for other in (2, 0, "1", 1.0, True, None):
        assert not jobpipe.speaks_ours({"type": "ready", "protocol": other}), other


async def test_the_start_message_carries_the_protocol_version() -> None:
    stdin = FakeStdin()
    stdout = asyncio.StreamReader()
    stderr = asyncio.StreamReader()
    exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def launcher(role: str = "job") -> Launched:
        return Launched(999_999_999, stdin, stdout, stderr, lambda: exited, lambda: None)

    proc = JobProcess(launcher=launcher, log=logging.LoggerAdapter(logging.getLogger("t"), {}))
    await proc.spawn()
    proc.start(job={"id": "AJ_1"}, url="ws://x", token="t", identity="i")
    assert json.loads(stdin.written[0]) == {
        "type": "start",
        "protocol": 1,
        "job": {"id": "AJ_1"},
        "url": "ws://x",
        "token": "t",
        "identity": "i",
    }
    for stream in (stdout, stderr):
        stream.feed_eof()
    exited.set_result(0)
    await asyncio.wait_for(proc.wait(), 5)


async def test_the_runner_refuses_a_start_of_another_protocol_version() -> None:
    pipe = FakePipe()
    run = JobRun(pipe, app=None)  # type: ignore[arg-type]
    run.handle({"type": "start", "protocol": 2, "job": {}})
    assert await asyncio.wait_for(run.run(), 5) is False
    kind, fields = pipe.sent[-1]
    assert kind == "done" and fields["ok"] is False
    assert fields["error"] == "the daemon speaks job protocol 2; this runner 1"


class HeldProcess:
    """A job process whose stdout the test writes line by line, and which exits when the
    test says (or when it is signalled: JobProcess kills through the group, which the test
    stands in for by calling ``exit``)."""

    def __init__(self) -> None:
        self.stdin = FakeStdin()
        self.stdout = asyncio.StreamReader(limit=jobpipe.MAX_LINE)
        self.stderr = asyncio.StreamReader()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.violations: list[str] = []
        self.running: list[float | None] = []
        self.seen = asyncio.Event()  # a running or a violation: the reader got that far
        log = logging.LoggerAdapter(logging.getLogger("test.pipe"), {})
        self.proc = JobProcess(launcher=self._launch, log=log, on_running=self._on_running)
        self.proc.on_violation = self._on_violation

    async def _launch(self, role: str = "job") -> Launched:
        return Launched(999_999_999, self.stdin, self.stdout, self.stderr, self._wait, lambda: None)

    async def _wait(self) -> int:
        return await self.exited

    def _on_running(self) -> None:
        self.running.append(self.proc.running_at)
        self.seen.set()

    def _on_violation(self, why: str) -> None:
        self.violations.append(why)
        self.seen.set()

    async def says(self, kind: str, **fields: Any) -> None:
        """It writes one message; returns once the daemon's side has taken it."""
        self.seen.clear()
        self.stdout.feed_data(line(kind, **fields))
        await asyncio.wait_for(self.seen.wait(), 5)

    async def exit(self, code: int = 0) -> Verdict:
        for stream in (self.stdout, self.stderr):
            stream.feed_eof()
        self.exited.set_result(code)
        return conclude(await asyncio.wait_for(self.proc.wait(), 5))


async def test_a_running_before_its_start_is_a_violation_and_the_real_one_counts() -> None:
    held = HeldProcess()
    await held.proc.spawn()
    held.stdout.feed_data(line("ready", protocol=1, warm=True))
    assert await held.proc.wait_ready(5)
    # A warm process says running while it waits: no job runs, so it is not taken as one...
    await held.says("running", ts=1.0)
    assert held.running == [] and not held.proc.started_running
    assert held.violations == ["a bad message was ignored: running came before its start, or twice"]
    # ...and the running that follows its start is the job's, not a second one.
    held.proc.start(job={"id": "AJ_1"})
    await held.says("running", ts=2.0)
    assert held.running == [2.0] and held.proc.started_running
    assert len(held.violations) == 1
    held.stdout.feed_data(line("done", ok=True, reason="over"))
    assert await held.exit() == Verdict(SUCCESS, Cause.CLEAN, reason="over")


async def test_a_stop_after_the_job_s_done_is_not_why_it_ended() -> None:
    # A job that leaves its empty room is terminated by LiveKit on its way out.
    held = HeldProcess()
    await held.proc.spawn()
    held.stdout.feed_data(line("ready", protocol=1))
    assert await held.proc.wait_ready(5)
    held.proc.start(job={"id": "AJ_1"})
    await held.says("running", ts=1.0)
    held.stdout.feed_data(line("done", ok=True, reason="room empty", cause="room_empty"))
    await wait_for(lambda: held.proc.done_message is not None, 5, interval=0.01, what="done")
    stop = held.proc.stop("terminated by LiveKit", 5, cause=Cause.TERMINATED)
    stopping = asyncio.ensure_future(stop)
    await asyncio.sleep(0)  # the stop is under way: the shutdown was sent
    assert held.stdin.written[-1] == line("shutdown", reason="terminated by LiveKit")
    assert await held.exit() == Verdict(SUCCESS, Cause.ROOM_EMPTY, reason="room empty")
    await stopping
    assert held.proc.asked == ()


def _program(tmp_path: Path, text: str) -> CommandLauncher:
    """A real job process: ``text`` run by this Python, in its own group as the daemon runs
    a command agent."""
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(text))
    return CommandLauncher(command=[sys.executable, str(script)], cwd=tmp_path, env=os.environ)


# Says ready, then waits for stdin to close (SIGTERM ends it as any process).
WAITS = """
    import json, sys
    print(json.dumps({"type": "ready", "protocol": 1, "warm": True}), flush=True)
    for line in sys.stdin:
        sys.stderr.write("got %d bytes\\n" % len(line))
"""


@pytest.mark.e2e
async def test_a_start_too_long_for_the_pipe_fails_the_job_and_ends_its_process(
    tmp_path: Path,
) -> None:
    log = logging.LoggerAdapter(logging.getLogger("test.pipe"), {})
    proc = JobProcess(launcher=_program(tmp_path, WAITS), log=log)
    await proc.spawn()
    assert await proc.wait_ready(10)
    metadata = "m" * jobpipe.MAX_LINE  # a room's metadata: LiveKit does not cap it for us
    job = {"id": "AJ_1", "room": {"name": "r", "metadata": metadata}}
    proc.start(job=job, url="ws://x")
    facts = await asyncio.wait_for(proc.wait(), 10)
    outcome = conclude(facts)
    size = len(jobpipe.encode("start", protocol=1, job=job, url="ws://x"))
    assert outcome.status is FAILED and outcome.cause is Cause.START_FAILED
    assert not proc.start_sent
    assert outcome.error == (
        f"the job's start message is {size} bytes, over the job protocol's limit of "
        f"{jobpipe.MAX_LINE} (docs/protocol.md): the room's, the dispatch's or the "
        "participant's metadata or attributes are too large"
    )
    assert facts.exit_code == -signal.SIGTERM  # ended at once, not left waiting for a start


@pytest.mark.e2e
async def test_a_job_that_never_says_running_is_killed_after_its_running_timeout(
    tmp_path: Path,
) -> None:
    log = logging.LoggerAdapter(logging.getLogger("test.pipe"), {})
    proc = JobProcess(launcher=_program(tmp_path, WAITS), log=log)
    await proc.spawn()
    assert await proc.wait_ready(10)
    proc.start(running_timeout=0.3, job={"id": "AJ_1"})
    facts = await asyncio.wait_for(proc.wait(), 10)
    assert proc.start_sent and not proc.started_running
    outcome = conclude(facts)
    assert (outcome.status, outcome.cause) == (FAILED, Cause.START_FAILED)
    assert facts.exit_code == -signal.SIGTERM
    assert outcome.error == "job process did not report running within 0.3s of its start"


class PipeReader(asyncio.StreamReader):
    """A StreamReader that tells when its reader has taken all it had and waits for more,
    as a reader of a pipe sees a long line: a piece at a time."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self.waiting = asyncio.Event()

    async def _wait_for_data(self, func_name: str) -> None:
        self.waiting.set()
        await super()._wait_for_data(func_name)

    async def feed_piece(self, data: bytes) -> None:
        """``data``, once the reader has taken what came before."""
        await asyncio.wait_for(self.waiting.wait(), 5)
        self.waiting.clear()
        self.feed_data(data)


async def test_an_oversized_line_is_dropped_through_its_newline() -> None:
    # The first piece of the line is over the limit by itself; the rest of the same line
    # happens to be a message, which the receiver must not take for one.
    reader = PipeReader(limit=1024)
    got: list[dict[str, Any]] = []
    warned: list[str] = []
    reading = asyncio.ensure_future(jobpipe.read_messages(reader, got.append, warned.append))
    await reader.feed_piece(b'{"type": "x-pad", "pad": "' + b"x" * 5000)
    await reader.feed_piece(b"y" * 3000)
    await reader.feed_piece(b'{"type": "shutdown", "reason": "smuggled"}\n')
    await reader.feed_piece(line("shutdown", reason="real"))
    reader.feed_eof()
    await asyncio.wait_for(reading, 5)
    assert got == [{"type": "shutdown", "reason": "real"}]
    assert warned == ["an oversized message was ignored"]


class BrokenLog(logging.LoggerAdapter):  # type: ignore[type-arg]  (3.10 cannot subscript it)
    """A job logger that fails at the first warning (the daemon's kill logs one)."""

    def warning(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the log is broken")


async def test_the_kill_of_a_refused_process_is_awaited_so_its_errors_surface() -> None:
    held = HeldProcess()
    held.proc.log = BrokenLog(logging.getLogger("test.pipe"), {})
    await held.proc.spawn()
    held.stdout.feed_data(line("ready", protocol=2))  # refused: the daemon kills it
    await wait_for(lambda: held.proc.being_killed, 5, interval=0.01, what="the refusal")
    # The kill failed; wait() says so instead of losing it in a task nobody awaits.
    with pytest.raises(RuntimeError, match="the log is broken"):
        await held.exit(-signal.SIGTERM)
