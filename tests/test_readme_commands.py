"""What the README tells users to run: the Makefile's redis check and where the bench's
results go (benchmarks/, so that every figure the README quotes can be checked)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import readme_samples
from tests.bench import report, run

REPO = Path(__file__).resolve().parent.parent


def _make_redis(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    return subprocess.run(
        [make, "-s", "-C", str(REPO), "redis"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _path_without_redis(tmp_path: Path) -> str:
    """A PATH with no redis-server and an `id` that says we are not root (so no apt-get)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_id = bin_dir / "id"
    fake_id.write_text("#!/bin/sh\necho 1000\n")
    fake_id.chmod(0o755)
    return str(bin_dir)


@pytest.mark.e2e
def test_make_redis_takes_lkrun_redis_server(tmp_path: Path) -> None:
    redis = tmp_path / "my-redis-server"
    redis.write_text("#!/bin/sh\nexit 0\n")
    redis.chmod(0o755)
    env = {"PATH": _path_without_redis(tmp_path), "LKRUN_REDIS_SERVER": str(redis)}
    assert _make_redis(env).returncode == 0
    del env["LKRUN_REDIS_SERVER"]
    assert _make_redis(env).returncode != 0  # and without it, nothing on PATH: refused


@pytest.mark.e2e
def test_make_redis_refuses_a_bad_lkrun_redis_server(tmp_path: Path) -> None:
    env = dict(os.environ, LKRUN_REDIS_SERVER=str(tmp_path / "missing"))
    result = _make_redis(env)
    assert result.returncode != 0
    assert "LKRUN_REDIS_SERVER" in result.stderr


def test_bench_records_its_command_without_output_flags() -> None:
    argv = ["--workload", "agents", "--results", "/tmp/x", "--copy-to=benchmarks", "--idle", "2"]
    assert run._measuring_args(argv) == ["--workload", "agents", "--idle", "2"]
    results = {"meta": {"command": "python -m tests.bench --workload agents"}, "workloads": {}}
    assert "`python -m tests.bench --workload agents`" in report.markdown(results)


def test_bench_copies_results_to_commit(tmp_path: Path) -> None:
    folder = tmp_path / "results" / "bench-20270101T000000Z"
    folder.mkdir(parents=True)
    (folder / "results.md").write_text("# table\n")
    (folder / "results.json").write_text(json.dumps({"meta": {}}))
    (folder / "livekit-server.log").write_text("big\n")
    target = run._copy(folder, tmp_path / "benchmarks")
    assert target == tmp_path / "benchmarks" / "bench-20270101T000000Z"
    assert sorted(p.name for p in target.iterdir()) == ["results.json", "results.md"]
    assert json.loads((target / "results.json").read_text()) == {"meta": {}}


def test_readme_quotes_only_committed_runs() -> None:
    """A run id the README quotes has its results.md and results.json under benchmarks/."""
    readme = (REPO / "README.md").read_text()
    for run_id in set(re.findall(r"bench(?:-[a-z]+)?-\d{8}T\d{6}Z", readme)):
        for name in ("results.md", "results.json"):
            assert (REPO / "benchmarks" / run_id / name).is_file(), f"{run_id}/{name}"


def test_readme_documents_every_lkrun_variable() -> None:
    """Each LKRUN_* variable the code reads is in the README (tests' own names aside)."""
    readme = (REPO / "README.md").read_text()
    names: set[str] = set()
    for path in [*(REPO / "lkrun").rglob("*.py"), REPO / "Makefile"]:
        names |= set(re.findall(r"\bLKRUN_[A-Z_]+\b", path.read_text()))
    assert names >= {"LKRUN_LIVEKIT_SERVER", "LKRUN_CACHE_DIR", "LKRUN_JOB_LOG_LEVEL"}
    assert sorted(name for name in names if f"`{name}`" not in readme) == []


@pytest.mark.e2e
def test_readme_systemd_unit_parses(tmp_path: Path) -> None:
    """systemd reads every setting of the README's unit (a trailing comment on a line makes it
    ignore the setting: KillMode=mixed and TimeoutStopSec were lost that way)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    readme = (REPO / "README.md").read_text()
    unit = re.search(r"```ini\n(.*?)```", readme, re.S)
    assert unit is not None
    assert "KillMode=mixed" in unit.group(1)
    path = tmp_path / "lkrun.service"
    path.write_text(unit.group(1))
    result = subprocess.run(
        [analyze, "verify", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ignored = [line for line in result.stderr.splitlines() if "ignoring" in line]
    assert ignored == []


def test_readme_samples_replace_only_marked_blocks(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n```console\n$ keep\n```\n"
        "<!-- samples:cli -->\n```console\n$ lkrun old\nold\n```\n<!-- /samples:cli -->\n"
        "<!-- samples:gone -->\n```text\nstays\n```\n<!-- /samples:gone -->\n"
    )
    missing = readme_samples.write_readme({"cli": ["$ lkrun status\nready", "$ lkrun x"]}, readme)
    assert missing == ["gone"]
    assert readme.read_text() == (
        "intro\n```console\n$ keep\n```\n"
        "<!-- samples:cli -->\n```console\n$ lkrun status\nready\n\n$ lkrun x\n```\n"
        "<!-- /samples:cli -->\n"
        "<!-- samples:gone -->\n```text\nstays\n```\n<!-- /samples:gone -->\n"
    )


def test_readme_samples_markers_pair_up() -> None:
    """Every samples marker of the README opens a block that readme_samples can replace."""
    readme = (REPO / "README.md").read_text()
    opened = re.findall(r"<!-- samples:([a-z-]+) -->", readme)
    assert sorted(m["name"] for m in readme_samples.BLOCK.finditer(readme)) == sorted(opened)
    assert {"quick-start", "cli", "metrics"} <= set(opened)
