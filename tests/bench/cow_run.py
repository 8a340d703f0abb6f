"""PSS per job and the copy-on-write split of every job, lkrun warm, on the agents workload.

    python -m tests.bench.cow_run [--jobs 50] [--idle 4] [--out DIR] [--env KEY=VALUE ...]

Starts a dev livekit-server and ``lkrun serve`` with the bench's agents manifest
(``tests.bench.lka_agent:server``, ``idle_processes = --idle``), dispatches ``--jobs``
rooms at once, waits for every agent to be in and ``--settle`` seconds more, then measures
each job's process tree as the bench does (PSS, USS, RSS from psutil) and each job's pages
against its fork server's (`tests/bench/cow.py`), and the fork server itself. Writes
``cow.json`` (the means, and every job's figures) to ``--out``. ``--env`` goes into the
daemon's environment, which the fork server and the jobs inherit (to switch something on
for a measurement). ``--entrypoint`` runs another module (e.g. ``tests.bench.cow_probe``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psutil

from lkrun import devserver
from lkrun import memory_map as smaps
from tests.bench import cow
from tests.bench.measure import Bench, LiveKit, Settings, tree_memory
from tests.bench.procs import Registry, descendants
from tests.bench.suts import REPO, LkrunSut, Server


class CowSut(LkrunSut):
    def __init__(self, *, entrypoint: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entrypoint = entrypoint

    def manifest_text(self) -> str:
        text = super().manifest_text()
        if self.entrypoint:
            text = text.replace('"tests.bench.lka_agent:server"', json.dumps(self.entrypoint))
        return text


def fork_servers(main_pid: int) -> list[int]:
    """The daemon's fork servers: its children running lkrun.child.zygote."""
    found = []
    for proc in psutil.Process(main_pid).children():
        with contextlib.suppress(psutil.Error):
            if "lkrun.child.zygote" in proc.cmdline():
                found.append(proc.pid)
    return found


def measure_jobs(pids: list[int]) -> dict[str, Any]:
    per_job = []
    splits = []
    for pid in pids:
        try:
            tree = [psutil.Process(pid), *descendants(pid)]
            memory = tree_memory(tree)
            split = cow.measure(pid)
        except (cow.Unreadable, psutil.Error, OSError):  # ended meanwhile
            continue
        per_job.append({"pid": pid, **{k: round(v, 2) for k, v in memory.items()}})
        splits.append(split)
    means = {
        f"job_{key}_mb": round(statistics.fmean(j[key] for j in per_job), 2) if per_job else None
        for key in ("pss", "uss", "rss")
    }
    return {**means, "jobs": per_job, "cow_mean": cow.mean(splits), "cow": splits}


def server_memory(pid: int) -> dict[str, Any]:
    data = smaps.report(pid) if hasattr(smaps, "report") else {}
    memory = tree_memory([psutil.Process(pid)])
    return {
        "pid": pid,
        **{f"{k}_mb": round(v, 1) for k, v in memory.items()},
        "kinds": data.get("kinds"),
    }


async def run(args: argparse.Namespace, server: Server, folder: Path) -> dict[str, Any]:
    registry = Registry()
    lk = LiveKit(server)
    result: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="lkrun-cow-") as tmp:
            sut = CowSut(
                entrypoint=args.entrypoint,
                tmpdir=Path(tmp) / "s",
                variant="warm",
                idle=args.idle,
                server=server,
                workdir=folder / "lkrun-warm",
                registry=registry,
                workload="agents",
            )
            await sut.start()
            bench = Bench(sut, lk, Settings())
            await bench.ready_for_next()
            servers = fork_servers(sut.main_pid)
            result["fork_server_idle"] = [server_memory(pid) for pid in servers]
            rooms = [bench.room("cow", i) for i in range(args.jobs)]
            try:
                sent = await bench.dispatch_rooms(rooms)
                arrived = await bench.wait_agents(sent, timeout=60 + 2 * args.jobs)
                result["agents_in"] = len(arrived)
                await asyncio.sleep(args.settle)
                pids = list((await sut.job_pids(rooms)).values())
                result.update(await asyncio.to_thread(measure_jobs, pids))
                result["fork_server"] = [server_memory(pid) for pid in servers]
                if args.hold:
                    print(f"cow_run: holding {args.hold:g}s; jobs {pids}", flush=True)
                    await asyncio.sleep(args.hold)
            finally:
                await bench.cleanup(rooms)
                await sut.stop()
    finally:
        await lk.delete_all()
        await lk.aclose()
        registry.stop_all()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.cow_run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--idle", type=int, default=4)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after all are in")
    parser.add_argument("--hold", type=float, default=0.0, help="seconds held after measuring")
    parser.add_argument("--entrypoint", help="instead of tests.bench.lka_agent:server")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the daemon")
    parser.add_argument("--out", type=Path, help="[results/cow-<UTC time>]")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="The HMAC key is")
    now = datetime.datetime.now(datetime.timezone.utc)
    folder = (args.out or REPO / "results" / f"cow-{now.strftime('%Y%m%dT%H%M%SZ')}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for pair in args.env:
        key, _, value = pair.partition("=")
        os.environ[key] = value
    given = sys.argv[1:] if argv is None else argv
    meta = {
        "command": shlex.join(["python", "-m", "tests.bench.cow_run", *given]),
        "started": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    dev = devserver.DevServer.on_free_ports(
        devserver.ensure_server_binary(on_build=lambda msg: print(msg, flush=True)),
        folder / "livekit-server.log",
    )
    dev.start()
    try:
        view = Server(dev.url, dev.http_url, dev.api_key, dev.api_secret)
        started = time.monotonic()
        result = asyncio.run(run(args, view, folder))
        meta["seconds"] = round(time.monotonic() - started, 1)
    finally:
        dev.stop()
    data = {"meta": meta, **result}
    (folder / "cow.json").write_text(json.dumps(data, indent=1) + "\n")
    mean = result.get("cow_mean") or {}
    print(
        f"cow_run: {result.get('agents_in')} in; PSS per job {result.get('job_pss_mb')} MB, "
        f"USS {result.get('job_uss_mb')} MB; {folder / 'cow.json'}"
    )
    if mean.get("jobs"):
        print(cow.render({"pid": "mean", "parent": "-", "frames_readable": True, **mean}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
