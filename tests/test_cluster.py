"""Scale-out on LiveKit's own multi-node engine: Redis, two livekit-server nodes sharing it,
and an lkrun daemon registered with each, all real processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from livekit import api

from lkrun import devcluster, devserver
from lkrun.api import control
from tests.conftest import (
    DaemonProc,
    Server,
    _kill_job_processes,
    livekit_api,
    observer,
    unique,
    wait_for,
)

pytestmark = pytest.mark.e2e

AGENT = "echo"
# One machine's CPU, shared by two servers, Redis, two daemons and their jobs, is the same
# for both daemons and near 100 %: it would cap both loads alike (and, sustained, make both
# FULL). Hosts of a real cluster each have their own; here only the jobs count.
MANIFEST = f"""
[daemon]
load_threshold = "off"
drain_timeout = "2m"

[agents.{AGENT}]
entrypoint = "lkrun.examples.echo:entrypoint"
dispatch = "explicit"
max_jobs = 40
idle_processes = 0
"""


@dataclass
class Cluster:
    redis: devcluster.Redis
    nodes: list[devserver.DevServer]
    servers: list[Server]
    daemons: list[DaemonProc]
    dispatches: dict[str, str] = field(default_factory=dict)  # room -> dispatch id

    async def dispatch(self, node: int, room: str) -> str:
        async with livekit_api(self.servers[node]) as lk:
            d = await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=AGENT, room=room)
            )
        self.dispatches[room] = d.id
        return d.id

    async def end_call(self, room: str) -> None:
        """The call ends: its dispatch is deleted (LiveKit terminates the job, even one whose
        agent is still joining) and so is the room."""
        async with livekit_api(self.servers[0]) as lk:
            with contextlib.suppress(api.TwirpError):
                await lk.agent_dispatch.delete_dispatch(self.dispatches.pop(room), room)
            with contextlib.suppress(api.TwirpError):
                await lk.room.delete_room(api.DeleteRoomRequest(room=room))

    async def running(self) -> dict[str, str]:
        """room -> the daemon running its job, over every daemon that is up."""
        rooms: dict[str, str] = {}
        for daemon in self.daemons:
            if daemon.proc is None or daemon.proc.poll() is not None:
                continue
            for job in await daemon.jobs(include_ended=False):
                if job["status"] == "running":
                    rooms[job["room"]] = job["daemon"]
        return rooms


async def served_by(cluster: Cluster, rooms: list[str], timeout: float) -> dict[str, str]:
    async def all_running() -> dict[str, str] | None:
        running = await cluster.running()
        return running if all(r in running for r in rooms) else None

    found = await wait_for(all_running, timeout, what=f"{len(rooms)} jobs running")
    return {room: found[room] for room in rooms}


@pytest.fixture
async def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    manifest = getattr(request, "param", MANIFEST)  # indirect parametrisation: another one
    binary = devserver.ensure_server_binary()
    redis = devcluster.Redis(tmp_path / "redis")
    redis.start()
    made = Cluster(redis, [], [], [])
    try:
        for index in (1, 2):
            log = tmp_path / f"node{index}.log"
            node = devcluster.node(binary, redis, log)
            node.start()
            made.nodes.append(node)
            made.servers.append(Server(node.url, node.api_key, node.api_secret, log))
        for index, server in enumerate(made.servers, 1):
            daemon = DaemonProc(tmp_path / f"d{index}", server, manifest, ["--name", f"d{index}"])
            made.daemons.append(daemon)
            daemon.start()
        for daemon in made.daemons:
            await daemon.wait_registered()
        await _warm_up(made)
        yield made
    finally:
        for daemon in made.daemons:
            daemon.stop()
            if daemon.proc is not None:
                _kill_job_processes(daemon.pid)
        for node in made.nodes:
            node.stop()
        redis.stop()


async def _warm_up(cluster: Cluster, daemons: frozenset[str] = frozenset({"d1", "d2"})) -> None:
    """Until each of ``daemons`` has served a job: with several nodes, a worker's job-request
    subscription is set up after its registration is confirmed, and a dispatch in that
    window is dropped (see DESIGN: the tests wait for it, as a client would retry)."""
    seen: set[str] = set()
    rooms: list[str] = []
    deadline = time.monotonic() + 60
    while not daemons <= seen:
        assert time.monotonic() < deadline, f"only {seen} served a job"
        room = unique("warm")
        rooms.append(room)
        await cluster.dispatch(len(rooms) % 2, room)
        try:
            found = await served_by(cluster, [room], 10)
            seen.add(found[room])
        except AssertionError:
            continue  # dropped in the window: try again
        finally:
            await cluster.end_call(room)

    async def warm_jobs_ended() -> bool:
        for daemon in cluster.daemons:
            if await _live_rooms(daemon, rooms):
                return False
        return True

    await wait_for(warm_jobs_ended, 30, what="the warm-up jobs to end")


async def _live_rooms(daemon: DaemonProc, rooms: list[str]) -> list[str]:
    if daemon.proc is None or daemon.proc.poll() is not None:
        return []
    return [j["room"] for j in await daemon.jobs(include_ended=False) if j["room"] in rooms]


def share(served: dict[str, str], daemon: str) -> float:
    return sum(1 for d in served.values() if d == daemon) / len(served)


async def test_jobs_spread_over_both_daemons(cluster: Cluster) -> None:
    """Each dispatch waits for the one before it to run: the server then knows both loads,
    and picks the daemon that runs fewer jobs. A burst would test the server instead: every
    request of the burst sees the same loads, and a tie goes to the first node to answer
    (0.725/0.275 seen on a loaded 2-core machine)."""
    rooms = [unique("spread") for _ in range(40)]
    for index, room in enumerate(rooms):
        await cluster.dispatch(index % 2, room)  # through both nodes
        await served_by(cluster, [room], 30)
    served = await served_by(cluster, rooms, 30)
    shares = {d: share(served, d) for d in ("d1", "d2")}
    print(f"spread of 40 jobs: {shares}")
    assert all(0.4 <= s <= 0.6 for s in shares.values()), shares


# Issue 20: the daemon's own load settings (the CPU counts, load_threshold 0.75), so that
# two daemons on one machine read its CPU a moment apart, as they do; never FULL for it (a
# 2-core machine under a burst stays busy longer than overload_after's default 30 s).
BURST_MANIFEST = f"""
[daemon]
overload_after = "off"
drain_timeout = "2m"

[agents.{AGENT}]
entrypoint = "lkrun.examples.echo:entrypoint"
dispatch = "explicit"
max_jobs = 100
idle_processes = 0
"""
BURST = 40
# How a burst splits is livekit-server's choice, not lkrun's: it weighs every request of a
# burst this fast on the loads reported before it and gives all of them to the node with the
# strictly lower load (psrpc selectServer), splitting only a tie (see lkrun.load.CPU_MAX).
# Measured with `python -m tests.bench.burst --host lkrun --runs 5` (benchmarks/issue20-burst/):
# 9 of 10 bursts within 40-60 % after the change, 15/25 at worst; but in CI (other tests'
# processes busy on 2 cores) a burst once went below a 25 % bound. So this test asserts what
# lkrun owns, that no call of a burst is lost (every one served within the timeout, none
# refused as FULL below max_jobs), and records the split; the unit tests in test_load.py and
# test_burst_load.py are what fail without the load change.
QUIET = 15.0  # seconds without a dispatch: the CPU that the daemons read has settled


async def fire_burst(cluster: Cluster, rooms: list[str]) -> None:
    """One CreateDispatch per room, back to back, alternately through both nodes."""
    async with livekit_api(cluster.servers[0]) as one, livekit_api(cluster.servers[1]) as two:
        for index, room in enumerate(rooms):
            lk = (one, two)[index % 2]
            d = await lk.agent_dispatch.create_dispatch(
                api.CreateAgentDispatchRequest(agent_name=AGENT, room=room)
            )
            cluster.dispatches[room] = d.id


async def burst_shares(cluster: Cluster, label: str) -> dict[str, float]:
    rooms = [unique(label) for _ in range(BURST)]
    await fire_burst(cluster, rooms)
    served = await served_by(cluster, rooms, 90)
    for room in rooms:
        await cluster.end_call(room)

    async def ended() -> bool:
        return not any([await _live_rooms(daemon, rooms) for daemon in cluster.daemons])

    await wait_for(ended, 60, what=f"the {label} burst's jobs to end")
    return {d: share(served, d) for d in ("d1", "d2")}


@pytest.mark.parametrize("cluster", [BURST_MANIFEST], indirect=True)
async def test_no_call_of_a_burst_is_lost(cluster: Cluster) -> None:
    """Issue 20: 40 dispatches back to back (alternately through both nodes), max_jobs =
    100, right after both daemons are ready (the fixture's warm-up) and after a quiet spell:
    every call of each burst is served (served_by fails on one that is not)."""
    ready = await burst_shares(cluster, "ready")
    # The quiet spell is the condition under test (the CPU both daemons read settles), not
    # a wait for something to happen: nothing can be polled for it.
    await asyncio.sleep(QUIET)
    quiet = await burst_shares(cluster, "quiet")
    # burst_shares fails (served_by's timeout) when a call of a burst is not served
    print(f"burst of {BURST}: right after ready {ready}, after {QUIET:g}s quiet {quiet}")


async def test_a_killed_daemon_s_calls_go_to_the_other_and_show_lost(cluster: Cluster) -> None:
    held = [unique("held") for _ in range(6)]
    for index, room in enumerate(held):
        await cluster.dispatch(index % 2, room)
    before = await served_by(cluster, held, 60)
    victim = cluster.daemons[0]
    lost = {room for room, d in before.items() if d == "d1"}
    assert lost, before  # the victim holds calls
    victim.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    await victim.wait_exit(10)
    later = [unique("after") for _ in range(6)]
    for index, room in enumerate(later):
        await cluster.dispatch(index % 2, room)  # through the dead daemon's node too
    after = await served_by(cluster, later, 30)
    print(f"6 dispatches after a SIGKILL all served in {time.monotonic() - killed_at:.1f}s")
    assert set(after.values()) == {"d2"}
    victim.start()  # same state directory: its history knows what it ran
    await victim.wait_registered()
    history = {j["room"]: j for j in await victim.jobs() if j["room"] in lost}
    assert {r: j["status"] for r, j in history.items()} == {r: "lost" for r in lost}


async def test_a_restarted_daemon_s_calls_get_their_agents_back_from_either_daemon(
    cluster: Cluster,
) -> None:
    """Issue 19: the calls a SIGKILLed daemon held, with their callers still in the rooms,
    get an agent again once it restarts on its state directory (whichever daemon LiveKit
    picks for the redispatch); a room whose caller left gets nothing."""
    calls = [unique("kept") for _ in range(6)]
    async with contextlib.AsyncExitStack() as stack:
        callers = {}
        for index, room in enumerate(calls):
            server = cluster.servers[index % 2]
            callers[room] = await stack.enter_async_context(observer(server, room))
            await cluster.dispatch(index % 2, room)
        held = await served_by(cluster, calls, 60)
        victim = cluster.daemons[0]
        on_victim = [room for room, d in held.items() if d == "d1"]
        assert len(on_victim) >= 2, held
        lost = {
            room: job
            for job in await victim.jobs(include_ended=False)
            if (room := job["room"]) in on_victim
        }
        victim.signal(signal.SIGKILL)
        await victim.wait_exit(10)
        left, *kept = on_victim
        await callers[left].disconnect()
        # It restarts with redispatch on (the policy is the manifest's at the restart).
        victim.manifest_path.write_text(MANIFEST + 'on_failure = "redispatch"\n')
        victim.start()
        await victim.wait_registered()
        ready_at = time.monotonic()

        def back(room: str) -> bool:
            return any(
                p.attributes.get("lkrun.recovered_from") == lost[room]["id"]
                for p in callers[room].remote_participants.values()
            )

        for room in kept:
            await wait_for(
                lambda room=room: back(room),
                5 - (time.monotonic() - ready_at),
                what=f"the agent of {room} back within 5 s of the restart being ready",
            )

        async def noted() -> dict[str, Any] | None:
            rows = {j["id"]: j for j in await victim.jobs()}
            row = rows.get(lost[left]["id"])
            return row if row and row["recovery"] else None

        row = await wait_for(noted, 10, what="the decision about the room whose caller left")
        assert row["status"] == "lost" and row["recovery"].startswith("not redispatched"), row
        assert not back(left)


async def test_rolling_deploy_drops_no_call(cluster: Cluster) -> None:
    # One call at a time until d1 holds some: LiveKit sends a job to the node whose workers
    # reported the lowest load (strict maximum of affinity), so calls made together all go to
    # whichever daemon was less busy a moment ago; each call served raises its daemon's load.
    held: dict[str, str] = {}
    while len(held) < 6 or "d1" not in held.values():
        assert len(held) < 30, held  # d1 would have been the less loaded long before
        room = unique("call")
        await cluster.dispatch(len(held) % 2, room)
        held.update(await served_by(cluster, [room], 60))
    old = cluster.daemons[0]
    on_old = [room for room, d in held.items() if d == "d1"]
    old.signal(signal.SIGTERM)  # the deploy starts with daemon d1

    async def draining() -> bool:
        return (await old.status())["phase"] == "draining"

    await wait_for(draining, 10, what="d1 to drain")
    fresh = [unique("fresh") for _ in range(6)]
    for index, room in enumerate(fresh):
        await cluster.dispatch(index % 2, room)
    during = await served_by(cluster, fresh, 30)
    assert set(during.values()) == {"d2"}, during  # d1 takes no new job
    running = await cluster.running()
    assert all(running.get(r) == "d1" for r in on_old), running  # its calls go on
    for room in on_old:  # the calls end by themselves, as conversations do
        await cluster.end_call(room)
    assert await old.wait_exit(60) == 0
    old.start()  # the new version, on the same state directory
    await old.wait_registered()
    history = {j["room"]: j["status"] for j in await old.jobs() if j["room"] in on_old}
    assert history == {room: "success" for room in on_old}
    await _warm_up(cluster, frozenset({"d1"}))  # it takes jobs again: d2 holds more


async def test_a_restarted_node_gets_its_daemon_back(cluster: Cluster) -> None:
    node, daemon = cluster.nodes[0], cluster.daemons[0]
    node.stop()

    async def down() -> bool:
        return not (await daemon.status())["ready"]

    await wait_for(down, 20, what="d1 to lose its registration")
    node.start()
    await daemon.wait_registered(60)
    await _warm_up(cluster, frozenset({"d1"}))  # d1 takes jobs again, its node restarted


async def test_make_cluster_runs_named_daemons_on_their_own_state(tmp_path: Path) -> None:
    """What `make cluster` starts: each daemon named, on its own node, socket and state dir."""
    manifest = tmp_path / "agents.toml"
    manifest.write_text(MANIFEST)
    with devcluster.running_cluster(manifest, tmp_path / "cluster") as made:

        async def ready(daemon: devcluster.Daemon) -> dict[str, Any] | None:
            try:
                status = await control.get(daemon.socket, "/v1/status")
            except control.ControlError:
                return None
            return status if status["ready"] else None

        for daemon, node in zip(made.daemons, made.nodes, strict=True):
            status = await wait_for(lambda d=daemon: ready(d), 60, what=f"{daemon.name} ready")
            assert status["name"] == daemon.name and status["url"] == node.url
            assert (daemon.directory / "state" / "jobs.db").is_file()  # --state-dir
            assert daemon.running()
    assert not any(d.running() for d in made.daemons)
