"""``job_threads`` and ``malloc_arena_max`` (issue 20): parsed with their [daemon] defaults,
refused in one line naming file, agent and field, put in the job's environment under the
agent's own ``env``, and (e2e, real livekit-server) seen in running job processes: their
``/proc/PID/environ`` and their rtc runtime's threads by name; that environ also lacks the
daemon's secrets, the LiveKit key and secret and the dashboard's token (issue 21)."""

from __future__ import annotations

import collections
import textwrap
from pathlib import Path
from typing import Any

import pytest

from lkrun.credentials import DASHBOARD_TOKEN_ENV, SECRET_ENV, Credentials
from lkrun.manifest import (
    JOB_THREADS,
    MALLOC_ARENA_MAX,
    DaemonSettings,
    parse_manifest,
)
from lkrun.supervision.agent_processes import (
    ARENA_ENV,
    THREAD_ENV,
    _loaded_fields,
    job_env,
    resource_env,
)
from tests.conftest import pid_alive, unique, wait_for
from tests.helpers import agent_table, assert_manifest_error, dispatch, job_in_room

CREDENTIALS = Credentials("ws://127.0.0.1:7880", "key", "secret")
DASHBOARD_TOKEN = "dashboard-token-kept-from-jobs"


def parse(text: str) -> Any:
    return parse_manifest(textwrap.dedent(text), "agents.toml")


# -- the manifest ---------------------------------------------------------------------------


def test_defaults_daemon_defaults_and_agent_values() -> None:
    agents = parse(
        """
        [agents.a]
        entrypoint = "pkg.mod:main"
        """
    ).agents
    assert (agents["a"].job_threads, agents["a"].malloc_arena_max) == (JOB_THREADS, 2)
    assert (DaemonSettings().job_threads, DaemonSettings().malloc_arena_max) == (
        JOB_THREADS,
        MALLOC_ARENA_MAX,
    )
    agents = parse(
        """
        [daemon]
        job_threads = 4
        malloc_arena_max = 0
        [agents.a]
        entrypoint = "pkg.mod:main"
        [agents.b]
        entrypoint = "pkg.mod:main"
        job_threads = 1
        malloc_arena_max = 3
        """
    ).agents
    assert (agents["a"].job_threads, agents["a"].malloc_arena_max) == (4, 0)
    assert (agents["b"].job_threads, agents["b"].malloc_arena_max) == (1, 3)


@pytest.mark.parametrize(
    ("text", "agent", "field", "message"),
    [
        (
            '[agents.a]\nentrypoint = "p.m:f"\njob_threads = -1\n',
            "a",
            "job_threads",
            "must be an integer >= 0, got -1",
        ),
        (
            '[agents.a]\nentrypoint = "p.m:f"\njob_threads = "2"\n',
            "a",
            "job_threads",
            "must be an integer >= 0, got '2'",
        ),
        (
            '[agents.a]\nentrypoint = "p.m:f"\nmalloc_arena_max = 1.5\n',
            "a",
            "malloc_arena_max",
            "must be an integer >= 0, got 1.5",
        ),
        (
            '[daemon]\njob_threads = true\n[agents.a]\nentrypoint = "p.m:f"\n',
            None,
            "daemon.job_threads",
            "must be an integer >= 0, got true",
        ),
        (
            '[daemon]\nmalloc_arena_max = -2\n[agents.a]\nentrypoint = "p.m:f"\n',
            None,
            "daemon.malloc_arena_max",
            "must be an integer >= 0, got -2",
        ),
    ],
)
def test_bad_values_are_one_line_naming_file_agent_and_field(
    text: str, agent: str | None, field: str, message: str
) -> None:
    assert_manifest_error(text, agent, field, message)


# -- the job's environment ------------------------------------------------------------------


def spec(table: str) -> Any:
    return parse(f'[agents.a]\nentrypoint = "pkg.mod:main"\n{table}').agents["a"]


def test_the_caps_go_in_the_job_environment_over_the_daemons() -> None:
    daemon_env = {"TOKIO_WORKER_THREADS": "64", "MALLOC_ARENA_MAX": "8", "HOME": "/root"}
    env = job_env(spec("job_threads = 3\nmalloc_arena_max = 1"), CREDENTIALS, daemon_env, Path())
    assert {name: env[name] for name in THREAD_ENV} == dict.fromkeys(THREAD_ENV, "3")
    assert env[ARENA_ENV] == "1" and env["HOME"] == "/root"


def test_the_agents_own_env_wins_over_the_caps() -> None:
    agent = spec('job_threads = 1\nenv = { TOKIO_WORKER_THREADS = "6", MALLOC_ARENA_MAX = "4" }')
    env = job_env(agent, CREDENTIALS, {}, Path())
    assert (env["TOKIO_WORKER_THREADS"], env["OPENBLAS_NUM_THREADS"]) == ("6", "1")
    assert env[ARENA_ENV] == "4"


def test_zero_sets_nothing_and_the_daemons_values_pass_through() -> None:
    agent = spec("job_threads = 0\nmalloc_arena_max = 0")
    assert resource_env(agent) == {}
    env = job_env(agent, CREDENTIALS, {"TOKIO_WORKER_THREADS": "16"}, Path())
    assert env["TOKIO_WORKER_THREADS"] == "16"
    assert not {"OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", ARENA_ENV} & set(env)


def test_a_changed_cap_replaces_the_fork_server() -> None:
    """The fork server's environment is its jobs': glibc and OpenBLAS read it at start."""
    assert _loaded_fields(spec("job_threads = 1")) != _loaded_fields(spec("job_threads = 2"))
    assert _loaded_fields(spec("malloc_arena_max = 1")) != _loaded_fields(spec(""))


# -- e2e: what running job processes have -----------------------------------------------------


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.partition(b"=") for entry in raw.split(b"\0") if entry)
    return {name.decode(): value.decode(errors="replace") for name, _, value in pairs}


def thread_names(pid: int) -> collections.Counter[str]:
    names: collections.Counter[str] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            names[(task / "comm").read_text().strip()] += 1
        except OSError:  # the thread ended
            continue
    return names


# The daemon's own environment asks for this many rtc runtime workers, as tokio would size
# the runtime on a machine with this many cores: an uncapped job gets them all.
SIMULATED_CORES = 6


@pytest.mark.e2e
async def test_running_jobs_have_the_caps_in_their_environment_and_threads(
    start_daemon: Any, livekit_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKIO_WORKER_THREADS", str(SIMULATED_CORES))
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    # The daemon's secrets (issue 21): the dashboard's token is in its environment too.
    monkeypatch.setenv(DASHBOARD_TOKEN_ENV, DASHBOARD_TOKEN)
    agents = {
        # forked from the agent's fork server
        "capped": {"job_threads": 1, "malloc_arena_max": 1},
        # a new interpreter per job
        "spawned": {"job_threads": 1, "malloc_arena_max": 1, "start_method": "spawn"},
        # the agent's env wins over the cap
        "own": {"job_threads": 1, "env": {"TOKIO_WORKER_THREADS": "3", "MALLOC_ARENA_MAX": "4"}},
        # no cap: the daemon's environment passes through
        "uncapped": {"job_threads": 0, "malloc_arena_max": 0},
    }
    names = {kind: unique(kind) for kind in agents}
    manifest = "".join(agent_table(names[kind], **fields) for kind, fields in agents.items())
    daemon = await start_daemon(manifest)
    rooms = {kind: unique("room") for kind in agents}
    for kind in agents:
        await dispatch(livekit_server, rooms[kind], names[kind])
    pids = {kind: (await job_in_room(daemon, rooms[kind], "running"))["pid"] for kind in agents}

    def workers(kind: str) -> int:
        return thread_names(pids[kind])["tokio-rt-worker"]

    for kind in agents:  # the echo connects: its rtc runtime starts all its workers at once
        await wait_for(lambda kind=kind: workers(kind) > 0, 30, what=f"{kind}'s rtc runtime")
        assert pid_alive(pids[kind])

    seen = {kind: environ(pids[kind]) for kind in agents}
    for kind in agents:  # no job has the daemon's secrets, forked or spawned
        assert not {*SECRET_ENV, DASHBOARD_TOKEN_ENV} & set(seen[kind]), kind
        assert not any(DASHBOARD_TOKEN in value for value in seen[kind].values()), kind
    for kind in ("capped", "spawned"):
        assert {name: seen[kind].get(name) for name in THREAD_ENV} == dict.fromkeys(
            THREAD_ENV, "1"
        ), kind
        assert seen[kind].get(ARENA_ENV) == "1", kind
    assert seen["own"]["TOKIO_WORKER_THREADS"] == "3" and seen["own"][ARENA_ENV] == "4"
    assert seen["own"]["OPENBLAS_NUM_THREADS"] == "1"
    assert seen["uncapped"]["TOKIO_WORKER_THREADS"] == str(SIMULATED_CORES)
    assert ARENA_ENV not in seen["uncapped"] and "OPENBLAS_NUM_THREADS" not in seen["uncapped"]

    # tokio names its blocking-pool threads like its workers: a forked job has one for a
    # while after it starts (gone after tokio's 10 s keep-alive), so the count settles.
    expected = {"capped": 1, "spawned": 1, "own": 3, "uncapped": SIMULATED_CORES}

    counts: dict[str, int] = {}

    def settled() -> bool:
        counts.update((kind, workers(kind)) for kind in agents)
        return counts == expected

    try:
        await wait_for(settled, 40, what="the tokio-rt-worker threads")
    except AssertionError:
        raise AssertionError(f"tokio-rt-worker threads per job: {counts}, not {expected}") from None


# -- the bench's options that compare settings ------------------------------------------------


def test_the_benchs_job_env_and_daemon_settings_make_a_manifest_lkrun_accepts(
    tmp_path: Path,
) -> None:
    from tests.bench.run import parse_args
    from tests.bench.suts import LkrunSut

    args = parse_args(
        ["--job-env", "TOKIO_WORKER_THREADS=16", "--daemon-setting", "malloc_arena_max=0"]
    )
    sut = LkrunSut(
        tmpdir=tmp_path,
        variant="warm",
        idle=1,
        server=None,  # type: ignore[arg-type]
        workdir=tmp_path,
        registry=None,  # type: ignore[arg-type]
        workload="agents",
        job_env=dict(args.job_env),
        daemon_settings=args.daemon_setting,
    )
    agent = parse(sut.manifest_text()).agents[sut.agent_name]
    assert agent.env == {"TOKIO_WORKER_THREADS": "16"}
    assert (agent.malloc_arena_max, agent.job_threads) == (0, JOB_THREADS)
    assert job_env(agent, CREDENTIALS, {}, Path())["TOKIO_WORKER_THREADS"] == "16"
    with pytest.raises(SystemExit):
        parse_args(["--job-env", "NO_VALUE"])
