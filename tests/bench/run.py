"""lkrun vs the official LiveKit Agents worker, side by side on one livekit-server.

    python -m tests.bench [--workload join,agents,recovery,media,venv,node] [--dispatches N]
                          [--concurrency 1,10,50] [--max-jobs-cap 100]
                          [--systems lkrun,official,lkrun-venv,node]
                          [--variants cold,warm] [--idle 4]

Makes (or reuses) the official worker's venv, starts one livekit-server in dev mode on
free loopback ports, then for each workload (join: join the room and stay; agents: the
same livekit-agents AgentSession module on both hosts; media: a level meter per room on
a 48 kHz tone; venv: that AgentSession on lkrun with the daemon's interpreter and with
another virtualenv's; node: the Python echo and the Node echo on lkrun; recovery: a job's
SIGKILL to its replacement in the room, see tests/bench/recovery.py), variant (cold: no
prewarmed process; warm: --idle of them) and system starts the system, measures (see
tests/bench/measure.py) and stops it. Writes
results.md, results.json, the charts and every log to --results (default
results/bench-<UTC timestamp>/) and prints the tables.
Everything it starts is stopped on exit, Ctrl-C and errors included.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from lkrun import __version__ as lkrun_version
from lkrun import devserver
from tests import node_deps
from tests.bench import benchvenv, limit, media, report, suts
from tests.bench.measure import LiveKit, Settings, run_sut
from tests.bench.procs import Registry
from tests.bench.suts import NODE_ECHO, REPO, WORKLOADS, LkrunSut, OfficialSut, Server, Sut

SYSTEMS = ("lkrun", "official", "lkrun-venv", "node")
# The systems each workload compares, in the order they run (a pair close together in
# time). venv and node compare lkrun with itself: an agent on the daemon's interpreter
# with the same agent on another virtualenv's (the manifest's python), and the Python echo
# with the Node echo (a command agent).
WORKLOAD_SYSTEMS: dict[str, tuple[str, ...]] = {
    "join": ("lkrun", "official"),
    "agents": ("lkrun", "official"),
    "media": ("lkrun", "official"),
    "venv": ("lkrun", "lkrun-venv"),
    "node": ("lkrun", "node"),
    "recovery": ("lkrun", "official"),
}
# The media workload is opt-in (--workload media or all): about 12 minutes more, most of
# them a 50-room level that keeps both cores of a small machine busy. venv and node
# (--workload envs) are opt-in too: lkrun against itself, about 10 minutes together.
# recovery (issue 19) is a couple of minutes: kills of a job, one after the other.
DEFAULT_WORKLOADS = ("join", "agents", "recovery")
ENVS_WORKLOADS = ("venv", "node")
VARIANTS = ("cold", "warm")
# Per-workload defaults of the flags that default to None (a flag given applies to all).
# The agents workload makes fewer sequential dispatches: keeps `make bench` ~35 minutes.
# The media workload measures steady state only: no latency series, no ramp, warm only
# (a prewarmed process changes the start, not the metering), a longer hold.
WORKLOAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "join": {
        "dispatches": 50,
        "concurrency": [1, 10, 50],
        "max_jobs_cap": 100,
        "hold": 5.0,
        "variants": ["cold", "warm"],
    },
    "agents": {
        "dispatches": 10,
        "concurrency": [1, 10, 50],
        "max_jobs_cap": 100,
        "hold": 5.0,
        "variants": ["cold", "warm"],
    },
    "media": {
        "dispatches": 0,
        "concurrency": [1, 10, 50],
        "max_jobs_cap": 0,
        "hold": 10.0,
        "variants": ["warm"],
        # --ramp-to-limit: rooms added per step (each step one observer process).
        "ramp_step": 4,
    },
    # Short on purpose (issue 18's checks, a few minutes each): the per-job start and
    # memory, no ramp (max jobs is the agents workload's question).
    "venv": {
        "dispatches": 20,
        "concurrency": [1, 10],
        "max_jobs_cap": 0,
        "hold": 5.0,
        "variants": ["cold", "warm"],
    },
    "node": {
        "dispatches": 20,
        "concurrency": [1, 10],
        "max_jobs_cap": 0,
        "hold": 5.0,
        "variants": ["cold", "warm"],
    },
    # Issue 19: --dispatches is the number of kills (each a fresh call); warm only (the
    # replacement takes a prewarmed process, as it would in production); no memory phase,
    # no ramp.
    "recovery": {
        "dispatches": 20,
        "concurrency": [],
        "max_jobs_cap": 0,
        "hold": 5.0,
        "variants": ["warm"],
    },
}


def _int_list(text: str) -> list[int]:
    if text.strip() == "0":
        return []  # no memory (media: fixed rooms) levels
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("counts must be at least 1")
    return values


def _assignment(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _choices(allowed: tuple[str, ...], **aliases: list[str]) -> Any:
    def parse(text: str) -> list[str]:
        values: list[str] = []
        for value in (v.strip() for v in text.split(",") if v.strip()):
            values += aliases.get(value, [value])
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            names = ",".join((*allowed, *aliases))
            raise argparse.ArgumentTypeError(f"choose from {names}")
        return list(dict.fromkeys(values))

    return parse


def _per_workload(flag: str) -> str:
    def show(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list) else str(value)

    return "; ".join(f"{w}: {show(d[flag])}" for w, d in WORKLOAD_DEFAULTS.items())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--workload",
        type=_choices(
            WORKLOADS,
            both=["join", "agents"],
            envs=list(ENVS_WORKLOADS),
            all=list(WORKLOADS),
        ),
        default=list(DEFAULT_WORKLOADS),
        help="comma-separated: join (join the room and stay: lkrun's API vs a livekit-agents "
        "entrypoint), agents (both run tests/bench/lka_agent.py, an AgentSession), recovery "
        "(SIGKILL a job's process: time to its replacement agent in the room), media "
        "(a tone in each room and a level meter job: lkrun's example vs "
        "tests/bench/lka_meter.py; opt-in: 50 rooms of audio saturate a 2-core machine), "
        "venv (lka_agent.py on lkrun, on the daemon's interpreter and on the bench venv's "
        "via the manifest's python; opt-in), node (the Python echo and the Node echo on "
        "lkrun; opt-in), both (join,agents), envs (venv,node) or all; default: "
        + ",".join(DEFAULT_WORKLOADS),
    )
    parser.add_argument(
        "--dispatches",
        type=int,
        default=None,
        help=f"sequential dispatches (recovery: kills) [{_per_workload('dispatches')}]",
    )
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded dispatches first")
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        default=None,
        help="memory (media: rooms) at these job counts, 0: none ["
        + _per_workload("concurrency")
        + "]",
    )
    parser.add_argument(
        "--hold",
        type=float,
        default=None,
        help=f"seconds held and sampled at each count [{_per_workload('hold')}]",
    )
    parser.add_argument(
        "--max-jobs-cap",
        type=int,
        default=None,
        help=f"ramp up to this many jobs, 0: skip [{_per_workload('max_jobs_cap')}]",
    )
    parser.add_argument(
        "--ramp-step",
        type=int,
        default=None,
        help="jobs (media: rooms) added per ramp step [media: 4, other workloads: 10]",
    )
    parser.add_argument(
        "--ramp-to-limit",
        action="store_true",
        help="ramp until the host stops holding new calls (an agent not in within "
        "--visible-timeout, a held job dropped or failed; media: a meter behind), with "
        f"--max-jobs-cap as a safety ceiling [{limit.JOBS_CEILING} jobs, media "
        f"{limit.ROOMS_CEILING} rooms], the machine's memory and --ramp-timeout per host as "
        "the others; media: the rooms ramp instead of the fixed --concurrency levels "
        "(none unless given)",
    )
    parser.add_argument(
        "--tone-frame-ms",
        type=int,
        choices=(10, 20, 50, 100),
        default=media.FRAME_MS,
        help="media: the observers' tone frames (10 before issue 20)",
    )
    parser.add_argument(
        "--visible-timeout", type=float, default=15.0, help="seconds for an agent to come in"
    )
    parser.add_argument(
        "--ramp-timeout",
        type=float,
        default=None,
        help="time limit of a host's ramp, s [600; with --ramp-to-limit "
        f"{limit.LIMIT_RAMP_TIMEOUT:g}: about 10 minutes a host with its start and cleanup]",
    )
    parser.add_argument(
        "--recovery-wait",
        type=float,
        default=10.0,
        help="recovery: seconds after a kill to wait for a replacement before counting none",
    )
    parser.add_argument("--idle", type=int, default=4, help="prewarmed processes when warm")
    parser.add_argument(
        "--systems",
        type=_choices(SYSTEMS),
        default=list(SYSTEMS),
        help="comma-separated: lkrun, official, lkrun-venv, node; each workload runs those "
        "of its own (join, agents, media: lkrun, official; venv: lkrun, lkrun-venv; node: "
        "lkrun, node)",
    )
    parser.add_argument(
        "--variants",
        type=_choices(VARIANTS),
        default=None,
        help="comma-separated: cold (no prewarmed process), warm (--idle of them) "
        f"[{_per_workload('variants')}]",
    )
    parser.add_argument(
        "--job-env",
        type=_assignment,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a variable for both hosts' job processes (repeatable): lkrun's agent gets it "
        "in its manifest env (which wins over lkrun's own job_threads and malloc_arena_max), "
        "the official worker in its environment (its job processes inherit it), e.g. "
        "MALLOC_ARENA_MAX=2 or TOKIO_WORKER_THREADS=16",
    )
    parser.add_argument(
        "--daemon-setting",
        action="append",
        default=[],
        metavar="KEY=TOML",
        help="a line for lkrun's manifest [daemon] table (repeatable), e.g. job_threads=0",
    )
    parser.add_argument(
        "--official-load",
        choices=("lkrun", "default"),
        default="lkrun",
        help="official worker's load_fnc: lkrun-shaped (jobs/200, CPU scaled below the "
        "server's 0.7 target) or its default (machine CPU: no jobs at >= 70%% CPU)",
    )
    parser.add_argument(
        "--results", type=Path, default=None, help="results folder [results/bench-<UTC time>]"
    )
    parser.add_argument(
        "--base-python", default="python3", help="python that creates the bench venv"
    )
    parser.add_argument("--no-chart", action="store_true", help="skip chart.png")
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for results.md's header, e.g. what else ran on the machine (repeatable; "
        "not part of the recorded command)",
    )
    parser.add_argument(
        "--copy-to",
        type=Path,
        default=None,
        help="also copy results.md and results.json to COPY_TO/<run id>/ (make bench: "
        "benchmarks/, the folder the README's figures are committed to)",
    )
    args = parser.parse_args(argv)
    negative = any(
        value is not None and value < 0
        for value in (args.dispatches, args.warmup, args.max_jobs_cap)
    )
    if negative or (args.ramp_step is not None and args.ramp_step < 1):
        parser.error("counts must not be negative (and --ramp-step at least 1)")
    return args


def _settings(args: argparse.Namespace, workload: str) -> Settings:
    def pick(flag: str) -> Any:
        given = getattr(args, flag)
        return WORKLOAD_DEFAULTS[workload][flag] if given is None else given

    concurrency, cap = pick("concurrency"), pick("max_jobs_cap")
    if args.ramp_to_limit and workload != "recovery":
        # The ramp goes on to the host's limit: the cap given is a safety ceiling.
        media_ramp = workload == "media"
        if args.max_jobs_cap is None:
            cap = limit.ROOMS_CEILING if media_ramp else limit.JOBS_CEILING
        if media_ramp and args.concurrency is None:
            concurrency = []  # the rooms ramp replaces the fixed levels
    return Settings(
        dispatches=pick("dispatches"),
        warmup=args.warmup,
        concurrency=concurrency,
        hold=pick("hold"),
        max_jobs_cap=cap,
        ramp_step=args.ramp_step or WORKLOAD_DEFAULTS[workload].get("ramp_step", 10),
        visible_timeout=args.visible_timeout,
        ramp_timeout=args.ramp_timeout
        or (limit.LIMIT_RAMP_TIMEOUT if args.ramp_to_limit else Settings.ramp_timeout),
        recovery_wait=args.recovery_wait,
        ramp_to_limit=args.ramp_to_limit,
        tone_frame_ms=args.tone_frame_ms,
    )


def systems_for(workload: str, chosen: list[str]) -> list[str]:
    """The systems ``workload`` runs, of those chosen (``--systems``), in its order."""
    return [system for system in WORKLOAD_SYSTEMS[workload] if system in chosen]


def _runs(args: argparse.Namespace, system: str) -> bool:
    """Whether any workload of this run runs ``system``."""
    return any(system in systems_for(w, args.systems) for w in args.workload)


def _node_version() -> str:
    """``node --version`` and the Node echo's @livekit/rtc-node (its package.json pin)."""
    try:
        node = subprocess.run(
            ["node", "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
    except OSError:
        node = ""
    try:
        package = json.loads((NODE_ECHO.parent / "package.json").read_text())
        rtc = package.get("dependencies", {}).get("@livekit/rtc-node", "?")
    except (OSError, ValueError):
        rtc = "?"
    return f"node {node or '?'}, @livekit/rtc-node {rtc}"


def _meta(args: argparse.Namespace, started: str, command: str) -> dict[str, Any]:
    return {
        "started": started,
        "command": command,
        "lkrun_version": lkrun_version,
        "livekit_agents_version": benchvenv.AGENTS_VERSION,
        "livekit_server_version": devserver.LIVEKIT_SERVER_VERSION,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        # How busy the machine was besides the bench (the bench adds to it too).
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "notes": list(args.note),
        "settings": {
            "idle": args.idle,
            "job_env": dict(args.job_env),
            "daemon_settings": args.daemon_setting,
            "official_load": args.official_load,
            "systems": args.systems,
            "variants": args.variants or "per workload",
            "workloads": args.workload,
        },
    }


def _measuring_args(argv: list[str]) -> list[str]:
    """argv without the flags that only say where results go or annotate them (with or
    without '=')."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--results", "--copy-to", "--note"):
            skip = True
        elif not arg.startswith(("--results=", "--copy-to=", "--note=")):
            out.append(arg)
    return out


class _Stop(Exception):
    """SIGTERM: unwind like Ctrl-C, so that cleanup runs."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop()


async def _bench(
    args: argparse.Namespace,
    server: Server,
    registry: Registry,
    results: dict[str, Any],
    folder: Path,
    bench_python: Path | None,
) -> None:
    lk = LiveKit(server)
    try:
        with tempfile.TemporaryDirectory(prefix="lkrun-bench-") as tmp:
            for workload in args.workload:
                settings = _settings(args, workload)
                part = results["workloads"][workload] = {
                    "settings": vars(settings),
                    "runs": {},
                }
                # Cold pair first, then warm: each comparison is made close together in time.
                for variant in args.variants or WORKLOAD_DEFAULTS[workload]["variants"]:
                    for system in systems_for(workload, args.systems):
                        sut = _make_sut(
                            system,
                            variant,
                            workload,
                            args,
                            server,
                            registry,
                            folder,
                            Path(tmp),
                            bench_python,
                        )
                        if sut is None:
                            continue
                        part["runs"][sut.label] = await run_sut(sut, lk, settings)
                        _write(results, folder)
    finally:
        await lk.delete_all()
        await lk.aclose()


def _make_sut(
    system: str,
    variant: str,
    workload: str,
    args: argparse.Namespace,
    server: Server,
    registry: Registry,
    folder: Path,
    tmp: Path,
    bench_python: Path | None,
) -> Sut | None:
    idle = args.idle if variant == "warm" else 0
    label = f"{system}-{variant}"
    # A ramp beyond 200 must not meet lkrun's max_jobs (the official worker's load is
    # shaped by the same number).
    max_jobs = max(suts.MAX_JOBS, _settings(args, workload).max_jobs_cap)
    common = {
        "variant": variant,
        "idle": idle,
        "server": server,
        "workdir": folder / workload / label,
        "registry": registry,
        "workload": workload,
        "job_env": dict(args.job_env),
        "daemon_settings": args.daemon_setting,
        "max_jobs": max_jobs,
    }
    # Short: the control socket's path must fit AF_UNIX's limit.
    short = tmp / f"{workload[0]}-{label}"
    if system == "lkrun":
        return LkrunSut(tmpdir=short, **common)
    if system == "node":
        return LkrunSut(tmpdir=short, system=system, command=["node", str(NODE_ECHO)], **common)
    if bench_python is None:
        return None
    if system == "lkrun-venv":
        # The bench venv: livekit-agents 1.8.9 and livekit as the daemon's own, another
        # virtualenv. The same agent, only the interpreter differs.
        return LkrunSut(tmpdir=short, system=system, python=bench_python, **common)
    return OfficialSut(
        python=bench_python,
        http_port=devserver.free_tcp_port(),
        load=args.official_load,
        **common,
    )


def _write(results: dict[str, Any], folder: Path) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "results.md").write_text(report.markdown(results))


def _chart(bench_python: Path | None, folder: Path) -> None:
    """chart.png (join) and chart-agents.png (agents), from results.json."""
    if bench_python is None:
        print("bench: no bench venv, no chart", flush=True)
        return
    result = subprocess.run(
        [
            str(bench_python),
            str(Path(__file__).with_name("chart.py")),
            str(folder / "results.json"),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        print(f"bench: chart failed: {result.stderr.strip()[-500:]}", flush=True)


def _copy(folder: Path, destination: Path) -> Path:
    """results.md and results.json (small, no logs) to destination/<run id>/, to commit."""
    target = destination / folder.name
    target.mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "results.json"):
        shutil.copyfile(folder / name, target / name)
    return target


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = parse_args(given)
    warnings.filterwarnings("ignore", message="The HMAC key is")  # the dev server's secret
    now = datetime.datetime.now(datetime.timezone.utc)
    started = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    folder = args.results or REPO / "results" / f"bench-{now.strftime('%Y%m%dT%H%M%SZ')}"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"bench: results in {folder}", flush=True)
    # Without --results/--copy-to: they change where it writes, not what it measures.
    command = shlex.join(["python", "-m", "tests.bench", *_measuring_args(given)])
    results: dict[str, Any] = {"meta": _meta(args, started, command), "workloads": {}}

    bench_python: Path | None = None
    need_venv = _runs(args, "official") or _runs(args, "lkrun-venv") or not args.no_chart
    if need_venv:
        bench_python = benchvenv.ensure(args.base_python, log=folder / "bench-venv.log")
    if _runs(args, "lkrun-venv"):
        results["meta"]["second_interpreter"] = str(bench_python)
    if _runs(args, "node"):
        if why := node_deps.node_missing():
            print(f"bench: no node system: {why}", flush=True)
            args.systems = [s for s in args.systems if s != "node"]
            results["meta"]["settings"]["systems"] = args.systems
            results["meta"]["notes"].append(f"the node system did not run: {why}")
        else:
            node_deps.ensure_node_modules(NODE_ECHO.parent)  # cached under ~/.cache/lkrun
            results["meta"]["node"] = _node_version()

    registry = Registry()
    server = devserver.DevServer.on_free_ports(
        devserver.ensure_server_binary(on_build=lambda msg: print(f"bench: {msg}", flush=True)),
        folder / "livekit-server.log",
    )
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    interrupted = False
    try:
        server.start()
        print(f"bench: livekit-server at {server.url}", flush=True)
        view = Server(
            server.url,
            server.http_url,
            server.api_key,
            server.api_secret,
            log_path=folder / "livekit-server.log",
        )
        asyncio.run(_bench(args, view, registry, results, folder, bench_python))
    except (KeyboardInterrupt, _Stop):
        interrupted = True
        print("\nbench: interrupted; stopping everything it started", flush=True)
    finally:
        registry.stop_all()
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    results["meta"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    _write(results, folder)
    runs = {
        f"{workload}/{label}": run
        for workload, part in results["workloads"].items()
        for label, run in part["runs"].items()
    }
    if not args.no_chart and runs:
        _chart(bench_python, folder)
    for workload in results["workloads"]:
        print(f"\n{report.title(workload)}\n")
        print(report.table(results, workload))
    charts = sorted(p.name for p in folder.glob("chart*.png"))
    written = ["results.json", *charts]
    print(f"\nbench: {folder / 'results.md'}, {', '.join(written)}", flush=True)
    if args.copy_to is not None:
        print(f"bench: results.md and results.json copied to {_copy(folder, args.copy_to)}")
    failed = [label for label, run in runs.items() if not run.get("ok")]
    if interrupted:
        return 130
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
