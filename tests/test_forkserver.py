"""The fork server (start_method = "forkserver"): the zygote, its children, its replacement."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import resource
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from lkrun.jobs.fields import JobStatus
from lkrun.supervision.forkserver import ForkServer
from lkrun.supervision.job_process import AppSpec, JobProcess, LaunchError
from lkrun.supervision.lifecycle import conclude
from tests.conftest import REPO, livekit_api, pid_alive, unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room, status_is

SUCCESS, FAILED = JobStatus.SUCCESS, JobStatus.FAILED

pytestmark = pytest.mark.e2e  # fork servers and job processes


JOB = {"id": "AJ_fork", "room": {"name": "r"}, "type": "JT_ROOM"}

COUNTED = """
import os
with open(os.environ["IMPORTS_FILE"], "a") as f:  # an import-time side effect we can count
    f.write(f"{os.getpid()}\\n")

async def entrypoint(ctx):
    await ctx.wait_for_shutdown()
"""

THREADED = """
import threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()

async def entrypoint(ctx):
    pass
"""


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Callable[[str, str], ForkServer]]:
    made: list[ForkServer] = []

    def make(module: str, text: str) -> ForkServer:
        (tmp_path / f"{module}.py").write_text(text)
        env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
        env["IMPORTS_FILE"] = str(tmp_path / "imports")
        server = ForkServer(
            label="test",
            app=AppSpec(f"{module}:entrypoint"),
            cwd=tmp_path,
            env=env,
            load_timeout=30,
        )
        made.append(server)
        return server

    yield make
    for server in made:
        await server.close(timeout=10)


async def ready_job(server: ForkServer) -> JobProcess:
    proc = JobProcess(launcher=server, log=logging.LoggerAdapter(logging.getLogger("t"), {}))
    await proc.spawn()
    assert await proc.wait_ready(30)
    return proc


def ppid(pid: int) -> int:
    return psutil.Process(pid).ppid()


async def test_module_is_imported_once_and_each_job_is_a_fork(
    servers: Callable[[str, str], ForkServer], tmp_path: Path
) -> None:
    server = servers("counted", COUNTED)
    procs = [await ready_job(server) for _ in range(3)]
    pids = {p.pid for p in procs}
    assert len(pids) == 3 and server.pid not in pids
    for proc in procs:
        assert proc.pid is not None
        assert ppid(proc.pid) == server.pid  # forked by the zygote...
        assert os.getpgid(proc.pid) == proc.pid  # ...each in its own process group
    assert ppid(server.pid or 0) == os.getpid()
    assert (tmp_path / "imports").read_text().split() == [str(server.pid)]

    for proc in procs:
        proc.start(job=JOB, url="ws://127.0.0.1:1", token="t", identity="me", agent="a")
        await proc.stop("test over", timeout=10)
    facts = [await proc.wait() for proc in procs]
    assert all(conclude(f).status is SUCCESS and f.exit_code == 0 for f in facts), facts


async def test_retired_fork_server_outlives_its_running_job(
    servers: Callable[[str, str], ForkServer],
) -> None:
    server = servers("counted", COUNTED)
    proc = await ready_job(server)
    proc.start(job=JOB, url="ws://127.0.0.1:1", token="t", identity="me", agent="a")
    zygote = server.pid
    assert zygote is not None
    server.retire()
    with pytest.raises(LaunchError, match="retired"):
        await server()
    await wait_for(lambda: proc.started_running, 10, what="the job to run")
    assert pid_alive(zygote)  # retired, but its child still runs

    await proc.stop("test over", timeout=10)
    assert conclude(await proc.wait()).status is SUCCESS
    await wait_for(lambda: not pid_alive(zygote), 10, what="the retired zygote to exit")


async def test_jobs_end_with_a_killed_fork_server_and_the_next_job_gets_a_new_one(
    servers: Callable[[str, str], ForkServer],
) -> None:
    server = servers("counted", COUNTED)
    proc = await ready_job(server)
    old = server.pid
    assert old is not None and proc.pid is not None
    os.kill(old, signal.SIGKILL)
    facts = await asyncio.wait_for(proc.wait(), 10)
    outcome = conclude(facts)
    assert outcome.status is FAILED and facts.exit_code is None
    assert "fork server exited" in outcome.error
    await wait_for(lambda: not pid_alive(proc.pid or 0), 10, what="the orphaned job to die")

    again = await ready_job(server)
    assert server.pid not in (None, old)
    assert again.pid is not None and ppid(again.pid) == server.pid
    await again.kill("test over")


async def test_a_job_dies_with_its_fork_server_even_with_its_pipes_open(
    servers: Callable[[str, str], ForkServer],
) -> None:
    server = servers("counted", COUNTED)
    launched = await server()  # no JobProcess: nothing closes the job's stdin for it
    try:
        zygote = server.pid
        assert zygote is not None
        os.kill(zygote, signal.SIGKILL)
        # Only the parent-death signal can end it: its stdin is open, and it is not started.
        await wait_for(lambda: not pid_alive(launched.pid), 10, what="the job to die")
        assert await asyncio.wait_for(launched.wait(), 10) is None
    finally:
        launched.close()


async def test_fork_and_exit_read_together_keep_the_exit_code() -> None:
    # A child that exits at once: the zygote's "forked" and "exited" can arrive in one read.
    server = ForkServer(label="t", app=AppSpec("m:f"), cwd=Path("."), env={}, load_timeout=1)
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    internal: Any = server
    internal._requests[7] = answer
    internal._on_message({"type": "forked", "id": 7, "pid": 4242})
    internal._on_message({"type": "exited", "pid": 4242, "code": 3})
    pid, exit_code = answer.result()
    assert pid == 4242 and exit_code.result() == 3


async def test_retired_while_starting_still_exits(
    servers: Callable[[str, str], ForkServer],
) -> None:
    server = servers("counted", COUNTED)
    starting = asyncio.create_task(server.start())
    await asyncio.sleep(0)  # start() is now waiting for the process to be created
    server.retire()
    await starting
    zygote = server.pid
    assert zygote is not None
    await asyncio.wait_for(server.close(), 20)  # no job: it exits on its own, not killed
    assert not pid_alive(zygote)


async def test_module_that_starts_a_thread_at_import_is_flagged(
    servers: Callable[[str, str], ForkServer], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lkrun.forkserver")
    proc = await ready_job(servers("threaded", THREADED))
    await wait_for(lambda: "started a thread" in caplog.text, 10, what="the warning")
    assert 'start_method = "spawn"' in caplog.text
    await proc.kill("test over")


VERSIONED = """
from lkrun.examples.echo import entrypoint as echo
VERSION = {v}

async def entrypoint(ctx):
    print(f"running version {{VERSION}}")
    await echo(ctx)
"""


async def test_code_change_forks_new_jobs_from_new_code_and_keeps_old_jobs(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room1, room2 = unique("versioned"), unique("r1"), unique("r2")
    daemon = await start_daemon(
        agent_table(name, "versioned_agent:entrypoint"),
        files={"versioned_agent.py": VERSIONED.format(v=1)},
    )
    dispatch1 = await dispatch(livekit_server, room1, name)
    job1 = await job_in_room(daemon, room1, "running")
    await wait_for(lambda: f"[{name} {job1['id']}] running version 1" in daemon.log(), 10)
    old_zygote = ppid(job1["pid"])
    assert (await daemon.status())["agents"][0]["fork_server_pid"] == old_zygote

    (daemon.dir / "versioned_agent.py").write_text(VERSIONED.format(v=2))
    await wait_for(lambda: "reloading the agent's module" in daemon.log(), 30, what="reload")
    await dispatch(livekit_server, room2, name)
    job2 = await job_in_room(daemon, room2, "running")
    await wait_for(lambda: f"[{name} {job2['id']}] running version 2" in daemon.log(), 10)
    assert ppid(job2["pid"]) != old_zygote
    assert (await daemon.status())["agents"][0]["fork_server_pid"] == ppid(job2["pid"])

    # The first job runs on, from the old zygote, which leaves once the job has ended.
    assert (await daemon.job(job1["id"]))["status"] == "running" and pid_alive(old_zygote)
    async with livekit_api(livekit_server) as lk:
        await lk.agent_dispatch.delete_dispatch(dispatch1, room1)
    await wait_for(lambda: status_is(daemon, job1["id"], "success"), 20, what="job 1 to end")
    await wait_for(lambda: not pid_alive(old_zygote), 10, what="the old zygote to exit")


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
async def test_job_processes_hold_no_stray_fds(
    start_daemon: Any, livekit_server: Any, method: str
) -> None:
    # uvloop passes copies of the daemon's stdio to what it spawns; jobs must not keep them.
    name, room = unique("fds"), unique("room")
    daemon = await start_daemon(agent_table(name, start_method=method))
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    job_pid = job["pid"]
    # The daemon's stdout and stderr (its log), and the fork server's stderr (a pipe to it).
    theirs = {_fd_target(daemon.pid, fd) for fd in (1, 2)}
    if method == "forkserver":
        theirs.add(_fd_target(ppid(job_pid), 2))
    for pid in [job_pid] + ([ppid(job_pid)] if method == "forkserver" else []):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            if int(fd) > 2:
                assert _fd_target(pid, int(fd)) not in theirs, (pid, fd)
    # Nor extra copies of its own pipes: the protocol's stdout and stdin once each, above 2.
    copies = collections.Counter(
        _fd_target(job_pid, int(fd)) for fd in os.listdir(f"/proc/{job_pid}/fd") if int(fd) > 2
    )
    assert _fd_target(job_pid, 0) == "/dev/null"  # the protocol's stdin is private
    assert copies[_fd_target(job_pid, 2)] == 0, copies
    for protocol in (3, 4):  # dup'ed from 1 and 0 first thing, so the lowest free ones
        target = _fd_target(job_pid, protocol)
        assert target and copies[target] == 1, (protocol, copies)


def _fd_target(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:  # closed meanwhile
        return ""


async def test_spawn_start_method_runs_each_job_in_a_new_interpreter(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room = unique("spawned"), unique("room")
    daemon = await start_daemon(agent_table(name, start_method="spawn"))
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "running")
    command = psutil.Process(job["pid"]).cmdline()
    assert "lkrun.child.runner" in command
    assert ppid(job["pid"]) == daemon.pid
    assert (await daemon.status())["agents"][0]["fork_server_pid"] is None
    assert not any("lkrun.child.zygote" in " ".join(c.cmdline()) for c in _children(daemon.pid))


def _children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children()


async def test_only_a_change_to_what_it_loaded_replaces_the_fork_server(
    start_daemon: Any,
) -> None:
    name = unique("steady")
    daemon = await start_daemon(agent_table(name))

    async def fork_server() -> int | None:
        return (await daemon.status())["agents"][0]["fork_server_pid"]

    first = await wait_for(fork_server, 20, what="the fork server")
    daemon.manifest_path.write_text(agent_table(name, max_jobs=3, idle_processes=1))

    async def warm() -> bool:
        return (await daemon.status())["agents"][0]["idle_processes"] == 1

    await wait_for(warm, 30, what="a warm process")
    assert await fork_server() == first
    daemon.manifest_path.write_text(agent_table(name) + f'[agents.{name}.env]\nNEW = "1"\n')

    async def replaced() -> bool:
        return (await fork_server()) not in (None, first)

    await wait_for(replaced, 30, what="a new fork server")
    await wait_for(lambda: not pid_alive(first), 10, what="the old one to exit")


async def test_a_livekit_agents_app_with_a_missing_preload_module_still_forks(
    tmp_path: Path,
) -> None:
    # The official forkserver skips a preload module that does not import; so does lkrun, and
    # says so in the fork server's log.
    source = (
        "from livekit.agents import AgentServer, JobContext\n"
        "server = AgentServer(preload_modules=['no_such_module_lkrun'])\n"
        "@server.rtc_session()\n"
        "async def entrypoint(ctx: JobContext) -> None:\n"
        "    pass\n"
    )
    (tmp_path / "app_preload.py").write_text(source)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{REPO}")
    server = ForkServer(
        label="t",
        app=AppSpec("app_preload:server", framework="livekit-agents"),
        cwd=tmp_path,
        env=env,
        load_timeout=60,
    )
    try:
        launched = await server()
        assert launched.pid > 0 and server.error == ""
        await wait_for(
            lambda: "cannot preload no_such_module_lkrun" in server._last_line,
            10,
            what="the fork server's log line",
        )
        os.killpg(launched.pid, signal.SIGKILL)
    finally:
        await server.close(5)


async def test_a_control_socket_numbered_above_1024_works(
    servers: Callable[[str, str], ForkServer],
) -> None:
    # A daemon holding hundreds of job pipes hands its fork server a high descriptor;
    # select() refuses any at 1024 or above ("filedescriptor out of range").
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard descriptor limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        server = servers("high_fds", COUNTED)
        proc = await ready_job(server)
        assert server._sock is not None and server._sock.fileno() >= 1024
        proc.start(job=JOB, url="ws://127.0.0.1:1", token="t", identity="me", agent="a")
        await proc.stop("test over", timeout=10)
        assert conclude(await proc.wait()).status is SUCCESS
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_warm_process_still_loading_when_its_agent_goes_is_killed(tmp_path: Path) -> None:
    # Its prewarm hangs: the process is forked and loading, not yet in the pool's ready set.
    from lkrun.supervision.warm_pool import WarmPool

    server = ForkServer(
        label="test",
        app=AppSpec(
            "tests.agents.behaviours:returns_at_once", "tests.agents.behaviours:prewarm_hangs"
        ),
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        load_timeout=30,
    )
    log = logging.LoggerAdapter(logging.getLogger("t"), {})
    pool = WarmPool(
        label="test", factory=lambda: JobProcess(launcher=server, log=log), size=1, timeout=60
    )
    task = asyncio.create_task(pool.run())
    try:

        def loading() -> list[psutil.Process]:
            zygote = server.pid
            return psutil.Process(zygote).children() if zygote is not None else []

        [child] = await wait_for(loading, 30, what="a warm process to be forked")
        task.cancel()  # the agent is retired while its warm process loads
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        await wait_for(lambda: not pid_alive(child.pid), 10, what="the warm process to end")
    finally:
        task.cancel()
        # With nothing left running, the zygote exits at once instead of at the timeout.
        await asyncio.wait_for(server.close(timeout=60), 10)
