"""The job pipe protocol: newline-delimited JSON between the daemon and a job subprocess.

daemon -> child (stdin):  start, drain, shutdown; request (request process only)
child -> daemon (stdout): ready, running, done; answer (request process only)

Its specification, version ``PROTOCOL``, is docs/protocol.md; ``lkrun protocol-test``
(lkrun.conformance) checks a program against it. Kept free of heavy imports: the runner
imports it before user code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The version of the protocol, carried as "protocol" by start and ready. A field or a kind
# of message the receiver may ignore is added without a new version; anything else
# (a field's meaning, the order, a message a peer must understand) makes a new one.
PROTOCOL = 1

# daemon -> child
START = "start"
DRAIN = "drain"  # the daemon is draining: wrap up, no new work is coming
SHUTDOWN = "shutdown"
REQUEST = "request"  # a job offer for the agent's request function: {id, job}

# child -> daemon
READY = "ready"  # loaded, waiting for start: {"protocol", "pid", "ts", "warm"}
RUNNING = "running"  # entrypoint called
# job over: {"ok", "error", "reason"; "room_gone" when the room was (RoomGone); "cause" when
# the job itself knows why it ended: ROOM_EMPTY}
DONE = "done"
ANSWER = "answer"  # the request function's decision: {id, accept, terminate, identity, ...}

# A start message carries a job token and metadata; keep room for large metadata.
MAX_LINE = 4 * 1024 * 1024


# Error and reason texts go to SQLite, LiveKit and the log: one screenful at most.
MAX_TEXT = 2000


def cap(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    return text if len(text) <= limit else text[: limit - 14] + " ... (cut off)"


@dataclass(frozen=True)
class RoomGone:
    """The room a job joined is not the one it was assigned: deleted meanwhile, the join made
    it anew. The daemon may then delete what the join made (lkrun.rooms)."""

    room: str
    assigned_sid: str
    joined_sid: str

    def __str__(self) -> str:
        return (
            f"room {self.room!r} was deleted before the agent joined "
            f"(assigned sid {self.assigned_sid}, joined {self.joined_sid})"
        )

    def fields(self) -> dict[str, str]:
        """As the done message carries it."""
        return {"room": self.room, "assigned_sid": self.assigned_sid, "joined_sid": self.joined_sid}

    @classmethod
    def parse(cls, value: Any) -> RoomGone | None:
        """From a done message's ``room_gone``; None unless it is well formed."""
        if not isinstance(value, dict):
            return None
        found = [value.get(key) for key in ("room", "assigned_sid", "joined_sid")]
        if not all(isinstance(text, str) and text for text in found):
            return None
        return cls(*found)


def speaks_ours(msg: dict[str, Any]) -> bool:
    """Whether a peer's ``ready`` (or ``start``) speaks this version of the protocol. Without
    the field it is version 1, as lkrun's runners wrote ready before the field was added."""
    version = msg.get("protocol", 1)
    return type(version) is int and version == PROTOCOL  # not True, not 1.0


class PipeError(ValueError):
    """A line on the pipe that is not a protocol message."""


def encode(kind: str, **fields: Any) -> bytes:
    return json.dumps({"type": kind, **fields}, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(line)
    except ValueError as exc:
        raise PipeError(f"not JSON: {line[:80]!r}") from exc
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise PipeError(f"not a protocol message: {line[:80]!r}")
    return msg


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next line on ``reader`` (at EOF the rest without its newline, b"" if none), or
    None for a line over the reader's limit, dropped through its newline. StreamReader's
    readline drops only what it has buffered of such a line: the rest would arrive as a
    line of its own, which may well be a message."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:  # EOF
        return exc.partial
    except asyncio.LimitOverrunError as exc:
        consumed = exc.consumed
    while True:  # drop the line: what is buffered of it, then on to its newline
        await reader.readexactly(consumed)
        try:
            await reader.readuntil(b"\n")
            return None
        except asyncio.IncompleteReadError:  # EOF within the line: the next read says so
            return None
        except asyncio.LimitOverrunError as exc:
            consumed = exc.consumed


async def read_messages(
    reader: asyncio.StreamReader,
    handle: Callable[[dict[str, Any]], None],
    warn: Callable[[str], None],
) -> None:
    """Hand each message on ``reader`` to ``handle`` until EOF. One bad message (too long,
    not JSON, or one ``handle`` cannot take) costs that message only: ``warn`` says why and
    the next one is read as usual."""
    while True:
        line = await read_line(reader)
        if line is None:
            warn("an oversized message was ignored")
            continue
        if not line:
            return
        try:
            handle(decode(line))
        except (ValueError, TypeError, KeyError, OverflowError) as exc:  # PipeError: ValueError
            warn(f"a bad message was ignored: {exc}")
