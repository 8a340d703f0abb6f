"""The systems under test: an lkrun daemon, or an official LiveKit Agents worker.

Both expose the same view to the bench: start and stop, the pid of the main process,
how many jobs run, which process runs the job of a given room, and offer -> entrypoint
times. lkrun is read through its CLI (``lkrun status --json``, ``lkrun jobs ls --json``);
the official worker through its ``/worker`` HTTP endpoint and the events its bench
script writes (see ``official_worker.py``).

Each runs the agent of one workload (``WORKLOADS``): ``join`` (join the room and stay:
lkrun's own API in ``agents.py``, a livekit-agents entrypoint in ``official_worker.py``)
or ``agents`` (both run the same livekit-agents module, ``lka_agent.py``: an AgentSession
with an in-process LLM) or ``media`` (a level meter on a 48 kHz tone: lkrun runs its
example ``lkrun/examples/level_meter.py``, the official worker the same meter written
against livekit-agents, ``lka_meter.py``). The agents workload's events (``events.jsonl``)
are written by the agent itself on both hosts.

Two workloads compare lkrun with itself (issue 18), each with a system of its own:
``venv`` runs ``lka_agent.py`` on the daemon's interpreter (``lkrun``) and, with the
manifest's ``python``, on another virtualenv's (``lkrun-venv``); ``node`` runs the Python
echo ``lkrun/examples/echo.py`` (``lkrun``) and the Node echo ``examples/node/echo/echo.mjs``,
a ``command`` agent (``node``).
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from tests.bench.procs import Registry, Spawned, descendants

REPO = Path(__file__).resolve().parents[2]
OFFICIAL_SCRIPT = Path(__file__).resolve().parent / "official_worker.py"
ACTIVE = ("starting", "running", "stopping")
NODE_ECHO = REPO / "examples" / "node" / "echo" / "echo.mjs"
WORKLOADS = ("join", "agents", "media", "venv", "node", "recovery")
MAX_JOBS = 200  # lkrun's max_jobs, unless a ramp goes further (run.py)
# What lkrun's manifest names, per workload (the official worker picks by BENCH_WORKLOAD;
# the node system of the node workload runs NODE_ECHO instead).
LKRUN_ENTRYPOINTS = {
    "join": "tests.bench.agents:entrypoint",
    "agents": "tests.bench.lka_agent:server",
    "media": "lkrun.examples.level_meter:entrypoint",
    "venv": "tests.bench.lka_agent:server",
    "node": "lkrun.examples.echo:entrypoint",
    # The join workload's agent, whose job the bench kills (issue 19).
    "recovery": "tests.bench.agents:entrypoint",
}
# Workloads whose agent is tests/bench/lka_agent.py: it writes events.jsonl and preloads
# livekit-agents in the fork server (hence the official worker's prewarm timeout).
LKA_WORKLOADS = ("agents", "venv")
# The agent's dispatch name after bench-<system>, per workload.
NAME_SUFFIXES = {
    "join": "",
    "agents": "-lka",
    "media": "-meter",
    "venv": "-env",
    "node": "-echo",
    "recovery": "-recover",
}


class SutError(Exception):
    """The system under test could not start or answer."""


@dataclass(frozen=True)
class Server:
    url: str  # ws://127.0.0.1:PORT
    http_url: str
    api_key: str
    api_secret: str
    log_path: Path | None = None  # livekit-server's log, to tell why offers did not come

    def env(self) -> dict[str, str]:
        return {
            "LIVEKIT_URL": self.url,
            "LIVEKIT_API_KEY": self.api_key,
            "LIVEKIT_API_SECRET": self.api_secret,
        }


class Sut(abc.ABC):
    system: str

    def __init__(
        self,
        *,
        variant: str,
        idle: int,
        server: Server,
        workdir: Path,
        registry: Registry,
        workload: str = "join",
        job_env: Mapping[str, str] | None = None,
        daemon_settings: Sequence[str] = (),
        max_jobs: int = MAX_JOBS,
    ) -> None:
        if workload not in WORKLOADS:
            raise ValueError(f"unknown workload {workload!r}")
        # --job-env: variables for the job processes, on both hosts (lkrun: the agent's
        # manifest env, which wins over its own settings; official: the worker's
        # environment, which its job processes inherit).
        self.job_env = dict(job_env or {})
        # --daemon-setting: ``key = value`` lines for lkrun's [daemon] table.
        self.daemon_settings = list(daemon_settings)
        self.variant = variant
        self.idle = idle
        self.server = server
        self.workdir = workdir
        self.registry = registry
        self.workload = workload
        self.max_jobs = max_jobs  # lkrun's max_jobs; the official worker's load is shaped by it
        self.events_path = workdir / "events.jsonl"
        self.proc: Spawned | None = None
        self.notes: list[str] = []
        self.offer_source = ""  # where offer_to_entrypoint_ms read its times
        self.started_utc = ""  # ISO time of start(), to read the server log from there

    @property
    def agent_name(self) -> str:
        """The dispatch name: one per system and workload, so no leftover takes a job."""
        return f"bench-{self.system}{NAME_SUFFIXES[self.workload]}"

    @property
    def label(self) -> str:
        return f"{self.system}-{self.variant}"

    @property
    def main_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is None or not self.proc.alive():
            tail = self.proc.log_tail() if self.proc else ""
            raise SutError(f"{self.label}: the process exited\n{tail}")

    @abc.abstractmethod
    async def start(self, timeout: float = 90.0) -> None: ...

    async def stop(self) -> None:
        """SIGTERM (twice for lkrun: skip the drain), then SIGKILL whatever is left."""
        if self.proc is not None:
            proc, self.proc = self.proc, None
            signals = 2 if isinstance(self, LkrunSut) else 1
            await asyncio.to_thread(proc.stop, signals=signals, timeout=20)
            self.registry.forget(proc)

    @abc.abstractmethod
    async def active_jobs(self) -> int: ...

    @abc.abstractmethod
    async def idle_ready(self) -> int | None:
        """Prewarmed processes ready for a job, or None if the system does not say."""

    @abc.abstractmethod
    async def job_pids(self, rooms: list[str]) -> dict[str, int]:
        """room -> pid of the process running that room's job (running jobs only)."""

    @abc.abstractmethod
    async def offer_to_entrypoint_ms(self, rooms: list[str]) -> dict[str, float]:
        """room -> offer -> entrypoint (ms); sets ``offer_source``."""

    async def offer_to_started_ms(self, rooms: list[str]) -> dict[str, float]:
        """room -> the host's own offer -> started (ms), where it keeps one apart from
        ``offer_to_entrypoint_ms``; empty otherwise."""
        return {}

    def events(self) -> list[dict[str, Any]]:
        """The JSON lines in events.jsonl (written by the agent or the worker script)."""
        try:
            text = self.events_path.read_text()
        except FileNotFoundError:
            return []
        events = []
        for line in text.splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
        return events

    def _entrypoints(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e["event"] == "entrypoint"]

    def event_offers_ms(self, rooms: list[str]) -> dict[str, float]:
        """room -> ``entrypoint_at - received_at`` from the entrypoint events (ms)."""
        wanted = set(rooms)
        return {
            e["room"]: (e["entrypoint_at"] - e["received_at"]) * 1000
            for e in self._entrypoints()
            if e["room"] in wanted and e.get("received_at")
        }

    @abc.abstractmethod
    async def failed_jobs(self, rooms: list[str]) -> list[str]:
        """Errors of failed jobs in these rooms (what the system reports)."""

    @abc.abstractmethod
    def why_missing(self, rooms: list[str]) -> str:
        """What the system's own log says about these rooms' jobs, in one line."""

    def server_refusals(self) -> str:
        """What livekit-server logged about job requests it could not send to this agent.

        A worker that reports itself full (lkrun: machine CPU at ``load_threshold``) or at
        its target load gets no offer at all; the server logs "failed to send job request"
        with the agent name, and the host's own log says nothing.
        """
        if self.server.log_path is None:
            return ""
        needle = f'"agentName": "{self.agent_name}"'
        count, last = 0, ""
        try:
            with open(self.server.log_path, errors="replace") as log:
                for line in log:
                    # Lines start with the UTC time, e.g. 2026-01-01T10:00:00.000Z.
                    if line[: len(self.started_utc)] < self.started_utc:
                        continue
                    if "failed to send job request" in line and needle in line:
                        count += 1
                        last = line
        except OSError:
            return ""
        if not count:
            return ""
        try:
            error = json.loads(last[last.index("{") :]).get("error", "")
        except (ValueError, AttributeError):
            error = ""
        return (
            f"livekit-server logged {count} 'failed to send job request' for "
            f"{self.agent_name} since it started" + (f", last: {error}" if error else "")
        )

    def _log_lines(self, name: str, rooms: list[str]) -> list[str]:
        try:
            text = (self.workdir / name).read_text(errors="replace")
        except OSError:
            return []
        return [
            line
            for line in text.splitlines()
            if any(f"{r}'" in line or f'{r}"' in line for r in rooms)
        ]

    async def wait_idle_ready(self, timeout: float = 90.0) -> bool:
        if self.idle <= 0:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            ready = await self.idle_ready()
            if ready is None or ready >= self.idle:
                return True
            await asyncio.sleep(0.5)
        return False

    async def wait_no_jobs(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if await self.active_jobs() == 0:
                    return True
            except SutError:
                pass  # alive but too busy to answer (many jobs ending at once): ask again
            await asyncio.sleep(0.3)
        return False


class LkrunSut(Sut):
    """An lkrun daemon serving one agent: the workload's entrypoint on the daemon's
    interpreter, or on ``python`` (the manifest's ``python``, system ``lkrun-venv``), or a
    ``command`` agent (system ``node``)."""

    system = "lkrun"

    def __init__(
        self,
        *,
        tmpdir: Path,
        system: str = "lkrun",
        python: Path | None = None,
        command: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.system = system  # before super(): it names the agent
        super().__init__(**kwargs)
        self.python = python
        self.command = command or []
        self.tmpdir = tmpdir  # manifest and control socket (short path for AF_UNIX)
        self.socket = tmpdir / "ctl.sock"
        self.manifest = tmpdir / "agents.toml"
        self._limit_flag = True

    def manifest_text(self) -> str:
        lines = [
            "[daemon]",
            'load_threshold = "off"  # as the official worker\'s inf: the CPU never makes it full',
            'shutdown_timeout = "5s"',
            *self.daemon_settings,
            "",
            f"[agents.{self.agent_name}]",
        ]
        if self.command:
            lines.append(f"command = {json.dumps(self.command)}")
        else:
            lines.append(f'entrypoint = "{LKRUN_ENTRYPOINTS[self.workload]}"')
        env = dict(self.job_env)
        if self.python is not None:
            # The daemon's PYTHONPATH is not passed to another interpreter: the agent's env
            # names the repository, where tests.bench.lka_agent is.
            lines.append(f"python = {json.dumps(str(self.python))}")
            env["PYTHONPATH"] = str(REPO)
        if env:
            pairs = ", ".join(f"{name} = {json.dumps(value)}" for name, value in env.items())
            lines.append(f"env = {{ {pairs} }}")
        lines += ['dispatch = "explicit"', f"max_jobs = {self.max_jobs}"]
        if self.workload == "recovery":
            # A killed job's call gets its agent back (lkrun.recovery); each kill is a new
            # call's first job.
            lines += ['on_failure = "redispatch"', "max_redispatches = 1"]
        if self.idle > 0:
            lines.append(f"idle_processes = {self.idle}")
        if self.workload in LKA_WORKLOADS:
            # The official worker's initialize_process_timeout in the bench.
            lines.append('prewarm_timeout = "120s"')
        return "\n".join(lines) + "\n"

    async def start(self, timeout: float = 90.0) -> None:
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.events_path.unlink(missing_ok=True)
        self.started_utc = _utc_now()
        self.manifest.write_text(self.manifest_text())
        (self.workdir / "agents.toml").write_text(self.manifest_text())
        self.proc = self.registry.spawn(
            self.label,
            [
                sys.executable,
                "-m",
                "lkrun",
                "serve",
                str(self.manifest),
                "--http-addr",
                "127.0.0.1:0",
                "--control-socket",
                str(self.socket),
                "--no-reload",
            ],
            env=self._env(with_credentials=True),
            log_path=self.workdir / "daemon.log",
            cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                status = await self.cli("status")
            except SutError:
                status = None
            if status and status["agents"] and all(a["connected"] for a in status["agents"]):
                return
            await asyncio.sleep(0.5)
        raise SutError(f"{self.label}: agents not connected within {timeout:g}s")

    def _env(self, *, with_credentials: bool = False) -> dict[str, str]:
        # Job history and job logs go to $XDG_STATE_HOME/lkrun by default: keep the
        # bench's out of the user's own.
        env = dict(os.environ, PYTHONPATH=str(REPO), XDG_STATE_HOME=str(self.tmpdir / "state"))
        if self.workload in LKA_WORKLOADS:
            # Job processes inherit the daemon's environment; the app's agent_name is the
            # manifest key (else check and serve warn that they differ).
            env.update(BENCH_EVENTS=str(self.events_path), BENCH_AGENT_NAME=self.agent_name)
        if with_credentials:
            env.update(self.server.env())
        return env

    async def cli(self, *args: str) -> Any:
        """``python -m lkrun ARGS --json --control-socket SOCK``, parsed."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lkrun",
            *args,
            "--json",
            "--control-socket",
            str(self.socket),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env(),
            cwd=REPO,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise SutError(f"lkrun {' '.join(args)}: {err.decode(errors='replace').strip()}")
        return json.loads(out)

    async def jobs(self, *, include_ended: bool = False) -> list[dict[str, Any]]:
        if not include_ended:
            return list(await self.cli("jobs", "ls"))
        if self._limit_flag:
            try:
                # `--all` returns the newest 100 unless told otherwise.
                return list(await self.cli("jobs", "ls", "--all", "--limit", "100000"))
            except SutError as exc:
                if "--limit" not in str(exc):
                    raise
                self._limit_flag = False  # an lkrun without --limit: --all has no cap
        return list(await self.cli("jobs", "ls", "--all"))

    async def active_jobs(self) -> int:
        return sum(1 for job in await self.jobs() if job["status"] in ACTIVE)

    async def idle_ready(self) -> int | None:
        status = await self.cli("status")
        counts = [a.get("idle_processes") for a in status["agents"]]
        if any(c is None for c in counts):
            return None
        return int(sum(counts))

    async def job_pids(self, rooms: list[str]) -> dict[str, int]:
        wanted = set(rooms)
        return {
            job["room"]: int(job["pid"])
            for job in await self.jobs()
            if job["room"] in wanted and job["status"] in ACTIVE and job.get("pid")
        }

    async def offer_to_entrypoint_ms(self, rooms: list[str]) -> dict[str, float]:
        """From the agent's entrypoint events when it writes them (``received_at`` is the
        daemon's ``offered_at``), else lkrun's own ``offered_at`` -> ``started_at``."""
        from_events = self.event_offers_ms(rooms)
        if from_events:
            self.offer_source = "events.jsonl: entrypoint_at - RunningJobInfo.received_at"
            return from_events
        wanted = set(rooms)
        if any(e["room"] in wanted for e in self._entrypoints()):
            note = "RunningJobInfo.received_at was 0 in the jobs: offer -> started from jobs ls"
            if note not in self.notes:
                self.notes.append(note)
        self.offer_source = "lkrun jobs ls --json --all: offered_at -> started_at"
        return await self.offer_to_started_ms(rooms)

    async def offer_to_started_ms(self, rooms: list[str]) -> dict[str, float]:
        wanted = set(rooms)
        result: dict[str, float] = {}
        for job in await self.jobs(include_ended=True):
            if job["room"] not in wanted:
                continue
            value = job.get("offer_to_start_ms")
            if value is None and job.get("offered_at") and job.get("started_at"):
                value = (job["started_at"] - job["offered_at"]) * 1000
            if value is not None:
                result[job["room"]] = float(value)
        return result

    def why_missing(self, rooms: list[str]) -> str:
        declined = [_message(x) for x in self._log_lines("daemon.log", rooms) if "declined" in x]
        if declined:
            why = f"lkrun declined {len(declined)} offers, e.g. {declined[-1][:160]}"
        else:
            offered = len(self._log_lines("daemon.log", rooms))
            why = f"no offer declined in the daemon log, {offered} lines about these rooms"
        refusals = self.server_refusals()
        return f"{why}; {refusals}" if refusals else why

    async def failed_jobs(self, rooms: list[str]) -> list[str]:
        wanted = set(rooms)
        return [
            f"{job['room']}: {job.get('error', '')}"
            for job in await self.jobs(include_ended=True)
            if job["room"] in wanted and job["status"] == "failed"
        ]


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def _message(line: str) -> str:
    """The message of a JSON log line, else the line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return line.strip()
    return (
        str(record.get("msg") or record.get("message") or line)
        if isinstance(record, dict)
        else line.strip()
    )


class OfficialSut(Sut):
    system = "official"

    def __init__(self, *, python: Path, http_port: int, load: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.python = python
        self.http_port = http_port
        self.load = load  # "lkrun": lkrun-shaped load_fnc; "default": the worker's own
        self._http: aiohttp.ClientSession | None = None

    async def start(self, timeout: float = 90.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.events_path.unlink(missing_ok=True)
        self.started_utc = _utc_now()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(
            self.server.env(),
            BENCH_EVENTS=str(self.events_path),
            BENCH_AGENT_NAME=self.agent_name,
            BENCH_IDLE=str(self.idle),
            BENCH_HTTP_PORT=str(self.http_port),
            BENCH_LOAD=self.load,
            BENCH_MAX_JOBS=str(self.max_jobs),
            BENCH_WORKLOAD=self.workload,
            LIVEKIT_LOG_LEVEL="INFO",
        )
        env.update(self.job_env)
        self.proc = self.registry.spawn(
            self.label,
            [str(self.python), str(OFFICIAL_SCRIPT), "start"],
            env=env,
            log_path=self.workdir / "worker.log",
            cwd=self.workdir,
        )
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if any(e["event"] == "registered" for e in self.events()):
                return
            await asyncio.sleep(0.3)
        raise SutError(f"{self.label}: worker not registered within {timeout:g}s")

    async def stop(self) -> None:
        await super().stop()
        if self._http is not None:
            session, self._http = self._http, None
            await session.close()

    async def worker_info(self) -> dict[str, Any]:
        assert self._http is not None
        try:
            async with self._http.get(f"http://127.0.0.1:{self.http_port}/worker") as resp:
                resp.raise_for_status()
                return dict(await resp.json(content_type=None))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise SutError(f"{self.label}: /worker did not answer: {exc}") from exc

    async def active_jobs(self) -> int:
        return int((await self.worker_info()).get("active_jobs", 0))

    async def idle_ready(self) -> int | None:
        alive = {p.pid for p in descendants(self.main_pid)}
        warmed = {e["pid"] for e in self.events() if e["event"] == "prewarm"}
        used = {e["pid"] for e in self._entrypoints()}
        return len((warmed - used) & alive)

    async def job_pids(self, rooms: list[str]) -> dict[str, int]:
        wanted = set(rooms)
        result: dict[str, int] = {}
        for event in self._entrypoints():
            if event["room"] in wanted and psutil.pid_exists(event["pid"]):
                result[event["room"]] = int(event["pid"])
        return result

    async def offer_to_entrypoint_ms(self, rooms: list[str]) -> dict[str, float]:
        self.offer_source = "events.jsonl: entrypoint_at - RunningJobInfo.received_at"
        return self.event_offers_ms(rooms)

    def why_missing(self, rooms: list[str]) -> str:
        lines = self._log_lines("worker.log", rooms)
        requests = sum(1 for x in lines if "received job request" in x)
        refused = sum(1 for x in lines if '"available": false' in x)
        why = f"the worker logged {requests} job requests for these {len(rooms)} rooms" + (
            f", {refused} answered unavailable" if refused else ""
        )
        refusals = self.server_refusals()
        return f"{why}; {refusals}" if refusals else why

    async def failed_jobs(self, rooms: list[str]) -> list[str]:
        # The worker reports failures only in its log (JSON lines at level ERROR).
        errors = []
        try:
            lines = (self.workdir / "worker.log").read_text(errors="replace").splitlines()
        except OSError:
            return []
        wanted = set(rooms)
        for line in lines:
            if '"level": "ERROR"' not in line:
                continue
            if any(room in line for room in wanted):
                errors.append(line[:300])
        return errors
