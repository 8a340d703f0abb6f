"""The job pipe protocol: newline-delimited JSON between the daemon and a job subprocess.

daemon -> child (stdin):  start, drain, shutdown; request (request process only)
child -> daemon (stdout): ready, running, done; answer (request process only)

Kept free of heavy imports: the runner imports it before user code.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

# daemon -> child
START = "start"
DRAIN = "drain"  # the daemon is draining: wrap up, no new work is coming
SHUTDOWN = "shutdown"
REQUEST = "request"  # a job offer for the agent's request function: {id, job}

# child -> daemon
READY = "ready"  # runner and entrypoint module loaded; waiting for start
RUNNING = "running"  # entrypoint called
DONE = "done"  # job over: {"ok": bool, "error": str}
ANSWER = "answer"  # the request function's decision: {id, accept, terminate, identity, ...}

# A start message carries a job token and metadata; keep room for large metadata.
MAX_LINE = 4 * 1024 * 1024


# Error and reason texts go to SQLite, LiveKit and the log: one screenful at most.
MAX_TEXT = 2000


def cap(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` cut to ``limit`` characters, saying so."""
    return text if len(text) <= limit else text[: limit - 14] + " ... (cut off)"


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


async def read_messages(
    reader: asyncio.StreamReader,
    handle: Callable[[dict[str, Any]], None],
    warn: Callable[[str], None],
) -> None:
    """Hand each message on ``reader`` to ``handle`` until EOF. One bad message (too long,
    not JSON, or one ``handle`` cannot take) costs that message only: ``warn`` says why and
    the next one is read as usual."""
    while True:
        try:
            line = await reader.readline()
        except ValueError:  # over the reader's limit: that line is dropped
            warn("an oversized message was ignored")
            continue
        if not line:
            return
        try:
            handle(decode(line))
        except (ValueError, TypeError, KeyError, OverflowError) as exc:  # PipeError: ValueError
            warn(f"a bad message was ignored: {exc}")
