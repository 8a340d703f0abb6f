"""Soak: many dispatches over several agents, with a server restart and killed jobs.

    python -m tests.soak [--dispatches 200] [--rate 4]

Starts its own livekit-server and `lkrun serve` on free loopback ports, sends
dispatches at a steady rate, restarts the server once halfway, SIGKILLs a few job
processes, then accounts for every dispatch. Exits 1 if any job the daemon took
has no recorded end. Not part of CI: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
from livekit import api

from lkrun import devserver
from lkrun.api import control

AGENTS = ("soak-a", "soak-b", "soak-c")
MANIFEST = "".join(
    f'[agents.{name}]\nentrypoint = "tests.agents.behaviours:brief"\nmax_jobs = 25\n'
    for name in AGENTS
)
REPO = Path(__file__).resolve().parent.parent


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.server = devserver.DevServer.on_free_ports(
            devserver.ensure_server_binary(), workdir / "livekit-server.log"
        )
        self.socket = workdir / "control.sock"
        self.dispatches: dict[str, str] = {}  # dispatch id -> agent
        self.refused = 0  # CreateDispatch calls that failed (server down) and were retried
        self.killed: list[str] = []
        self.daemon: subprocess.Popen[bytes] | None = None

    def start_daemon(self) -> None:
        manifest = self.workdir / "agents.toml"
        manifest.write_text(MANIFEST)
        env = dict(
            os.environ,
            PYTHONPATH=str(REPO),
            LIVEKIT_URL=self.server.url,
            LIVEKIT_API_KEY=self.server.api_key,
            LIVEKIT_API_SECRET=self.server.api_secret,
            XDG_STATE_HOME=str(self.workdir / "state"),  # its own job history, not the user's
        )
        log = (self.workdir / "daemon.log").open("wb")
        self.daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lkrun",
                "serve",
                str(manifest),
                "--control-socket",
                str(self.socket),
                "--http-addr",
                "127.0.0.1:0",
                "--no-reload",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )

    async def ask(self, route: str, params: dict[str, str] | None = None) -> Any:
        return await control.get(self.socket, route, params)

    async def wait_registered(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                status = await self.ask("/v1/status")
                if status["ready"]:
                    return
            except control.ControlError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("daemon did not register in time")

    async def dispatch(self, lk: api.LiveKitAPI, i: int) -> None:
        agent = AGENTS[i % len(AGENTS)]
        stay = random.uniform(1.0, 4.0)
        request = api.CreateAgentDispatchRequest(
            agent_name=agent, room=f"soak-{i}-{random.randrange(10**6)}", metadata=f"{stay:.2f}"
        )
        while True:
            try:
                result = await lk.agent_dispatch.create_dispatch(request)
                self.dispatches[result.id] = agent
                return
            except Exception:  # the server is restarting: try again
                self.refused += 1
                await asyncio.sleep(0.5)

    async def kill_a_job(self) -> None:
        running = [j for j in (await self.ask("/v1/jobs"))["jobs"] if j["status"] == "running"]
        if running:
            victim = random.choice(running)
            try:
                psutil.Process(victim["pid"]).kill()
                self.killed.append(victim["id"])
            except psutil.NoSuchProcess:
                pass

    async def restart_server(self) -> None:
        print("restarting livekit-server", flush=True)
        self.server.stop()
        await asyncio.sleep(2)  # a real outage, not a blip
        self.server.start()
        await self.wait_registered()

    async def run(self) -> int:
        self.server.start()
        self.start_daemon()
        try:
            await self.wait_registered()
            await self.drive()
            return await self.report()
        finally:
            if self.daemon is not None:
                self.daemon.send_signal(signal.SIGTERM)
                self.daemon.send_signal(signal.SIGTERM)
                self.daemon.wait(60)
            self.server.stop()

    async def drive(self) -> None:
        n = self.args.dispatches
        async with api.LiveKitAPI(
            self.server.http_url, self.server.api_key, self.server.api_secret, failover=False
        ) as lk:
            for i in range(n):
                await self.dispatch(lk, i)
                if i == n // 2:
                    await self.restart_server()
                if i % 40 == 20:
                    await self.kill_a_job()
                await asyncio.sleep(1 / self.args.rate)
        # Let the last jobs finish (they stay at most 4 s).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            jobs = (await self.ask("/v1/jobs"))["jobs"]
            if not any(j["status"] in ("starting", "running", "stopping") for j in jobs):
                break
            await asyncio.sleep(0.5)

    async def report(self) -> int:
        jobs = (await self.ask("/v1/jobs", {"all": "1", "limit": "0"}))["jobs"]
        by_dispatch = collections.defaultdict(list)
        for job in jobs:
            by_dispatch[job["dispatch_id"]].append(job)
        counts: collections.Counter[str] = collections.Counter()
        reasons: collections.Counter[str] = collections.Counter()
        for job in jobs:
            counts[job["status"]] += 1
            if job["status"] == "failed":
                reasons[job["error"].split(" (last log line")[0]] += 1
        no_job = [d for d in self.dispatches if d not in by_dispatch]
        unaccounted = [j for j in jobs if j["status"] not in ("success", "failed")]
        print(
            f"dispatches created:        {len(self.dispatches)} "
            f"(CreateDispatch retried {self.refused} times while the server was down)"
        )
        print(f"jobs the daemon took:      {len(jobs)}")
        print(f"  SUCCESS:                 {counts['success']}")
        print(f"  FAILED:                  {counts['failed']}")
        for reason, count in reasons.most_common():
            print(f"    {count:4d} x {reason}")
        print(f"  unaccounted (no end):    {len(unaccounted)}")
        print(f"job processes SIGKILLed:   {len(self.killed)}")
        print(f"dispatches never offered:  {len(no_job)} (lost by the server in its restart)")
        return 1 if unaccounted else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dispatches", type=int, default=200)
    parser.add_argument("--rate", type=float, default=4.0, help="dispatches per second")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="The HMAC key is")  # the dev server's short secret
    with tempfile.TemporaryDirectory(prefix="lkrun-soak-") as tmp:
        return asyncio.run(Soak(args, Path(tmp)).run())


if __name__ == "__main__":
    sys.exit(main())
