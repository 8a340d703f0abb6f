"""One-line texts: what errors and the tails of logs look like in `lkrun jobs ls`, `lkrun
status`, LiveKit's job status and error messages. Used by both sides, so it lives here."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` with its whitespace (newlines too) collapsed to single spaces; an exception
    with no message gives its type's name. Cut to ``limit`` characters, ending in "..."."""
    if isinstance(text, BaseException) and not str(text):
        text = type(text).__name__
    flat = " ".join(str(text).split())
    if limit is None or len(flat) <= limit:
        return flat
    return flat[: max(limit - 3, 0)] + "..."


def describe(exc: BaseException) -> str:
    """An exception as one line, its type first: ``ValueError: bad value``."""
    return one_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)


def last_lines(text: str, count: int = 1, limit: int | None = None) -> str:
    """The last ``count`` non-empty lines of ``text`` (a process's output), colour codes
    removed, joined with " | "; longer than ``limit``: its end, after "...". "" if none."""
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    joined = " | ".join(lines[-count:]) if count > 0 else ""
    if limit is None or len(joined) <= limit:
        return joined
    return "..." + joined[-limit:]


# C0 controls but tab, DEL, C1 controls (a lone 0x9b is a CSI on many terminals), the line and
# paragraph separators, and the bidi overrides that reorder what is shown (U+202A-U+202E,
# U+2066-U+2069): none of them is text a reader should receive raw from a room or a job.
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` safe for a terminal: each control character shown as its Python escape
    (ESC as the four characters ``\\x1b``, U+202E as ``\\u202e``), so a room name or a job's
    log line cannot move the cursor, retitle the terminal or hide what follows. Tabs stay."""
    return _CONTROL.sub(_escape, str(text))
