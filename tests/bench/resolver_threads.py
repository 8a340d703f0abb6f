"""Where job processes' ``AsyncResolver`` threads come from (issue 20): libwebrtc's DNS
lookups of the STUN servers in the join response.

livekit-server with no ``rtc.stun_servers`` (as in dev mode) gives every participant
mediatransportutil's ``DefaultStunServers``, three host names
(``global.stun.twilio.com``, ``stun.l.google.com``, ``stun1.l.google.com``;
``pkg/service/roommanager.go`` ``iceServersForParticipant``), and libwebrtc resolves each in
a thread of its own, named ``AsyncResolver``. This joins ROOMS participants, at once, from
this one process, to a dev server configured each way (the default, then ``stun_servers``
set to an IP literal, which needs no lookup), and samples the process's threads by name
every 50 ms for SECONDS::

    .venv/bin/python -m tests.bench.resolver_threads --rooms 5 --seconds 15 > out.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livekit import api, rtc

from lkrun import devserver

# An IP literal: libwebrtc needs no lookup for it (nothing answers there; gathering from it
# fails quietly, as a host name that does not resolve does).
STUN_IP = "127.0.0.1:3478"
STUN_HOSTS = ("global.stun.twilio.com", "stun.l.google.com", "stun1.l.google.com")


def thread_names() -> collections.Counter[str]:
    names: collections.Counter[str] = collections.Counter()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as comm:
                names[comm.read().strip()] += 1
        except OSError:  # the thread ended
            continue
    return names


def lookup_seconds(host: str) -> dict[str, Any]:
    """How a lone lookup of ``host`` goes on this machine (getaddrinfo, as libwebrtc)."""
    started = time.monotonic()
    try:
        answer = f"{len(socket.getaddrinfo(host, 3478))} addresses"
    except OSError as exc:
        answer = f"error: {exc}"
    return {"host": host, "seconds": round(time.monotonic() - started, 3), "answer": answer}


async def trial(label: str, extra: str, rooms: int, seconds: float, logs: Path) -> dict[str, Any]:
    # The dev server's loopback config plus ``extra``: its module constant is what start()
    # passes to the server.
    base = devserver._LOOPBACK_RTC_CONFIG
    devserver._LOOPBACK_RTC_CONFIG = base + extra
    try:
        server = devserver.DevServer.on_free_ports(
            devserver.ensure_server_binary(), logs / f"livekit-{label}.log"
        )
        server.start()
    finally:
        devserver._LOOPBACK_RTC_CONFIG = base
    try:
        joins = []
        for i in range(rooms):
            grants = api.VideoGrants(room_join=True, room=f"resolver-{label}-{i}")
            token = (
                api.AccessToken(server.api_key, server.api_secret)
                .with_identity(f"p{i}")
                .with_grants(grants)
                .to_jwt()
            )
            joins.append((rtc.Room(), token))
        before = thread_names()
        started = time.monotonic()
        await asyncio.gather(*(room.connect(server.url, token) for room, token in joins))
        peak: collections.Counter[str] = collections.Counter()
        series = []
        while (elapsed := time.monotonic() - started) < seconds:
            names = thread_names()
            peak |= names  # the most of each name seen at once
            series.append([round(elapsed, 2), names["AsyncResolver"], sum(names.values())])
            await asyncio.sleep(0.05)
        await asyncio.gather(*(room.disconnect() for room, _ in joins))
    finally:
        server.stop()
    # What the server told the participants (its join response, in its debug log).
    log = (logs / f"livekit-{label}.log").read_text()
    at = log.find('"iceServers": ')
    ice = json.JSONDecoder().raw_decode(log, at + len('"iceServers": '))[0] if at >= 0 else None
    return {
        "label": label,
        "config_extra": extra.strip(),
        "ice_servers": ice,
        "rooms": rooms,
        "threads_before": dict(before),
        "peak_by_name": dict(peak),
        "async_resolver_peak": peak["AsyncResolver"],
        "samples_with_async_resolver": sum(1 for _, n, _ in series if n),
        "samples": len(series),
        # [seconds since the joins began, AsyncResolver threads, all threads]
        "series": series,
    }


TRIALS = {"default": "", "stun-ip": f'  stun_servers: ["{STUN_IP}"]\n'}


def run_trial(label: str, rooms: int, seconds: float) -> dict[str, Any]:
    """One trial in a process of its own: libwebrtc's lookups outlive the rooms that made
    them (up to 10 s here), so trials sharing a process would count each other's."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench.resolver_threads", "--trial", label,
         "--rooms", str(rooms), "--seconds", str(seconds)],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"trial {label} exited {out.returncode}: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.resolver_threads")
    parser.add_argument("--rooms", type=int, default=5, help="participants joining at once")
    parser.add_argument("--seconds", type=float, default=15.0, help="sampled after the joins")
    parser.add_argument("--trial", choices=list(TRIALS), help="run only this one, here")
    args = parser.parse_args(argv)
    if args.trial is not None:
        with tempfile.TemporaryDirectory(prefix="lkrun-resolver-") as tmp:
            result = asyncio.run(
                trial(args.trial, TRIALS[args.trial], args.rooms, args.seconds, Path(tmp))
            )
        print(json.dumps(result), flush=True)
        # Not the interpreter's teardown: with the rtc library's threads still ending their
        # lookups it aborted now and then (SIGABRT), after the result was out.
        os._exit(0)
    report = {
        "command": " ".join(["python -m tests.bench.resolver_threads", *sys.argv[1:]]),
        "livekit_server_version": devserver.LIVEKIT_SERVER_VERSION,
        "livekit_rtc_version": rtc.__version__,
        "lone_lookups": [lookup_seconds(host) for host in STUN_HOSTS],
        "trials": [run_trial(label, args.rooms, args.seconds) for label in TRIALS],
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
