"""What an agent reports to LiveKit while the machine's CPU peaks for a few seconds.

    python -m tests.bench.cpu_peak [--busy 12] [--source DIR]

Starts a local livekit-server and `lkrun serve` with one agent on the default load
settings, keeps every core busy for ``--busy`` seconds with busy-loop processes, and prints
a line a second: the CPU the daemon measured, and the agent's status (AVAILABLE with its
load, or FULL with the reason), then how many dispatches made one a second during the
peak were served. ``--source`` runs the daemon from another checkout of lkrun (e.g. an
older commit in a git worktree) to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from livekit import api

from lkrun import devserver
from lkrun.api import control

MANIFEST = """
[agents.peak]
entrypoint = "lkrun.examples.echo:entrypoint"
dispatch = "explicit"
max_jobs = 50
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--busy", type=float, default=12.0, help="seconds of busy CPU")
    parser.add_argument("--source", type=Path, default=None, help="lkrun checkout to run")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lkrun-peak-"))
    server = devserver.DevServer.on_free_ports(
        devserver.ensure_server_binary(), work / "server.log"
    )
    server.start()
    (work / "agents.toml").write_text(MANIFEST)
    env = dict(os.environ, LIVEKIT_API_KEY=server.api_key, LIVEKIT_API_SECRET=server.api_secret)
    env["XDG_STATE_HOME"] = str(work / "state")
    if args.source is not None:
        env["PYTHONPATH"] = str(args.source.resolve())
    socket = work / "control.sock"
    command = [sys.executable, "-m", "lkrun", "serve", str(work / "agents.toml")]
    command += ["--url", server.url, "--control-socket", str(socket), "--http-addr", ""]
    command += ["--drain-timeout", "0s"]  # its jobs end with it
    with (work / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(
            command, env=env, cwd=work, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
    busy = "import time\nend = time.monotonic() + {}\nwhile time.monotonic() < end: pass"
    loops: list[subprocess.Popen[bytes]] = []

    def start_peak() -> float:
        loops.extend(
            subprocess.Popen([sys.executable, "-c", busy.format(args.busy)])
            for _ in range(os.cpu_count() or 2)
        )
        return time.monotonic()

    try:
        served, made = asyncio.run(_observe(server, socket, start_peak, args.busy))
        print(f"dispatches during the peak served: {served} of {made}")
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
        daemon.terminate()
        daemon.wait(30)
        server.stop()


async def _observe(
    server: devserver.DevServer, socket: Path, start_peak: Callable[[], float], busy: float
) -> tuple[int, int]:
    await _until_ready(socket)
    return await _timeline(server, socket, start_peak(), busy)


async def _until_ready(socket: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if (await control.get(socket, "/v1/status"))["ready"]:
                return
        except control.ControlError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the daemon did not register within 60 s")


async def _timeline(
    server: devserver.DevServer, socket: Path, started: float, busy: float
) -> tuple[int, int]:
    rooms: list[str] = []
    async with api.LiveKitAPI(server.http_url, server.api_key, server.api_secret) as lk:
        while (elapsed := time.monotonic() - started) < busy + 6:
            status = await control.get(socket, "/v1/status")
            agent = status["agents"][0]
            state = f"FULL ({agent.get('full_reason') or '?'})" if agent["full"] else "AVAILABLE"
            print(f"t={elapsed:5.1f}s cpu={status['cpu']:.0%} {state} load={agent['load']:.2f}")
            if elapsed < busy:
                room = f"peak-{len(rooms)}"
                rooms.append(room)
                await lk.agent_dispatch.create_dispatch(
                    api.CreateAgentDispatchRequest(agent_name="peak", room=room)
                )
            await asyncio.sleep(1.0)
        listed = await control.get(socket, "/v1/jobs", {"all": "1", "limit": "0"})
    served = {job["room"] for job in listed["jobs"]}
    return sum(1 for room in rooms if room in served), len(rooms)


if __name__ == "__main__":
    main()
