"""The job protocol (docs/protocol.md) in plain Python: the standard library and livekit.rtc,
nothing of lkrun. It joins the room of its job and stays until told to stop.

`lkrun protocol-test -- python speaker.py` passes it; each script beside it starts it with
one rule broken (``Speaker``'s fields), and tests/test_conformance.py checks that the kit
says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

MAX_LINE = 4 * 1024 * 1024


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Speaker:
    protocol: Any = 1  # what its ready says
    says_ready: bool = True
    junk_on_stdout: bool = False  # prints to stdout like a careless library
    obeys_shutdown: bool = True
    sends_done: bool = True
    obeys_sigterm: bool = True  # False: SIGTERM is ignored (SIG_IGN)
    obeys_eof: bool = True  # False: goes on when its stdin closes (the daemon is gone)
    survives_bad_lines: bool = True  # False: exits 1 at a line that is not a message
    leaves_room: bool = True  # False: exits without leaving its room
    obeys_drain: bool = True  # False: takes drain for a failure and ends its job with one

    def __post_init__(self) -> None:
        if not self.obeys_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # The protocol keeps private copies of fds 0 and 1; fd 1 becomes the log, fd 0 nothing.
        self.out = os.fdopen(os.dup(1), "wb", buffering=0)
        self.in_fd = os.dup(0)
        os.dup2(2, 1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        self.started: asyncio.Future[dict[str, Any]] | None = None
        self.stop: asyncio.Event | None = None
        self.reason = ""
        self.error = ""

    def send(self, kind: str, **fields: Any) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.out.write(json.dumps({"type": kind, **fields}).encode() + b"\n")

    def end(self, reason: str, error: str = "") -> None:
        assert self.stop is not None
        if not self.stop.is_set():
            self.reason, self.error = reason, error
            self.stop.set()

    def bad_line(self, why: str) -> None:
        log(why)
        if not self.survives_bad_lines:
            os._exit(1)

    async def read(self, reader: asyncio.StreamReader) -> None:
        assert self.started is not None
        while True:
            try:
                line = await reader.readline()
            except ValueError:
                self.bad_line("dropped a line over the size limit")
                continue
            if not line:
                if self.obeys_eof:
                    self.end("daemon went away")
                return
            try:
                msg = json.loads(line)
                kind = msg["type"]
                assert isinstance(kind, str)
            except (ValueError, TypeError, KeyError, AssertionError):
                self.bad_line(f"dropped a line that is not a message: {line[:40]!r}")
                continue
            if kind == "start" and not self.started.done():
                self.started.set_result(msg)
            elif kind == "shutdown" and self.obeys_shutdown:
                self.end(str(msg.get("reason", "")))
            elif kind == "drain" and self.obeys_drain:
                log("the daemon is draining")
            elif kind == "drain":
                self.end("drained", "drained: the job failed")

    async def main(self) -> int:
        from livekit import rtc  # the slow part, before ready

        loop = asyncio.get_running_loop()
        self.started, self.stop = loop.create_future(), asyncio.Event()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        stdin = os.fdopen(self.in_fd, "rb", buffering=0)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
        reading = asyncio.ensure_future(self.read(reader))
        if self.junk_on_stdout:
            self.out.write(b"hello from an agent that prints\n")
        if self.says_ready:
            self.send("ready", protocol=self.protocol, pid=os.getpid(), ts=time.time(), warm=True)
        stopped = asyncio.ensure_future(self.stop.wait())
        await asyncio.wait({self.started, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not self.started.done():
            return 0  # stopped before a job came: nothing to report
        start = self.started.result()
        self.send("running", ts=time.time())
        room = rtc.Room()
        room.on("disconnected", lambda *_: self.end("room disconnected"))
        joining = asyncio.ensure_future(room.connect(start["url"], start["token"]))
        await stopped  # the job lasts until it is told to stop (or the daemon is gone)
        with contextlib.suppress(Exception):  # a join under way ends first, then it leaves
            await asyncio.wait_for(joining, 5)
        if self.leaves_room:
            await room.disconnect()
        reading.cancel()
        if self.sends_done:
            self.send("done", ok=not self.error, error=self.error, reason=self.reason)
        if not self.leaves_room:
            os._exit(0)  # at once: nothing of the SDK's may say goodbye to the server
        return 1 if self.error else 0


def run(speaker: Speaker) -> None:
    sys.exit(asyncio.run(speaker.main()))


if __name__ == "__main__":
    run(Speaker())
