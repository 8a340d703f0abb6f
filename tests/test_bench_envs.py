"""The bench's venv and node workloads (issue 18): which systems each runs, the manifests it
gives lkrun, and the tables and goal verdicts it writes. No server, no processes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lkrun.manifest import parse_manifest
from tests.bench import report, run
from tests.bench.procs import Registry
from tests.bench.suts import NODE_ECHO, REPO, LkrunSut, Server

SERVER = Server("ws://127.0.0.1:1", "http://127.0.0.1:1", "key", "secret")


def _sut(tmp_path: Path, workload: str, **kwargs: Any) -> LkrunSut:
    return LkrunSut(
        tmpdir=tmp_path / "t",
        variant="warm",
        idle=2,
        server=SERVER,
        workdir=tmp_path / "w",
        registry=Registry(),
        workload=workload,
        **kwargs,
    )


def test_envs_runs_venv_and_node_each_with_its_own_systems() -> None:
    args = run.parse_args(["--workload", "envs"])
    assert args.workload == ["venv", "node"]
    assert run.systems_for("venv", args.systems) == ["lkrun", "lkrun-venv"]
    assert run.systems_for("node", args.systems) == ["lkrun", "node"]
    # The default run (recovery joined it in issue 19) and the official comparisons.
    assert run.parse_args([]).workload == ["join", "agents", "recovery"]
    assert run.parse_args(["--workload", "both"]).workload == ["join", "agents"]
    assert run.systems_for("agents", args.systems) == ["lkrun", "official"]
    assert run.systems_for("node", ["lkrun", "official"]) == ["lkrun"]
    assert run.parse_args(["--workload", "all"]).workload == [
        "join",
        "agents",
        "media",
        "venv",
        "node",
        "recovery",
    ]
    settings = run._settings(args, "venv")
    assert settings.concurrency == [1, 10] and settings.max_jobs_cap == 0


def test_a_note_is_not_part_of_the_recorded_command() -> None:
    argv = ["--workload", "envs", "--note", "busy", "--note=other tests", "--idle", "2"]
    assert run._measuring_args(argv) == ["--workload", "envs", "--idle", "2"]
    assert run.parse_args(argv).note == ["busy", "other tests"]


def test_the_venv_system_gives_the_agent_its_own_interpreter(tmp_path: Path) -> None:
    python = Path(sys.executable)
    sut = _sut(tmp_path, "venv", system="lkrun-venv", python=python)
    assert sut.agent_name == "bench-lkrun-venv-env" and sut.label == "lkrun-venv-warm"
    manifest = tmp_path / "agents.toml"
    manifest.write_text(sut.manifest_text())
    spec = parse_manifest(manifest.read_text(), manifest).agents[sut.agent_name]
    assert spec.entrypoint == "tests.bench.lka_agent:server"
    assert spec.python == python
    # The daemon's PYTHONPATH does not reach another interpreter: the agent's env names
    # the repository, where tests.bench.lka_agent is.
    assert dict(spec.env) == {"PYTHONPATH": str(REPO)}
    assert spec.idle_processes == 2 and spec.prewarm_timeout == 120
    # The same agent on the daemon's interpreter: no python, no env.
    same = _sut(tmp_path, "venv")
    manifest.write_text(same.manifest_text())
    plain = parse_manifest(manifest.read_text(), manifest).agents[same.agent_name]
    assert plain.python is None and not plain.env
    assert plain.entrypoint == spec.entrypoint and plain.prewarm_timeout == 120


def test_the_node_system_runs_the_node_echo_as_a_command_agent(tmp_path: Path) -> None:
    sut = _sut(tmp_path, "node", system="node", command=["node", str(NODE_ECHO)])
    manifest = tmp_path / "agents.toml"
    manifest.write_text(sut.manifest_text())
    spec = parse_manifest(manifest.read_text(), manifest).agents["bench-node-echo"]
    assert spec.command == ("node", str(NODE_ECHO)) and not spec.entrypoint
    python_echo = _sut(tmp_path, "node")
    manifest.write_text(python_echo.manifest_text())
    echo = parse_manifest(manifest.read_text(), manifest).agents["bench-lkrun-echo"]
    assert echo.entrypoint == "lkrun.examples.echo:entrypoint"


def _run(offer_p50: float, pss: dict[int, float], *, system: str, variant: str) -> dict[str, Any]:
    return {
        "system": system,
        "variant": variant,
        "ok": True,
        "latency": {"offer_to_entrypoint_ms": {"p50": offer_p50, "p95": offer_p50 * 2}},
        "memory": [
            {"jobs": n, "job_pss_mb": v, "job_uss_mb": v / 2, "job_rss_mb": v * 3}
            for n, v in pss.items()
        ],
        "notes": [],
    }


def _results() -> dict[str, Any]:
    venv = {
        "lkrun-cold": _run(30.0, {1: 100.0, 10: 40.0}, system="lkrun", variant="cold"),
        # 1.05x and 1.02x: within 10 %
        "lkrun-venv-cold": _run(31.5, {1: 102.0, 10: 40.8}, system="lkrun-venv", variant="cold"),
        "lkrun-warm": _run(5.0, {1: 80.0, 10: 30.0}, system="lkrun", variant="warm"),
        # 1.20x the offer (missed), 1.10x the PSS at 10 jobs (met: at most 1.10)
        "lkrun-venv-warm": _run(6.0, {1: 80.0, 10: 33.0}, system="lkrun-venv", variant="warm"),
    }
    node = {
        "lkrun-cold": _run(20.0, {1: 30.0, 10: 15.0}, system="lkrun", variant="cold"),
        "node-cold": _run(500.0, {1: 80.0, 10: 45.0}, system="node", variant="cold"),
    }
    settings = {"dispatches": 20, "warmup": 1, "concurrency": [1, 10], "max_jobs_cap": 0}
    return {
        "meta": {
            "started": "2027-01-01T00:00:00Z",
            "cpus": 2,
            "second_interpreter": "/venvs/other/bin/python",
            "node": "node v20.0.0, @livekit/rtc-node 1.1.0",
            "load_average_start": [1.5, 1.2, 1.0],
            "notes": ["other tests ran beside it"],
            "settings": {"idle": 4},
        },
        "workloads": {
            "venv": {"settings": settings, "runs": venv},
            "node": {"settings": settings, "runs": node},
        },
    }


def _row(text: str, name: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {name} |"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_venv_goals_are_own_venv_over_the_daemons_env_at_most_1_10() -> None:
    goals = report.venv_goals(_results())
    assert _row(goals, "offer → entrypoint p50")[2:] == ["1.05: met", "1.20: missed"]
    assert _row(goals, "PSS per job at 1 jobs")[2:] == ["1.02: met", "1.00: met"]
    assert _row(goals, "PSS per job at 10 jobs")[2:] == ["1.02: met", "1.10: met"]


def test_venv_and_node_tables_name_their_columns_and_ratios() -> None:
    results = _results()
    venv = report.table(results, "venv")
    header = _row(venv, "metric")
    assert header == [
        "metric",
        "daemon's env cold",
        "daemon's env warm",
        "own venv cold",
        "own venv warm",
        "own venv/daemon's cold",
        "own venv/daemon's warm",
    ]
    rss = ["120.0", "90.0", "122.4", "99.0", "1.02", "1.10"]
    assert _row(venv, "@10 jobs: RSS per job (MB)")[1:] == rss
    node = report.table(results, "node")
    assert _row(node, "metric")[1:4:2] == ["Python echo cold", "Node echo cold"]
    offer = ["20.0", "-", "500.0", "-", "25.00", "-"]
    assert _row(node, "offer → entrypoint p50 (ms)")[1:] == offer
    # The lkrun-vs-official tables keep their rows: no RSS row there.
    runs = results["workloads"]["venv"]["runs"]
    join = {"workloads": {"join": {"settings": {"concurrency": [1]}, "runs": runs}}}
    assert "RSS per job" not in report.table(join)


def test_markdown_of_an_envs_run_says_what_it_compared_and_what_did_not_run() -> None:
    text = report.markdown(_results())
    first = text.splitlines()[0]
    assert first.startswith("# lkrun: an agent on its own interpreter, and the Node echo")
    assert "Second interpreter: /venvs/other/bin/python." in text
    assert "Node: node v20.0.0, @livekit/rtc-node 1.1.0." in text
    assert "Load average (1 / 5 / 15 min, 2 CPUs: 2 is a busy machine) at the start " in text
    assert "Note: other tests ran beside it" in text
    assert "Issue 18's goal for this workload" in text
    assert "no max-jobs ramp" in text
    assert "- node: not run: lkrun-warm" not in text  # node ran cold only: nothing missing
    runs = _results()
    del runs["workloads"]["node"]["runs"]["node-cold"]
    assert "- node: not run: node-cold" in report.markdown(runs)
