"""Logging for the daemon: pretty for people, JSON lines for collectors; set up by the CLI only.

Every line about an agent or a job carries `agent` and `job_id`, as text in the pretty
format and as fields in JSON; a record's `fields` (extra={"fields": {...}}) are more JSON
fields.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from lkrun.shared.text import describe, printable

FORMATS = ("pretty", "json")


def agent_logger(logger: logging.Logger, agent: str) -> logging.LoggerAdapter[logging.Logger]:
    return logging.LoggerAdapter(logger, {"agent": agent})


def job_logger(
    logger: logging.Logger, agent: str, job_id: str
) -> logging.LoggerAdapter[logging.Logger]:
    return logging.LoggerAdapter(logger, {"agent": agent, "job_id": job_id})


def _context(record: logging.LogRecord) -> str:
    agent = getattr(record, "agent", "")
    job_id = getattr(record, "job_id", "")
    if agent and job_id:
        return f"[{agent} {job_id}] "
    if agent:
        return f"[{agent}] "
    return ""


class PrettyFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        time = self.formatTime(record, self.datefmt)
        # Job output and room names reach a terminal here: their control characters escaped.
        text = f"{time} {record.levelname:<7} {_context(record)}{printable(record.getMessage())}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class JsonFormatter(logging.Formatter):
    daemon = ""  # the daemon's name: collectors gather several daemons' lines

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.daemon:
            entry["daemon"] = self.daemon
        for key in ("agent", "job_id"):
            if value := getattr(record, key, None):
                entry[key] = value
        for key, value in getattr(record, "fields", {}).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def loop_error(loop: str, exc: BaseException, failures: int, retry_in: float) -> dict[str, Any]:
    """`extra` for the line a background loop logs when a round fails and it goes on: in
    JSON, `loop`, `error`, `failures` (in a row) and `retry_in` (seconds) as fields."""
    fields = {
        "loop": loop,
        "error": describe(exc),
        "failures": failures,
        "retry_in": round(retry_in, 3),
    }
    return {"fields": fields}


def default_format() -> str:
    return "pretty" if sys.stderr.isatty() else "json"


def name_daemon(name: str) -> None:
    """Put the daemon's name on every JSON log line from now on."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            handler.formatter.daemon = name


def setup_logging(level: str = "INFO", fmt: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    fmt = fmt or default_format()
    handler.setFormatter(JsonFormatter() if fmt == "json" else PrettyFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # watchfiles logs every filtered change at debug: a log file beside the manifest
    # would feed itself.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
