"""Logging setup for the daemon; called by the CLI, never at import."""

from __future__ import annotations

import logging
import sys


class _Formatter(logging.Formatter):
    """Adds `[agent job_id]` to lines that carry them, so every job line is traceable."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job_id = getattr(record, "job_id", None)
        if job_id:
            agent = getattr(record, "agent", "")
            prefix = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} "
            return f"{prefix}[{agent} {job_id}] {record.getMessage()}"
        return text


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
