"""Where a job's memory goes, in the bench (issue 20): the per-level breakdown that
`measure.job_breakdown` records (smaps of a few jobs, thread names of every job) and the
"Where a job's memory goes" table `report` draws from results.json. No processes: /proc
reads are replaced by fakes."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from lkrun import memory_map
from tests.bench import measure, report


def kinds(**pss_dirty: tuple[int, int]) -> dict[str, dict[str, int]]:
    """Per kind {Pss, Private_Dirty} in kB, the other fields 0."""
    out: dict[str, dict[str, int]] = {}
    for kind, (pss, dirty) in pss_dirty.items():
        row = memory_map.empty()
        row.update(mappings=1, Pss=pss, Private_Dirty=dirty)
        out[kind] = row
    return out


@pytest.fixture
def fake_proc(monkeypatch: pytest.MonkeyPatch) -> dict[int, Any]:
    """pid -> (kinds, thread names); a pid missing from it has ended."""
    procs: dict[int, Any] = {}

    def fake_report(pid: int, *, tree: bool = False) -> dict[str, Any]:
        if pid not in procs:
            raise memory_map.Unreadable(f"pid {pid}: gone")
        return {"pid": pid, "kinds": procs[pid][0]}

    def fake_threads(pid: int) -> tuple[Counter[str], list[int]]:
        return Counter(procs[pid][1] if pid in procs else {}), []

    monkeypatch.setattr(memory_map, "report", fake_report)
    monkeypatch.setattr(memory_map, "threads", fake_threads)
    monkeypatch.setattr(memory_map, "descendants", lambda pid: [])
    return procs


def test_job_breakdown_means_a_few_jobs_and_counts_every_jobs_threads(
    fake_proc: dict[int, Any],
) -> None:
    fake_proc[1] = (kinds(heap=(1000, 800), arenas=(3000, 3000)), {"python": 1, "AsyncResolver": 4})
    fake_proc[2] = (kinds(heap=(2000, 1600), arenas=(1000, 1000)), {"python": 1})
    fake_proc[3] = (kinds(heap=(9000, 9000)), {"python": 1, "tokio-rt-worker": 2})
    out = measure.job_breakdown([1, 2, 3, 4], sample=2)  # 4 has ended
    assert out["jobs_sampled"] == 2 and out["pids"] == [1, 2]
    assert out["kinds"]["heap"]["Pss"] == 1500 and out["kinds"]["heap"]["Private_Dirty"] == 1200
    assert out["kinds"]["arenas"]["Pss"] == 2000
    assert out["total"]["Pss"] == 3500
    assert out["thread_jobs"] == 3
    assert out["threads_per_job"]["mean"] == 3.0  # (5 + 1 + 3) / 3
    names = out["thread_names_per_job"]
    assert names["python"] == {"mean": 1.0, "min": 1, "max": 1}
    assert names["AsyncResolver"] == {"mean": 1.33, "min": 0, "max": 4}
    assert names["tokio-rt-worker"] == {"mean": 0.67, "min": 0, "max": 2}


def test_job_breakdown_of_ended_jobs_is_empty(fake_proc: dict[int, Any]) -> None:
    out = measure.job_breakdown([7, 8])
    assert out["jobs_sampled"] == 0 and out["kinds"] == {} and out["threads_per_job"] is None


def level(jobs: int, kb: dict[str, dict[str, int]], names: dict[str, float], **extra: Any) -> Any:
    return {
        "jobs": jobs,
        "breakdown": {
            "unit": "kB",
            "jobs_sampled": 3,
            "kinds": kb,
            "total": memory_map.total(kb),
            "thread_jobs": jobs,
            "threads_per_job": {"mean": sum(names.values()), "min": 10, "max": 50},
            "thread_names_per_job": {n: {"mean": m, "min": 0, "max": 9} for n, m in names.items()},
            **extra,
        },
    }


def results(runs: dict[str, Any]) -> dict[str, Any]:
    return {"workloads": {"agents": {"settings": {"concurrency": [1, 50]}, "runs": runs}}}


def test_the_table_puts_both_hosts_kinds_and_threads_side_by_side() -> None:
    lk = {
        "memory": [
            level(1, kinds(heap=(99 * 1024, 0)), {"python": 1.0}),
            level(
                50,
                kinds(heap=(2048, 1024), arenas=(10 * 1024, 10 * 1024)),
                {"AsyncResolver": 40.0, "python": 1.0},
            ),
        ]
    }
    official = {"memory": [level(50, kinds(heap=(4096, 3072)), {"python": 1.0, "x": 2.0})]}
    text = report.breakdown_table(results({"lkrun-warm": lk, "official-warm": official}))
    lines = text.splitlines()
    assert lines[0] == (
        "| kind | lkrun PSS (@50, 3 jobs) | lkrun Priv dirty "
        "| official PSS (@50, 3 jobs) | official Priv dirty |"
    )
    assert "| heap | 2.0 | 1.0 | 4.0 | 3.0 |" in lines  # @50, not @1's 99 MB
    assert "| arenas | 10.0 | 10.0 | - | - |" in lines
    assert "| **total** | 12.0 | 11.0 | 4.0 | 3.0 |" in lines
    assert "| `AsyncResolver` | 40.0 | 0.00 |" in lines
    assert "| `python` | 1.00 | 1.00 |" in lines
    assert lines.index("| `AsyncResolver` | 40.0 | 0.00 |") < lines.index("| `x` | 0.00 | 2.00 |")
    assert "| **all threads** (min-max) | 41.0 (10-50) | 3.00 (10-50) |" in lines


def test_many_thread_names_are_summed_past_the_first_few() -> None:
    names = {f"t{i}": float(i) for i in range(1, 12)}
    run = {"memory": [level(10, kinds(heap=(1024, 0)), names)]}
    lines = report.breakdown_table(results({"lkrun-warm": run})).splitlines()
    assert "| `t11` | 11.0 | 0.00 |" in lines
    assert "| `t3` | 3.00 | 0.00 |" not in lines
    assert "| 3 other names | 6.00 | 0.00 |" in lines  # t1 + t2 + t3
    assert lines[0].endswith("| official PSS (not measured) | official Priv dirty |")


def test_runs_without_a_breakdown_draw_no_table_and_markdown_adds_it() -> None:
    old = {"memory": [{"jobs": 50, "job_pss_mb": 30.0}]}
    assert report.breakdown_table(results({"lkrun-warm": old, "official-warm": old})) == ""
    assert "Where a job's memory goes" not in report.markdown(results({"lkrun-warm": old}))
    new = {"memory": [level(50, kinds(heap=(1024, 0)), {"python": 1.0})]}
    text = report.markdown(results({"lkrun-warm": new, "official-warm": old}))
    assert "### Where a job's memory goes" in text and "| heap | 1.0 | 0.0 | - | - |" in text


def test_cold_runs_are_shown_when_there_is_no_warm_one() -> None:
    run = {"memory": [level(10, kinds(heap=(1024, 512)), {"python": 1.0})]}
    text = report.breakdown_table(results({"lkrun-cold": run, "official-cold": run}))
    assert "| heap | 1.0 | 0.5 | 1.0 | 0.5 |" in text.splitlines()
