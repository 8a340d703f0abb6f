"""The job pipe protocol's edge cases, both ends, with scripted streams instead of processes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from lkrun.child.runner import JobRun
from lkrun.shared import jobpipe
from lkrun.supervision.job_process import JobProcess, Launched, Outcome


class FakeStdin:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def line(kind: str, **fields: Any) -> bytes:
    return jobpipe.encode(kind, **fields)


async def scripted_job(
    *lines: bytes, on_running: Callable[[JobProcess], None] | None = None
) -> Outcome:
    """A JobProcess whose process printed ``lines`` on its protocol stdout, then exited 0."""
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
    return await asyncio.wait_for(proc.wait(), 5)


async def test_the_usual_order_succeeds() -> None:
    outcome = await scripted_job(
        line("ready", pid=1), line("running", ts=1.0), line("done", ok=True, reason="over")
    )
    assert outcome == Outcome(ok=True, exit_code=0, reason="over")


async def test_an_out_of_range_number_costs_that_message_only() -> None:
    too_big = b'{"type": "running", "ts": 1' + b"0" * 400 + b"}\n"
    outcome = await scripted_job(line("ready"), too_big, line("done", ok=True, reason="r"))
    assert outcome.ok and outcome.reason == "r"


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
    assert not outcome.ok
    assert len(outcome.error) <= jobpipe.MAX_TEXT and outcome.error.endswith("(cut off)")


async def test_a_non_boolean_ok_is_not_a_success() -> None:
    outcome = await scripted_job(line("ready"), line("done", ok="yes", error="said yes"))
    assert not outcome.ok and outcome.error == "said yes"


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
    assert not outcome.ok
    assert outcome.error == (
        "job process speaks job protocol 2; this lkrun speaks 1 (docs/protocol.md)"
    )


async def test_a_ready_without_a_version_is_version_1() -> None:
    outcome = await scripted_job(line("ready"), line("running"), line("done", ok=True))
    assert outcome.ok


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
