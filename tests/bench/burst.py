"""A burst over a two-node cluster (issue 20, item 6): how LiveKit spreads it over two hosts.

    python -m tests.bench.burst --host lkrun --runs 5 --dispatches 40
    python -m tests.bench.burst --host official --runs 5 --dispatches 40

Each run starts Redis, two livekit-server nodes sharing it and one host per node (an
lkrun daemon with ``max_jobs = 100``, or the official livekit-agents 1.8 worker from the
bench venv, ``tests/bench/official_worker.py``), all serving one agent name. Once both are
ready (each has served a warm-up job: with several nodes a worker's job-request subscription
comes a moment after its registration, see DESIGN), it fires ``--dispatches`` CreateDispatch
calls back to back, alternately through node 1 and node 2, each to a new room, and counts
which host runs each job; then deletes the rooms, waits for every job to end, stays quiet
``--quiet`` seconds and fires a second burst. So every run has two bursts: ``ready`` (right
after the hosts are ready) and ``quiet`` (after a quiet spell). A dispatch no host took
within ``--timeout`` is ``lost``.

One JSON line per burst on stdout; with ``--out DIR`` also ``DIR/results.json`` (every
burst, the settings, the command) and ``DIR/results.md`` (the table).

Which host ran a job is read from the host itself: ``lkrun jobs ls --json`` (lkrun), the
entrypoint events its bench script writes (official).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from livekit import api

from lkrun import devcluster, devserver
from tests.bench import benchvenv
from tests.bench.procs import Registry
from tests.bench.suts import ACTIVE, LkrunSut, OfficialSut, Server, Sut, SutError

PHASES = ("ready", "quiet")
GOAL = (0.4, 0.6)  # issue 20: each host takes 40-60 % of a burst


class BurstLkrun(LkrunSut):
    """An lkrun daemon of the burst cluster: the join workload's agent, ``max_jobs``."""

    def __init__(
        self, *, max_jobs: int, load_threshold: str, overload_after: str, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.max_jobs = max_jobs
        self.load_threshold = load_threshold
        self.overload_after = overload_after

    def manifest_text(self) -> str:
        lines = ["[daemon]", 'shutdown_timeout = "5s"']
        if self.load_threshold:
            value = self.load_threshold
            lines.append(f"load_threshold = {value if value[0].isdigit() else json.dumps(value)}")
        if self.overload_after:
            lines.append(f"overload_after = {json.dumps(self.overload_after)}")
        lines += [
            "",
            f"[agents.{self.agent_name}]",
            'entrypoint = "tests.bench.agents:entrypoint"',
            'dispatch = "explicit"',
            f"max_jobs = {self.max_jobs}",
        ]
        if self.idle > 0:
            lines.append(f"idle_processes = {self.idle}")
        return "\n".join(lines) + "\n"

    async def ready(self) -> bool:
        status = await self.cli("status")
        return bool(status.get("ready"))


async def served_rooms(sut: Sut, rooms: set[str]) -> set[str]:
    """The rooms of ``rooms`` whose job ``sut`` runs (or ran)."""
    if isinstance(sut, LkrunSut):
        jobs = await sut.jobs()
        return {j["room"] for j in jobs if j["room"] in rooms and j["status"] in ACTIVE}
    return {e["room"] for e in sut.events() if e["event"] == "entrypoint" and e["room"] in rooms}


@dataclass
class Cluster:
    redis: devcluster.Redis
    nodes: list[devserver.DevServer] = field(default_factory=list)
    servers: list[Server] = field(default_factory=list)
    suts: list[Sut] = field(default_factory=list)

    def api(self, node: int) -> api.LiveKitAPI:
        server = self.servers[node]
        return api.LiveKitAPI(server.http_url, server.api_key, server.api_secret)

    async def dispatch(self, lk: api.LiveKitAPI, agent: str, room: str) -> None:
        await lk.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=agent, room=room)
        )

    async def served(self, rooms: set[str]) -> list[set[str]]:
        return [await served_rooms(sut, rooms) for sut in self.suts]

    async def delete_rooms(self, rooms: list[str]) -> None:
        lk = self.api(0)
        try:
            for room in rooms:
                with contextlib.suppress(api.TwirpError):  # already gone (closed by the server)
                    await lk.room.delete_room(api.DeleteRoomRequest(room=room))
        finally:
            await lk.aclose()


async def poll(check: Callable[[], Awaitable[Any]], timeout: float, interval: float = 0.25) -> Any:
    """check() until truthy or ``timeout``; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def warm_up(cluster: Cluster, agent: str, timeout: float = 90.0) -> int:
    """Dispatch (alternately through both nodes) until each host has run a job, then end
    those jobs: the hosts are ready for a burst. The number of dispatches it took."""
    rooms: list[str] = []
    seen: set[int] = set()
    apis = [cluster.api(0), cluster.api(1)]
    deadline = time.monotonic() + timeout
    try:
        while len(seen) < len(cluster.suts):
            if time.monotonic() > deadline:
                raise SutError(f"warm-up: only host(s) {sorted(seen)} ran a job in {timeout:g}s")
            room = f"warm-{uuid.uuid4().hex[:8]}"
            rooms.append(room)
            await cluster.dispatch(apis[len(rooms) % 2], agent, room)

            async def ran(room: str = room) -> list[int]:
                served = await cluster.served({room})
                return [i for i, got in enumerate(served) if got]

            seen.update(await poll(ran, 10))
    finally:
        for lk in apis:
            await lk.aclose()
    await cluster.delete_rooms(rooms)
    await wait_no_jobs(cluster)
    return len(rooms)


async def wait_no_jobs(cluster: Cluster, timeout: float = 90.0) -> list[str]:
    """Until no host runs a job; the hosts that still did after ``timeout`` (the official
    worker's /worker may go on counting a job whose room is gone: noted, not fatal)."""
    busy = []
    for sut in cluster.suts:
        if not await sut.wait_no_jobs(timeout):
            print(
                f"burst: {sut.label}: jobs still active {timeout:g}s after their rooms went",
                file=sys.stderr,
                flush=True,
            )
            busy.append(sut.label)
    return busy


async def burst(cluster: Cluster, agent: str, dispatches: int, timeout: float) -> dict[str, Any]:
    """``dispatches`` CreateDispatch calls back to back, alternately through both nodes."""
    rooms = [f"burst-{uuid.uuid4().hex[:8]}" for _ in range(dispatches)]
    apis = [cluster.api(0), cluster.api(1)]
    wall = time.time()
    try:
        started = time.monotonic()
        for index, room in enumerate(rooms):
            await cluster.dispatch(apis[index % 2], agent, room)
        fired = time.monotonic() - started
    finally:
        for lk in apis:
            await lk.aclose()
    wanted = set(rooms)

    async def all_served() -> list[set[str]] | None:
        served = await cluster.served(wanted)
        return served if set().union(*served) >= wanted else None

    served = await poll(all_served, timeout) or await cluster.served(wanted)
    counts = [len(s) for s in served]
    taken = sum(counts)
    offers = await offer_times(cluster, wanted, wall)
    await cluster.delete_rooms(rooms)
    busy = await wait_no_jobs(cluster)
    return {
        "dispatches": dispatches,
        "split": counts,
        "lost": dispatches - len(set().union(*served)),
        "shares": [round(c / taken, 3) if taken else 0.0 for c in counts],
        "fired_seconds": round(fired, 2),
        # lkrun only: when each host got its offers, seconds after the first dispatch
        "offered_after": offers,
        "still_busy_after": busy,  # hosts that reported jobs 90 s after the rooms went
    }


async def offer_times(cluster: Cluster, rooms: set[str], start: float) -> list[list[float]]:
    """Per lkrun host, when its jobs of ``rooms`` were offered (s after ``start``), sorted:
    whether the burst's requests were weighed at once or in waves."""
    times: list[list[float]] = []
    for sut in cluster.suts:
        if not isinstance(sut, LkrunSut):
            return []
        jobs = await sut.jobs()
        times.append(
            sorted(
                round(j["offered_at"] - start, 3)
                for j in jobs
                if j["room"] in rooms and j.get("offered_at")
            )
        )
    return times


def within_goal(result: dict[str, Any]) -> bool:
    """Each host took 40-60 % of the burst's dispatches (a lost one counts for neither)."""
    n = result["dispatches"]
    return all(GOAL[0] * n <= c <= GOAL[1] * n for c in result["split"])


def make_suts(
    args: argparse.Namespace,
    servers: list[Server],
    registry: Registry,
    folder: Path,
    tmp: Path,
    run: int,
    bench_python: Path | None,
) -> list[Sut]:
    suts: list[Sut] = []
    for index, server in enumerate(servers, 1):
        common: dict[str, Any] = {
            "variant": f"node{index}",
            "idle": args.idle,
            "server": server,
            "workdir": folder / f"run{run}" / f"host{index}",
            "registry": registry,
            "workload": "join",
        }
        if args.host == "lkrun":
            suts.append(
                BurstLkrun(
                    tmpdir=tmp / f"r{run}h{index}",
                    max_jobs=args.max_jobs,
                    load_threshold=args.load_threshold,
                    overload_after=args.overload_after,
                    **common,
                )
            )
        else:
            assert bench_python is not None
            suts.append(
                OfficialSut(
                    python=bench_python,
                    http_port=devserver.free_tcp_port(),
                    load=args.official_load,
                    **common,
                )
            )
    return suts


async def one_run(
    args: argparse.Namespace,
    run: int,
    folder: Path,
    tmp: Path,
    bench_python: Path | None,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    binary = devserver.ensure_server_binary()
    registry = Registry()
    cluster = Cluster(devcluster.Redis(tmp / f"redis{run}"))
    try:
        cluster.redis.start()
        for index in (1, 2):
            log = folder / f"run{run}" / f"node{index}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            node = devcluster.node(binary, cluster.redis, log)
            node.start()
            cluster.nodes.append(node)
            cluster.servers.append(
                Server(node.url, node.http_url, node.api_key, node.api_secret, log)
            )
        cluster.suts = make_suts(args, cluster.servers, registry, folder, tmp, run, bench_python)
        await asyncio.gather(*(sut.start() for sut in cluster.suts))
        for sut in cluster.suts:
            if isinstance(sut, BurstLkrun) and not await poll(sut.ready, 60, 0.3):
                raise SutError(f"{sut.label}: not ready within 60s")
        ready_at = time.monotonic()
        agent = cluster.suts[0].agent_name
        warm = await warm_up(cluster, agent)
        for phase in PHASES:
            if phase == "quiet":
                await asyncio.sleep(args.quiet)
            since_ready = time.monotonic() - ready_at
            result = await burst(cluster, agent, args.dispatches, args.timeout)
            emit(
                {
                    "host": args.host,
                    "run": run,
                    "phase": phase,
                    **result,
                    "within_goal": within_goal(result),
                    "seconds_after_ready": round(since_ready, 1),
                    "warm_up_dispatches": warm,
                    "load_average": [round(x, 2) for x in os.getloadavg()],
                }
            )
    finally:
        for sut in cluster.suts:
            try:
                await sut.stop()
            except Exception as exc:  # one host's trouble must not leave the rest running
                print(f"burst: stopping {sut.label}: {exc}", file=sys.stderr)
        registry.stop_all()
        for node in cluster.nodes:
            node.stop()
        cluster.redis.stop()


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"# A burst of {meta['dispatches']} over two nodes: {meta['host']}",
        "",
        f"`{meta['command']}` (started {meta['started']}, {meta['cpus']} CPUs)",
        "",
        "| run | phase | host 1 | host 2 | lost | shares | within 40-60 % | fired in |",
        "|---:|---|---:|---:|---:|---|---|---:|",
    ]
    for b in results["bursts"]:
        a, c = b["split"]
        shares = " / ".join(f"{s:.0%}" for s in b["shares"])
        ok = "yes" if b["within_goal"] else "no"
        lines.append(
            f"| {b['run']} | {b['phase']} | {a} | {c} | {b['lost']} | {shares} | {ok} | "
            f"{b['fired_seconds']:.2f} s |"
        )
    summary = results["summary"]
    lines += [
        "",
        f"Within 40-60 %: {summary['within_goal']} of {summary['bursts']} bursts "
        f"(ready: {summary['by_phase']['ready']}, quiet: {summary['by_phase']['quiet']}); "
        f"largest share {summary['max_share']:.0%}; lost {summary['lost']}.",
        "",
    ]
    return "\n".join(lines)


def summarise(bursts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "bursts": len(bursts),
        "within_goal": sum(b["within_goal"] for b in bursts),
        "by_phase": {
            p: f"{sum(b['within_goal'] for b in bursts if b['phase'] == p)} of "
            f"{sum(1 for b in bursts if b['phase'] == p)}"
            for p in PHASES
        },
        "max_share": max((max(b["shares"]) for b in bursts), default=0.0),
        "lost": sum(b["lost"] for b in bursts),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.burst", description=__doc__)
    parser.add_argument("--host", choices=("lkrun", "official"), default="lkrun")
    parser.add_argument("--runs", type=int, default=5, help="clusters started (2 bursts each)")
    parser.add_argument("--dispatches", type=int, default=40, help="dispatches per burst")
    parser.add_argument("--max-jobs", type=int, default=100, help="lkrun's max_jobs")
    parser.add_argument(
        "--load-threshold",
        default="",
        help="lkrun's [daemon] load_threshold (e.g. \"off\", 1.0); default: the daemon's",
    )
    parser.add_argument(
        "--overload-after",
        default="off",
        help="lkrun's [daemon] overload_after (default off: a shared machine's CPU stays "
        "busy longer than its 30 s under a burst, and would make both daemons FULL); '' for "
        "the daemon's default",
    )
    parser.add_argument(
        "--official-load",
        choices=("default", "lkrun"),
        default="default",
        help="the official worker's load_fnc: its own (CPU) or tests/bench's lkrun-shaped one",
    )
    parser.add_argument("--idle", type=int, default=2, help="warm processes per host")
    parser.add_argument("--quiet", type=float, default=15.0, help="seconds before burst 2")
    parser.add_argument("--timeout", type=float, default=60.0, help="per burst, for the jobs")
    parser.add_argument("--out", type=Path, default=None, help="write results.json/.md here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    args = parse_args(given)
    measuring = [a for a in given if not a.startswith("--out")]
    if "--out" in given:  # "--out DIR": the folder is not a setting
        i = given.index("--out")
        measuring = given[:i] + given[i + 2 :]
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    results: dict[str, Any] = {
        "meta": {
            "command": shlex.join(["python", "-m", "tests.bench.burst", *measuring]),
            "started": started,
            "host": args.host,
            "dispatches": args.dispatches,
            "max_jobs": args.max_jobs if args.host == "lkrun" else None,
            "load_threshold": args.load_threshold or "default",
            "overload_after": args.overload_after or "default",
            "official_load": args.official_load if args.host == "official" else None,
            "quiet_seconds": args.quiet,
            "idle": args.idle,
            "cpus": os.cpu_count(),
        },
        "bursts": [],
    }
    bench_python = benchvenv.ensure() if args.host == "official" else None
    folder = Path(tempfile.mkdtemp(prefix="lkrun-burst-"))
    tmp = Path(tempfile.mkdtemp(prefix="lkb-", dir="/tmp"))  # short: AF_UNIX paths

    def emit(line: dict[str, Any]) -> None:
        results["bursts"].append(line)
        print(json.dumps(line), flush=True)

    print(f"burst: logs under {folder}", file=sys.stderr, flush=True)
    try:
        for run in range(1, args.runs + 1):
            try:
                asyncio.run(one_run(args, run, folder, tmp, bench_python, emit))
            except SutError as exc:  # one cluster's trouble: say so, go on with the next
                results.setdefault("failed_runs", []).append({"run": run, "error": str(exc)})
                print(json.dumps({"run": run, "error": str(exc)}), flush=True)
    finally:
        results["summary"] = summarise(results["bursts"])
        print(json.dumps({"summary": results["summary"]}), flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            (args.out / "results.md").write_text(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
