"""The agents manifest (agents.toml): loading and validation.

Each settings dataclass below doubles as its validation table: a field whose metadata holds a
check (``metadata=_check(...)``) can be set from the file, and that check validates and converts
its TOML value. Adding a setting is one line. Fields without a check (``AgentSpec.name``) cannot
be set from the file; fields without a default are required.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import ipaddress
import keyword
import logging
import math
import os
import re
import shlex
import shutil
import string
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lkrun.shared.entrypoint import (
    AUTO,
    FRAMEWORKS,
    LIVEKIT_AGENTS,
    LKRUN,
    is_file_source,
    split_entrypoint,
)
from lkrun.shared.text import one_line

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "AgentSpec",
    "AppInfo",
    "DaemonSettings",
    "FrozenMap",
    "LiveKitSettings",
    "Manifest",
    "ManifestError",
    "Permissions",
    "check_agent_field",
    "check_pools",
    "load_manifest",
    "parse_duration",
    "parse_host_port",
    "parse_manifest",
]

T = TypeVar("T")


class ManifestError(Exception):
    """A manifest problem, reported as one line naming the file, the agent and the field."""

    def __init__(
        self,
        file: str | Path,
        message: str,
        *,
        agent: str | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(file, message)
        self._shown_file = str(file)  # as the user typed it: Path() would drop a leading "./"
        self.file = Path(file)
        self.message = message
        self.agent = agent
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments need help to survive pickling (e.g. across processes).
        return (_rebuild_error, (self._shown_file, self.message, self.agent, self.field))

    def __str__(self) -> str:
        shown = self._shown_file
        parts = [shown if shown.isprintable() else repr(shown)]
        if self.agent is not None:
            parts.append(f"agent {self.agent!r}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        parts.append(one_line(self.message))
        return ": ".join(parts)


def _rebuild_error(file: str, message: str, agent: str | None, field: str | None) -> ManifestError:
    return ManifestError(file, message, agent=agent, field=field)


# --- checks: each takes a raw TOML value and returns the converted value or raises _Invalid ---


class _Invalid(Exception):
    """A bad value; ``key`` is the dotted path below the field being checked, if any."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


Check = Callable[[Any], Any]

_TYPE_NAMES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),  # before int: bool is a subclass of int
    (int, "an integer"),
    (float, "a float"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)


def _type_name(value: object) -> str:
    for cls, name in _TYPE_NAMES:
        if isinstance(value, cls):
            return name
    return "a date/time"


def _show(value: object, limit: int = 60) -> str:
    # Booleans as written in TOML, not Python's True; repr keeps newlines out of the line.
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_show(value)}")
    return value


def _non_empty_string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"must be a non-empty string, got {_show(value)}")
    return value


def _secret(value: object) -> str:
    # Never echo a secret back, not even a mistyped one.
    if not isinstance(value, str):
        raise _Invalid(f"must be a non-empty string, got {_type_name(value)} (value not shown)")
    if not value:
        raise _Invalid("must be a non-empty string, got ''")
    return value


DASHBOARD_TOKEN_MIN = 16  # characters: a token guarded port is worth a long one


def dashboard_token_problem(value: str) -> str:
    """Why ``value`` cannot be the dashboard's token ("" if it can); the value is never
    shown."""
    if len(value) < DASHBOARD_TOKEN_MIN:
        return f"must be at least {DASHBOARD_TOKEN_MIN} characters (value not shown)"
    if not value.isprintable() or value != value.strip():
        return "must be printable, with no surrounding spaces (value not shown)"
    return ""


def _dashboard_token(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {_type_name(value)} (value not shown)")
    if value and (problem := dashboard_token_problem(value)):
        raise _Invalid(problem)
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_show(value)}")
    return value


def _int_at_least(minimum: int) -> Check:
    def check(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Invalid(f"must be an integer >= {minimum}, got {_show(value)}")
        return value

    return check


def _threshold(value: object) -> float:
    """A number in (0, 1], or "off" (infinity: never reached); NaN is rejected too."""
    if value == "off":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise _Invalid(f'must be a number > 0 and <= 1, or "off", got {_show(value)}')
    return float(value)


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)"  # "ms" before "m": tried in order
_DURATION = re.compile(f"(?:{_DURATION_PART})+")


def parse_duration(value: object) -> float:
    """Seconds, from a non-negative number or a string such as "90s", "1h30m" or "500ms".

    A string needs a unit on every number (ms, s, m, h, d); raise ValueError for anything else.
    """
    seconds: float | None = None
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)):
        try:
            seconds = float(value)
        except OverflowError:  # TOML integers can be too big for a float
            seconds = math.inf
    elif isinstance(value, str) and _DURATION.fullmatch(value):
        parts = re.findall(_DURATION_PART, value)
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if seconds is None or not 0 <= seconds < math.inf:  # also rejects NaN
        raise ValueError(f'must be a duration such as "90s", "30m" or "2h", got {_show(value)}')
    return seconds


def format_duration(seconds: float) -> str:
    """A duration as the manifest would write it: "30m", "2h", "1.5s"."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def _duration(value: object) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def _duration_with_off(off: float) -> Callable[[object], float]:
    """A duration or "off", which reads as ``off``: what the setting's code takes for
    never (math.inf for a wait that never ends, 0 for a limit that is not set)."""

    def parse(value: object) -> float:
        if value == "off":
            return off
        try:
            return parse_duration(value)
        except ValueError:
            hint = 'must be a duration such as "30s" or "2m", or "off"'
            raise _Invalid(f"{hint}, got {_show(value)}") from None

    return parse


_duration_or_off = _duration_with_off(math.inf)  # "off": never
_duration_zero_off = _duration_with_off(0.0)  # "off" or 0: none


def _positive_duration(value: object) -> float:
    seconds = _duration(value)
    if seconds <= 0:
        raise _Invalid(f"must be a duration above 0, got {_show(value)}")
    return seconds


_HOST_PORT_HINT = 'host:port such as "127.0.0.1:8081" or "[::1]:8081"'


def parse_host_port(text: str) -> tuple[str, int]:
    """Split ``host:port`` into a host to bind and a port; raise ValueError if it is malformed.

    The host is an IPv4 address, ``localhost``, or an IPv6 address in brackets (returned without
    them); the port is 0..65535, where 0 asks the system for a free one.
    """
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"must be {_HOST_PORT_HINT}, got {_show(text)}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_show(host)} in brackets is not an IPv6 address") from None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"must be {_HOST_PORT_HINT}, got {_show(text)}")
        if ":" in host:
            raise ValueError(
                f'an IPv6 host must be in brackets, as in "[::1]:8081", got {_show(text)}'
            )
        if host != "localhost":
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(
                    "host must be an IPv4 address, localhost or a bracketed IPv6 address, "
                    f"got {_show(host)}"
                ) from None
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {_show(port)}")
    return host, int(port)


def _http_addr(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f'must be {_HOST_PORT_HINT}, or "" to disable, got {_show(value)}')
    if value:
        try:
            parse_host_port(value)
        except ValueError as exc:
            raise _Invalid(str(exc)) from None
    return value


def _choice(*allowed: str) -> Check:
    def check(value: object) -> str:
        if not isinstance(value, str) or value not in allowed:
            options = ", ".join(repr(a) for a in allowed)
            raise _Invalid(f"must be one of {options}, got {_show(value)}")
        return value

    return check


def _command(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(
            'must be a non-empty array of strings such as ["node", "agent.mjs"], '
            f"got {_show(value)}"
        )
    for item in value:
        if not isinstance(item, str) or not item:
            raise _Invalid(f"must contain only non-empty strings, got {_show(item)}")
        if "\0" in item:  # no process can be given it
            raise _Invalid(f"must not contain a NUL character, got {_show(item)}")
    return tuple(value)


def _list_of_non_empty_strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"must be an array of strings, got {_show(value)}")
    for item in value:
        if not isinstance(item, str) or not item:
            raise _Invalid(f"must contain only non-empty strings, got {_show(item)}")
    return tuple(value)


def _string_table(key_pattern: re.Pattern[str] | None = None) -> Check:
    def check(value: object) -> Mapping[str, str]:
        if not isinstance(value, dict):
            raise _Invalid(f"must be a table of strings, got {_show(value)}")
        for key, item in value.items():
            if key_pattern is not None and not key_pattern.fullmatch(key):
                raise _Invalid(f"key {key!r} must match {key_pattern.pattern}")
            if not isinstance(item, str):
                raise _Invalid(f"value of {key!r} must be a string, got {_show(item)}")
            if "\0" in item:  # no process can be given it
                raise _Invalid(f"value of {key!r} must not contain a NUL character")
        return FrozenMap(value)

    return check


def _starts_with(*prefixes: str) -> Check:
    def check(value: object) -> str:
        if not isinstance(value, str) or not value.startswith(prefixes):
            shown = ", ".join(prefixes[:-1]) + f" or {prefixes[-1]}"
            raise _Invalid(f"must start with {shown}, got {_show(value)}")
        return value

    return check


def _path(value: object) -> Path:
    return Path(_non_empty_string(value))


_ENTRYPOINT_HINT = "must look like 'package.module:function' or 'path/to/file.py:function'"


def _is_name(part: str) -> bool:
    return part.isidentifier() and not keyword.iskeyword(part)


def _optional_entrypoint(value: object) -> str:
    return "" if value == "" else _entrypoint(value)


def _entrypoint(value: object) -> str:
    text = _string(value)
    source, sep, function = text.rpartition(":")
    if is_file_source(source):
        if not source.endswith(".py") or source.endswith("/.py") or "\0" in source:
            raise _Invalid(f"a file entrypoint must name a .py file, got {_show(value)}")
        if _is_name(function):
            return text
    elif sep and _is_name(function) and all(_is_name(p) for p in source.split(".")):
        return text
    raise _Invalid(f"{_ENTRYPOINT_HINT}, got {_show(value)}")


_IDENTITY_FIELDS = ("agent", "job_id", "room", "participant")


def _identity(value: object) -> str:
    text = _string(value)
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        raise _Invalid(f"bad braces in template {_show(text)}: {exc}") from None
    names = set()
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in _IDENTITY_FIELDS:
            allowed = ", ".join("{" + f + "}" for f in _IDENTITY_FIELDS)
            raise _Invalid(f"unknown placeholder {name!r} in {_show(text)}; allowed: {allowed}")
        if spec or conversion:
            raise _Invalid(f"placeholders take no format spec or conversion, got {_show(text)}")
        names.add(name)
    if "job_id" not in names:
        raise _Invalid(
            f"must contain {{job_id}} so each job gets a unique identity, got {_show(text)}"
        )
    return text


def _table_of(cls: type[T]) -> Check:
    def check(value: object) -> T:
        if not isinstance(value, dict):
            raise _Invalid(f"must be a table, got {_show(value)}")
        return _build(cls, value)

    return check


# --- the settings: each field's metadata holds its check ---


def _check(check: Check) -> dict[str, Check]:
    """Field metadata that makes a field settable from the manifest, validated by ``check``."""
    return {"check": check}


K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping that keeps insertion order.

    Unlike MappingProxyType it can be hashed, pickled and deep-copied (``dataclasses.asdict``
    deep-copies), so the frozen settings dataclasses stay ordinary values.
    """

    def __init__(self, data: Mapping[K, V] | Iterable[tuple[K, V]] = ()) -> None:
        self._data: dict[K, V] = dict(data)

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FrozenMap, (self._data,))


# The framework of an agent that runs its own program (``command``), not a Python entrypoint.
COMMAND = "command"
_URL = _starts_with("ws://", "wss://", "http://", "https://")
_DISPATCH = _choice("explicit", "automatic")
_JOB_TYPE = _choice("room", "publisher", "participant")
_START_METHOD = _choice("forkserver", "spawn")
_FRAMEWORK = _choice(AUTO, *FRAMEWORKS)
# What happens when a job fails (lkrun.recovery.ON_FAILURE; not imported: it is heavy).
_ON_FAILURE = _choice("none", "redispatch")
_ATTRIBUTES = _string_table()
_ENV_TABLE = _string_table(re.compile(r"[A-Za-z_][A-Za-z0-9_]*"))
# The job processes' log level (lkrun.child.runner): a bad one fails every job at its start.
JOB_LOG_LEVEL_ENV = "LKRUN_JOB_LOG_LEVEL"
# The defaults of job_threads and malloc_arena_max, chosen by measurement (README "Threads
# and malloc arenas per job"; lkrun.supervision.agent_processes.resource_env sets them).
JOB_THREADS = 2
MALLOC_ARENA_MAX = 2


def log_level_problem(value: str) -> str | None:
    """Why ``value`` of LKRUN_JOB_LOG_LEVEL would fail every job process, or None."""
    if isinstance(logging.getLevelName(value.upper()), int):  # a name logging knows
        return None
    return f"must be a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL), got {_show(value)}"


def _env(value: object) -> Mapping[str, str]:
    env = _ENV_TABLE(value)
    level = env.get(JOB_LOG_LEVEL_ENV)
    if level is not None and (problem := log_level_problem(level)) is not None:
        raise _Invalid(problem, JOB_LOG_LEVEL_ENV)
    return env


_AGENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class LiveKitSettings:
    """The ``[livekit]`` table. Every field is optional: the CLI and environment fill gaps."""

    url: str | None = field(default=None, metadata=_check(_URL))
    api_key: str | None = field(default=None, metadata=_check(_non_empty_string))
    api_secret: str | None = field(default=None, metadata=_check(_secret), repr=False)


@dataclass(frozen=True)
class DaemonSettings:
    """The ``[daemon]`` table."""

    # This daemon's name in status, job listings, metrics, JSON logs and on its agents'
    # participants (attribute lkrun.daemon); "": the host name.
    name: str = field(default="", metadata=_check(_string))
    # A relative path is made relative to the manifest's directory by parse_manifest.
    control_socket: Path | None = field(default=None, metadata=_check(_path))
    # Where the job history and job logs go unless `database`/`log_dir` say otherwise;
    # None: $XDG_STATE_HOME/lkrun. One per daemon when several run on one host.
    state_dir: Path | None = field(default=None, metadata=_check(_path))
    # After SIGTERM, how long running jobs may go on before they are asked to stop (seconds).
    drain_timeout: float = field(default=1800.0, metadata=_check(_duration))
    # How long a job gets after a shutdown request before it is killed (seconds).
    shutdown_timeout: float = field(default=10.0, metadata=_check(_duration))
    # Health/metrics HTTP server, "host:port" (see parse_host_port); "" disables it.
    http_addr: str = field(default="127.0.0.1:8081", metadata=_check(_http_addr))
    # The web dashboard on that server (lkrun.dashboard); false: only /healthz, /readyz,
    # /metrics.
    dashboard: bool = field(default=True, metadata=_check(_boolean))
    # Required by every dashboard request when set ("" falls back to env
    # LKRUN_DASHBOARD_TOKEN); with none, a non-loopback http_addr serves the dashboard
    # disabled (403).
    dashboard_token: str = field(default="", metadata=_check(_dashboard_token), repr=False)
    # Job history (SQLite); None: $XDG_STATE_HOME/lkrun/jobs.db. Relative: to the manifest.
    database: Path | None = field(default=None, metadata=_check(_path))
    # Per-job log files; None: $XDG_STATE_HOME/lkrun/logs. Relative: to the manifest.
    log_dir: Path | None = field(default=None, metadata=_check(_path))
    # Ended jobs and their logs older than this are deleted.
    history_retention: float = field(default=7 * 86400.0, metadata=_check(_duration))
    # A job's log file is rotated at this size (one rotated file is kept).
    job_log_max_mb: int = field(default=5, metadata=_check(_int_at_least(1)))
    # Machine CPU use (0..1] that counts as busy: it raises the load reported (steering
    # jobs to less busy workers), and after `overload_after` makes every agent full.
    # "off" (inf): the CPU counts for nothing, only max_jobs and draining make an agent full.
    load_threshold: float = field(default=0.75, metadata=_check(_threshold))
    # How long the CPU must stay at or over load_threshold before agents report full;
    # "off" (inf): never. A short peak must not make the last worker drop dispatches.
    overload_after: float = field(default=30.0, metadata=_check(_duration_or_off))
    # The agents' defaults for their fields of the same names (DAEMON_DEFAULTS).
    on_failure: str = field(default="none", metadata=_check(_ON_FAILURE))
    max_redispatches: int = field(default=2, metadata=_check(_int_at_least(0)))
    empty_timeout: float = field(default=0.0, metadata=_check(_duration_zero_off))
    job_threads: int = field(default=JOB_THREADS, metadata=_check(_int_at_least(0)))
    malloc_arena_max: int = field(default=MALLOC_ARENA_MAX, metadata=_check(_int_at_least(0)))


@dataclass(frozen=True)
class Permissions:
    """``[agents.NAME.permissions]``: the subset of LiveKit's ParticipantPermission we expose."""

    can_publish: bool = field(default=True, metadata=_check(_boolean))
    can_subscribe: bool = field(default=True, metadata=_check(_boolean))
    can_publish_data: bool = field(default=True, metadata=_check(_boolean))
    can_update_metadata: bool = field(default=True, metadata=_check(_boolean))
    hidden: bool = field(default=False, metadata=_check(_boolean))


_PERMISSIONS = _table_of(Permissions)


@dataclass(frozen=True)
class AppInfo:
    """What the entrypoint turned out to be, found by the import check (lkrun.entrypoints)."""

    framework: str  # lkrun | livekit-agents | command
    kind: str  # function | AgentServer | ServerOptions | command
    version: str = ""  # of livekit-agents
    agent_name: str | None = None  # the name the app's own server object gives; None: none
    setup: bool = False  # a setup (prewarm) function: the app's or the manifest's
    on_request: bool = False
    on_session_end: bool = False
    applied: tuple[str, ...] = ()  # manifest fields whose value came from the app
    warnings: tuple[str, ...] = ()
    # The version of the interpreter the check ran the code under (AgentSpec.interpreter)
    # and of the livekit (rtc) it imported. Facts about the env: a reload that finds them
    # (or ``version``) changed, after a pip install into the env, replaces the agent's
    # processes (lkrun.supervision.agent_processes), so status shows what they loaded.
    python_version: str = ""
    livekit_version: str = ""
    # A command agent's program and arguments, the program as found (on PATH or made
    # absolute); () for a Python agent.
    command: tuple[str, ...] = ()
    # The inference runners the app's code registers, (method, "module:Class") pairs: its
    # environment's shared inference process runs them (lkrun.supervision.inference).
    runners: tuple[tuple[str, str], ...] = ()

    def summary(self) -> str:
        """One line for `lkrun check` and `lkrun status`."""
        if self.framework == LKRUN:
            return "lkrun function"
        if self.framework == COMMAND:
            return f"command: {shlex.join(self.command)}"
        text = f"livekit-agents {self.version} {self.kind}".replace("  ", " ")
        parts = [
            name
            for name, present in (
                ("setup_fnc", self.setup),
                ("on_request", self.on_request),
                ("on_session_end", self.on_session_end),
            )
            if present
        ]
        if self.applied:
            parts.append("from the app: " + ", ".join(self.applied))
        if self.runners:
            parts.append("inference runners: " + ", ".join(m for m, _ in self.runners))
        return f"{text} ({'; '.join(parts)})" if parts else text


@dataclass(frozen=True)
class AgentSpec:
    """One ``[agents.NAME]`` table; ``name`` is its key."""

    name: str
    # Required unless ``command`` is given (checked by _agent).
    entrypoint: str = field(default="", metadata=_check(_entrypoint))
    # A program that speaks the job pipe protocol (docs/protocol.md) instead of a Python
    # entrypoint: ["node", "agent.mjs"]. Run in the manifest's directory; a program given as
    # a path is relative to it, a bare name is looked up on PATH.
    command: tuple[str, ...] = field(default=(), metadata=_check(_command))
    dispatch: str = field(default="explicit", metadata=_check(_DISPATCH))
    job_type: str = field(default="room", metadata=_check(_JOB_TYPE))
    rooms: tuple[str, ...] = field(default=(), metadata=_check(_list_of_non_empty_strings))
    max_jobs: int = field(default=16, metadata=_check(_int_at_least(1)))
    identity: str = field(default="{agent}-{job_id}", metadata=_check(_identity))
    participant_name: str = field(default="", metadata=_check(_string))
    participant_metadata: str = field(default="", metadata=_check(_string))
    participant_attributes: Mapping[str, str] = field(
        default_factory=FrozenMap, metadata=_check(_ATTRIBUTES)
    )
    permissions: Permissions = field(default=Permissions(), metadata=_check(_PERMISSIONS))
    namespace: str = field(default="", metadata=_check(_string))
    env: Mapping[str, str] = field(default_factory=FrozenMap, metadata=_check(_env))
    # Resident memory (MiB) of a job's process tree above which the job is killed; 0: no limit.
    memory_limit_mb: int = field(default=0, metadata=_check(_int_at_least(0)))
    # Seconds a job may run before it is stopped; 0: no limit.
    job_timeout: float = field(default=0.0, metadata=_check(_duration))
    # Seconds a job may stay alone in its room (no participant but agents) before it ends
    # itself, a success with reason "room empty" (lkrun.shared.empty_room); 0: never.
    # Unset: [daemon]'s.
    empty_timeout: float = field(default=0.0, metadata=_check(_duration_zero_off))
    # The size of the thread pools that otherwise grow with the machine's cores, in each job
    # process: the rtc runtime's tokio workers (TOKIO_WORKER_THREADS) and numpy's OpenBLAS
    # (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS); 0: no cap. A variable the
    # agent's ``env`` sets wins. Unset: [daemon]'s.
    job_threads: int = field(default=JOB_THREADS, metadata=_check(_int_at_least(0)))
    # glibc's MALLOC_ARENA_MAX in each job process: at most this many malloc arenas however
    # many threads allocate (glibc's own limit is 8 per core); 0: glibc's. The agent's
    # ``env`` wins. Unset: [daemon]'s.
    malloc_arena_max: int = field(default=MALLOC_ARENA_MAX, metadata=_check(_int_at_least(0)))
    # Job processes kept started ahead of time (module imported, prewarm run), one job each.
    idle_processes: int = field(default=0, metadata=_check(_int_at_least(0)))
    # Optional "pkg.module:function" run once per process before its job; its result is
    # ctx.userdata.
    prewarm: str = field(default="", metadata=_check(_optional_entrypoint))
    # How long loading the module and running prewarm may take.
    prewarm_timeout: float = field(default=60.0, metadata=_check(_positive_duration))
    # "forkserver": jobs are forked from a process that imported the module once (less
    # memory, millisecond starts); "spawn": each job is a new interpreter, for modules that
    # start threads at import time (threads do not survive a fork).
    start_method: str = field(default="forkserver", metadata=_check(_START_METHOD))
    # When a job fails (crash, memory_limit kill, an entrypoint that raised...) while its
    # caller is still in the room: "redispatch" sends the agent there again (lkrun.recovery),
    # at most max_redispatches times per call; "none" leaves the job failed. Unset: [daemon]'s.
    on_failure: str = field(default="none", metadata=_check(_ON_FAILURE))
    max_redispatches: int = field(default=2, metadata=_check(_int_at_least(0)))
    # The API the entrypoint is written for: "lkrun", "livekit-agents", or "auto" (detected).
    framework: str = field(default=AUTO, metadata=_check(_FRAMEWORK))
    # The interpreter that runs the agent's code (typically a virtualenv's bin/python),
    # relative to the manifest; None: the daemon's own (lkrun.interpreter).
    python: Path | None = field(default=None, metadata=_check(_path))
    # Pass LIVEKIT_API_KEY and LIVEKIT_API_SECRET to the job's environment (off: a job could
    # then mint a token for any room of the project).
    pass_credentials: bool = field(default=False, metadata=_check(_boolean))
    # How long a livekit-agents on_request may take before the offer is declined.
    request_timeout: float = field(default=2.0, metadata=_check(_positive_duration))
    # How long a job gets after a shutdown request before it is killed; 0: the daemon's.
    shutdown_timeout: float = field(default=0.0, metadata=_check(_duration))
    # The fields the manifest sets itself; the app's own settings fill in the others.
    explicit: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    # Filled in by the import check (lkrun.entrypoints.check_entrypoints).
    app: AppInfo | None = None

    @property
    def registered_name(self) -> str:
        """The agent name sent to LiveKit: empty means automatic dispatch."""
        return "" if self.dispatch == "automatic" else self.name

    def registration_key(self) -> tuple[Any, ...]:
        """What LiveKit sees of this agent: when it changes, the worker must register anew."""
        return (self.registered_name, self.job_type, self.namespace, self.permissions)

    @property
    def interpreter(self) -> str:
        """The Python that runs the agent's code: its own ``python``, else the daemon's."""
        return str(self.python) if self.python is not None else sys.executable

    @property
    def resolved_framework(self) -> str:
        """The API the entrypoint uses, as the import check found it (else as configured)."""
        return self.app.framework if self.app is not None else self.framework

    @property
    def module(self) -> str:
        """The entrypoint's module, or its file (an absolute path once parsed)."""
        return split_entrypoint(self.entrypoint)[0]

    @property
    def function(self) -> str:
        return split_entrypoint(self.entrypoint)[1]

    def accepts_room(self, room: str) -> bool:
        return not self.rooms or any(fnmatch.fnmatchcase(room, glob) for glob in self.rooms)

    @property
    def _framework_defaults(self) -> bool:
        """A livekit-agents app gets the official worker's identity and name unless the
        manifest sets them: clients written against that worker look for its form."""
        return self.resolved_framework == LIVEKIT_AGENTS

    def format_identity(self, *, job_id: str, room: str, participant: str = "") -> str:
        template = self.identity
        if self._framework_defaults and "identity" not in self.explicit:
            template = "agent-{job_id}"
        return template.format(agent=self.name, job_id=job_id, room=room, participant=participant)

    def display_name(self) -> str:
        if self._framework_defaults and "participant_name" not in self.explicit:
            return ""
        return self.participant_name or self.name


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. ``path`` is kept as given, for messages."""

    path: Path
    livekit: LiveKitSettings
    daemon: DaemonSettings
    agents: Mapping[str, AgentSpec]  # in file order
    _workdir: Path = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Fixed at load time so a later chdir cannot move where job code is imported from.
        object.__setattr__(self, "_workdir", self.path.resolve().parent)

    @property
    def workdir(self) -> Path:
        """The manifest's directory, absolute: job code is imported relative to it."""
        return self._workdir


def check_agent_field(name: str, value: Any) -> Any:
    """``value`` for AgentSpec field ``name``, validated as if the manifest had set it;
    ValueError with the reason otherwise."""
    field_ = _settable(AgentSpec).get(name)
    if field_ is None:
        raise ValueError(f"{name!r} is not an agent setting")
    try:
        return field_.metadata["check"](value)
    except _Invalid as exc:
        raise ValueError(exc.message if exc.key is None else f"{exc.key}: {exc.message}") from None


# --- building dataclasses from tables ---


def _settable(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if "check" in f.metadata}


def _check_keys(table: Mapping[str, object], allowed: Iterable[str]) -> None:
    names = list(allowed)
    for key in table:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(names)}"
            raise _Invalid(f"unknown key; {hint}", key)


def _build(cls: type[T], table: Mapping[str, Any], **fixed: Any) -> T:
    """Check every key of ``table`` against ``cls``'s fields and construct it."""
    fields = _settable(cls)
    _check_keys(table, fields)
    values = dict(fixed)
    for name, spec in fields.items():
        if name not in table:
            if spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
                raise _Invalid("is required", name)
            continue
        try:
            values[name] = spec.metadata["check"](table[name])
        except _Invalid as exc:
            exc.key = name if exc.key is None else f"{name}.{exc.key}"
            raise
    return cls(**values)


# --- the manifest ---

_TOP_LEVEL = ("livekit", "daemon", "agents")


def parse_manifest(text: str, path: str | Path) -> Manifest:
    """Parse and validate manifest ``text``; ``path`` is used for messages and relative paths."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(path, f"invalid TOML: {exc}") from None
    try:
        _check_keys(data, _TOP_LEVEL)
    except _Invalid as exc:
        raise ManifestError(path, exc.message, field=exc.key) from None
    livekit = _section(path, data, "livekit", LiveKitSettings)
    daemon = _section(path, data, "daemon", DaemonSettings)
    agents = _agents(path, data.get("agents"))
    manifest = Manifest(Path(path), livekit, daemon, FrozenMap(agents))
    # Relative paths in [daemon] are relative to the manifest, not to wherever lkrun runs.
    relative = {
        name: manifest.workdir / value
        for name in ("control_socket", "state_dir", "database", "log_dir")
        if (value := getattr(daemon, name)) is not None and not value.is_absolute()
    }
    if relative:
        manifest = dataclasses.replace(manifest, daemon=dataclasses.replace(daemon, **relative))
    agents = {name: _with_daemon_defaults(daemon, spec) for name, spec in agents.items()}
    files = {name: _with_files(path, manifest.workdir, spec) for name, spec in agents.items()}
    files = {name: _with_command(path, manifest.workdir, spec) for name, spec in files.items()}
    files = {name: _with_python(path, manifest.workdir, spec) for name, spec in files.items()}
    return dataclasses.replace(manifest, agents=FrozenMap(files))


# Agent fields whose default is the [daemon] field of the same name.
DAEMON_DEFAULTS = (
    "on_failure",
    "max_redispatches",
    "empty_timeout",
    "job_threads",
    "malloc_arena_max",
)


def _with_daemon_defaults(daemon: DaemonSettings, spec: AgentSpec) -> AgentSpec:
    """``spec`` with the [daemon] table's value of each DAEMON_DEFAULTS field it leaves unset."""
    unset = {name: getattr(daemon, name) for name in DAEMON_DEFAULTS if name not in spec.explicit}
    return dataclasses.replace(spec, **unset) if unset else spec


_FILE_FIELDS = ("entrypoint", "prewarm")


def _with_files(path: str | Path, workdir: Path, spec: AgentSpec) -> AgentSpec:
    """``spec`` with its file entrypoint and prewarm made absolute (relative paths are
    relative to the manifest) and checked to exist: every process that imports them gets
    the same file, wherever it runs."""
    changes = {}
    for name in _FILE_FIELDS:
        source, function = split_entrypoint(getattr(spec, name))
        if not is_file_source(source):
            continue
        file = workdir / source
        if not file.is_file():
            shown = source if source == str(file) else f"{source} (looked for {file})"
            message = f"no such file: {shown}" if not file.exists() else f"not a file: {shown}"
            raise ManifestError(path, message, agent=spec.name, field=name)
        changes[name] = f"{file}:{function}"
    return dataclasses.replace(spec, **changes) if changes else spec


def _with_python(path: str | Path, workdir: Path, spec: AgentSpec) -> AgentSpec:
    """``spec`` with its ``python`` made absolute (``~`` expanded; relative to the manifest)
    and checked to be an executable file. Symlinks are kept as they are: a virtualenv's
    bin/python is a link to the base interpreter, and the link's path is what makes it
    the env's."""
    if spec.python is None:
        return spec
    given = spec.python.expanduser()
    python = given if given.is_absolute() else workdir / given
    shown = str(spec.python) if python == spec.python else f"{spec.python} (looked for {python})"
    problem = ""
    if not python.exists():
        problem = "no such file" if not python.is_symlink() else "a broken symlink"
    elif python.is_dir():
        problem = "a directory, not an interpreter (e.g. venv/bin/python)"
    elif not os.access(python, os.X_OK):
        problem = "not executable"
    if problem:
        message = f"{problem}: {shown}; give the path of a Python interpreter"
        raise ManifestError(path, message, agent=spec.name, field="python")
    return dataclasses.replace(spec, python=python)


def _with_command(path: str | Path, workdir: Path, spec: AgentSpec) -> AgentSpec:
    """``spec`` with its command's program made absolute when it is given as a path
    (relative to the manifest; ``~`` expanded) and checked to be an executable file. A bare
    name stays as it is: the check and each launch find it on the job's PATH (find_program)."""
    if not spec.command:
        return spec
    # Each job is a process of its own (or a warm one started ahead): no fork server.
    spec = dataclasses.replace(spec, start_method="spawn")
    program, *args = spec.command
    given = Path(program).expanduser()
    if "/" not in program and given == Path(program):
        return spec
    file = given if given.is_absolute() else workdir / given
    if problem := program_problem(file):
        shown = program if str(file) == program else f"{program} (looked for {file})"
        raise ManifestError(path, f"{problem}: {shown}", agent=spec.name, field="command")
    return dataclasses.replace(spec, command=(str(file), *args))


def find_program(program: str, path: str | None = None) -> tuple[str, str]:
    """A command's program as it will be run: ``(file, "")``, or ``(program, why not)``.
    A bare name is looked up on ``path`` (the job's PATH), a path is taken as it is."""
    if "/" in program:
        return program, program_problem(Path(program))
    found = shutil.which(program, path=path if path is not None else os.defpath)
    if found is None:
        return program, "not found on PATH" + (f" ({path})" if path else "")
    return found, ""


def program_problem(file: Path) -> str:
    """Why ``file`` cannot be run as a program ("" if it can)."""
    if not file.exists():
        return "no such program" if not file.is_symlink() else "a broken symlink"
    if file.is_dir():
        return "a directory, not a program"
    if not os.access(file, os.X_OK):
        return "not executable"
    return ""


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ManifestError(path, f"cannot read file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ManifestError(path, f"cannot read file: not UTF-8 text ({exc.reason})") from None
    return parse_manifest(text, path)


def _section(path: str | Path, data: Mapping[str, Any], name: str, cls: type[T]) -> T:
    value = data.get(name, {})
    try:
        return _table_of(cls)(value)
    except _Invalid as exc:
        shown = name if exc.key is None else f"{name}.{exc.key}"
        raise ManifestError(path, exc.message, field=shown) from None


def _agents(path: str | Path, value: object) -> dict[str, AgentSpec]:
    if value is None or value == {}:
        raise ManifestError(path, "no agents defined; add an [agents.NAME] table", field="agents")
    if not isinstance(value, dict):
        raise ManifestError(path, f"must be a table of agents, got {_show(value)}", field="agents")
    agents = {name: _agent(path, name, table) for name, table in value.items()}
    check_pools(path, agents.values())
    return agents


def _agent(path: str | Path, name: str, table: object) -> AgentSpec:
    if not _AGENT_NAME.fullmatch(name):
        message = "invalid name: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric"
        raise ManifestError(path, message, agent=name)
    if not isinstance(table, dict):
        raise ManifestError(path, f"must be a table, got {_show(table)}", agent=name)
    try:
        spec = _build(AgentSpec, table, name=name, explicit=frozenset(table))
    except _Invalid as exc:
        raise ManifestError(path, exc.message, agent=name, field=exc.key) from None
    _check_program_kind(path, spec)
    return spec


# What only a Python agent has: a command agent runs its own program instead.
PYTHON_ONLY = ("entrypoint", "prewarm", "framework", "start_method", "python")


def _check_program_kind(path: str | Path, spec: AgentSpec) -> None:
    """An agent is a Python entrypoint or a ``command``, never both nor neither."""
    if not spec.command:
        if "entrypoint" not in spec.explicit:
            message = 'is required (or command = ["program", ...] for an agent in another language)'
            raise ManifestError(path, message, agent=spec.name, field="entrypoint")
        return
    for name in PYTHON_ONLY:
        if name in spec.explicit:
            message = (
                "cannot be set with command: a command agent runs its own program, "
                "which speaks the job pipe protocol (docs/protocol.md)"
            )
            raise ManifestError(path, message, agent=spec.name, field=name)


def check_pools(path: str | Path, agents: Iterable[AgentSpec]) -> None:
    # LiveKit groups automatic workers by (namespace, job type); two such agents would share
    # one pool and receive each other's jobs.
    seen: dict[tuple[str, str], str] = {}
    for spec in agents:
        if spec.dispatch != "automatic":
            continue
        pool = (spec.namespace, spec.job_type)
        first = seen.setdefault(pool, spec.name)
        if first != spec.name:
            message = (
                f"automatic agents {first!r} and {spec.name!r} have the same namespace "
                f"{spec.namespace!r} and job_type {spec.job_type!r}; "
                "LiveKit would treat them as one worker pool"
            )
            raise ManifestError(path, message, agent=spec.name, field="dispatch")
