"""relay_lines: what the fork server and the inference process say reaches the log."""

from __future__ import annotations

import asyncio

from lkrun.supervision.stderr import relay_lines


async def test_lines_are_relayed_and_an_overlong_one_is_skipped() -> None:
    stream = asyncio.StreamReader(limit=64)
    stream.feed_data(b"first\n\n" + b"x" * 200 + b"\nlast \xff\n")
    stream.feed_eof()
    lines: list[str] = []
    await asyncio.wait_for(relay_lines(stream, lines.append), 5)
    assert lines == ["first", "last \ufffd"]
