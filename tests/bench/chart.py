"""Charts from results.json; run with the bench venv's python (it has matplotlib).

    ~/.cache/lkrun/bench-venv-livekit-agents-1.8.9/bin/python tests/bench/chart.py \\
        results/bench-.../results.json [chart.png]

One chart per workload: ``chart.png`` for ``join`` (or the name given), ``chart-agents.png``
for ``agents``, next to it; none for ``media``, ``venv`` and ``node`` (their tables say it all).

Standalone on purpose: it imports neither lkrun nor the project's packages.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ("lkrun-cold", "lkrun-warm", "official-cold", "official-warm")
COLORS = {
    "lkrun-cold": "#1f77b4",
    "lkrun-warm": "#6baed6",
    "official-cold": "#d62728",
    "official-warm": "#fc9272",
}


def _get(run: dict[str, Any], *keys: str) -> Any:
    value: Any = run
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _jobs_axis(ax: Any) -> None:
    ax.set_xlabel("concurrent jobs")
    low, high = ax.get_xlim()
    if high / max(low, 0.5) >= 10:
        ax.set_xscale("log")


def latency_panel(ax: Any, runs: dict[str, Any]) -> None:
    metrics = (
        ("dispatch→visible", "dispatch_to_visible_ms"),
        ("dispatch→joined", "dispatch_to_joined_ms"),
        ("offer→entrypoint", "offer_to_entrypoint_ms"),
    )
    labels = [label for label in ORDER if label in runs]
    width = 0.8 / max(len(labels), 1)
    for i, label in enumerate(labels):
        p50 = [_get(runs[label], "latency", key, "p50") or 0 for _, key in metrics]
        p95 = [_get(runs[label], "latency", key, "p95") or 0 for _, key in metrics]
        xs = [m + i * width for m in range(len(metrics))]
        ax.bar(xs, p50, width, color=COLORS[label], label=f"{label} p50")
        ax.scatter(xs, p95, color="black", marker="_", s=120, zorder=3)
    ax.set_xticks([m + width * (len(labels) - 1) / 2 for m in range(len(metrics))])
    ax.set_xticklabels([name for name, _ in metrics])
    ax.set_yscale("log")
    ax.set_ylabel("ms, log scale (bar p50, tick p95)")
    ax.set_title("Latency")
    ax.legend(fontsize=7)


def per_job_panel(ax: Any, runs: dict[str, Any]) -> None:
    for label in ORDER:
        levels = (runs.get(label) or {}).get("memory") or []
        points = [(lv["jobs"], lv.get("job_pss_mb")) for lv in levels if lv.get("job_pss_mb")]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", color=COLORS[label], label=label)
        points = [(lv["jobs"], lv.get("job_uss_mb")) for lv in levels if lv.get("job_uss_mb")]
        if points:
            ax.plot(*zip(*points, strict=True), marker="x", ls="--", color=COLORS[label])
    _jobs_axis(ax)
    ax.set_ylim(bottom=0)
    ax.set_ylabel("MB per job (solid PSS, dashed USS)")
    ax.set_title("Memory per running job")
    ax.legend(fontsize=7)


def main_panel(ax: Any, runs: dict[str, Any]) -> None:
    twin = ax.twinx()
    for label in ORDER:
        levels = (runs.get(label) or {}).get("memory") or []
        rss = [(lv["jobs"], lv.get("main_rss_mb")) for lv in levels if lv.get("main_rss_mb")]
        cpu = [(lv["jobs"], lv.get("main_cpu_percent")) for lv in levels]
        cpu = [(x, y) for x, y in cpu if y is not None]
        if rss:
            ax.plot(*zip(*rss, strict=True), marker="o", color=COLORS[label], label=label)
        if cpu:
            twin.plot(*zip(*cpu, strict=True), marker="^", ls=":", color=COLORS[label])
    _jobs_axis(ax)
    ax.set_ylim(bottom=0)
    twin.set_ylim(bottom=0)
    ax.set_ylabel("main process RSS, MB (solid)")
    twin.set_ylabel("main process CPU % (dotted)")
    ax.set_title("Daemon / worker main process")
    ax.legend(fontsize=7, loc="lower right")


def max_panel(ax: Any, runs: dict[str, Any], cap: Any) -> None:
    labels = [label for label in ORDER if _get(runs.get(label) or {}, "max_jobs", "held")]
    values = [_get(runs[label], "max_jobs", "held") for label in labels]
    ax.bar(labels, values, color=[COLORS[label] for label in labels])
    if cap:
        ax.axhline(cap, color="gray", ls="--", lw=1, label=f"cap {cap}")
        ax.legend(fontsize=7)
    ax.set_ylabel("jobs")
    ax.set_title("Max concurrent jobs held")
    ax.tick_params(axis="x", labelsize=8)


def workload_chart(meta: dict[str, Any], workload: str, part: dict[str, Any], target: Path) -> None:
    runs = {k: v for k, v in part.get("runs", {}).items() if v.get("ok")}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    latency_panel(axes[0][0], runs)
    per_job_panel(axes[0][1], runs)
    main_panel(axes[1][0], runs)
    settings = part.get("settings", {})
    # With --ramp-to-limit the cap is a far safety ceiling: no line (issue 20).
    max_panel(
        axes[1][1], runs, None if settings.get("ramp_to_limit") else settings.get("max_jobs_cap")
    )
    fig.suptitle(
        f"lkrun vs livekit-agents {meta.get('livekit_agents_version', '?')}, "
        f"workload {workload} ({meta.get('started', '')}, {meta.get('cpus', '?')} CPUs)"
    )
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    print(target)


def main() -> int:
    source = Path(sys.argv[1])
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else source.with_name("chart.png")
    results = json.loads(source.read_text())
    meta = results.get("meta", {})
    parts = results.get("workloads") or {
        "join": {"settings": meta.get("settings", {}), "runs": results.get("runs", {})}
    }
    for workload, part in parts.items():
        if workload not in ("join", "agents"):
            # media, venv, node: their figures are in results.md's tables (no ramp, and
            # venv and node compare lkrun with itself, which ORDER's columns do not name).
            continue
        name = target if workload == "join" else target.with_name(f"chart-{workload}.png")
        workload_chart(meta, workload, part, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
