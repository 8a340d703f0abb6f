"""Per-job memory and threads of several agents-workload runs side by side (issue 20: the
thread caps and malloc arena settings, one run per setting).

    .venv/bin/python -m tests.bench.compare base=benchmarks/X/base/results.json \\
        capped=benchmarks/X/capped/results.json

Prints one Markdown table per host (``lkrun-warm``, ``official-warm``) that ran: a column
per run, rows from each run's ``results.json`` (``workloads.agents.runs``): PSS, USS and RSS
(shared pages counted in full) per job at each memory level, and at the highest level the
smaps breakdown of the sampled jobs (MB, mean per job) with the arenas' mapped size, and the
threads per job by name (mean over every job at that level).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HOSTS = ("lkrun-warm", "official-warm")
KINDS = ("anon", "heap", "arenas", "stacks")
THREADS = ("tokio-rt-worker", "python")


def _run(path: Path, host: str) -> dict[str, Any] | None:
    runs = json.loads(path.read_text())["workloads"]["agents"]["runs"]
    run: dict[str, Any] | None = runs.get(host)
    return run


def _mb(kb: float) -> str:
    return f"{kb / 1024:.2f}"


def rows(run: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    levels = run["memory"]
    for level in levels:
        n = level["jobs"]
        out[f"@{n}: PSS per job (MB)"] = f"{level['job_pss_mb']:.1f}"
        out[f"@{n}: USS per job (MB)"] = f"{level['job_uss_mb']:.1f}"
        if level.get("job_rss_mb") is not None:  # shared pages counted in full
            out[f"@{n}: RSS per job (MB)"] = f"{level['job_rss_mb']:.1f}"
    top = levels[-1]
    n, breakdown = top["jobs"], top.get("breakdown") or {}
    kinds = breakdown.get("kinds", {})
    for kind in KINDS:
        if kind in kinds:
            out[f"@{n}: {kind} PSS (MB)"] = _mb(kinds[kind]["Pss"])
            out[f"@{n}: {kind} Private_Dirty (MB)"] = _mb(kinds[kind]["Private_Dirty"])
    if "arenas" in kinds:
        out[f"@{n}: arenas mapped (MB)"] = f"{kinds['arenas']['Size'] / 1024:.0f}"
    if "total" in breakdown:
        out[f"@{n}: smaps Private_Dirty (MB)"] = _mb(breakdown["total"]["Private_Dirty"])
    threads = breakdown.get("threads_per_job")
    if threads:
        out[f"@{n}: threads per job (min-max)"] = (
            f"{threads['mean']:.1f} ({threads['min']:.0f}-{threads['max']:.0f})"
        )
    names = breakdown.get("thread_names_per_job", {})
    for name in THREADS:
        if name in names:
            out[f"@{n}: `{name}` threads per job"] = f"{names[name]['mean']:.1f}"
    out["jobs in / sampled at the top level"] = f"{top['agents_in']} / {top['jobs_sampled']}"
    return out


def table(runs: list[tuple[str, Path]], host: str) -> str:
    columns = [(label, run) for label, path in runs if (run := _run(path, host)) is not None]
    if not columns:
        return ""
    cells = [(label, rows(run)) for label, run in columns]
    names: list[str] = []
    for _, values in cells:
        names += [name for name in values if name not in names]
    lines = [
        f"| {host} | " + " | ".join(label for label, _ in cells) + " |",
        "|---|" + "---:|" * len(cells),
    ]
    lines += [
        f"| {name} | " + " | ".join(values.get(name, "-") for _, values in cells) + " |"
        for name in names
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    runs = []
    for arg in args:
        label, sep, path = arg.rpartition("=")  # a label may hold "="
        if not sep:
            print(f"expected LABEL=results.json, got {arg!r}", file=sys.stderr)
            return 2
        runs.append((label, Path(path)))
    print("\n".join(t for host in HOSTS if (t := table(runs, host))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
