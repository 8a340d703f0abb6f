"""Relaying a helper process's stderr (fork server, inference process) into our log."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def relay_lines(stream: asyncio.StreamReader, on_line: Callable[[str], None]) -> None:
    """Call ``on_line`` with each non-empty line until the stream ends.

    A line over the reader's limit is skipped rather than ending the relay: the process
    goes on, and so must the log of what it says next.
    """
    while True:
        try:
            line = await stream.readline()
        except ValueError:
            continue
        if not line:
            return
        if text := line.decode(errors="replace").rstrip():
            on_line(text)
