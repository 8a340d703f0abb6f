"""results.md from results.json: one row per metric, one column per system and variant."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

COLUMNS = ("lkrun-cold", "lkrun-warm", "official-cold", "official-warm")
RATIOS = (("cold", "lkrun-cold", "official-cold"), ("warm", "lkrun-warm", "official-warm"))

Getter = Callable[[dict[str, Any]], Any]


def _path(*keys: Any) -> Getter:
    def get(run: dict[str, Any]) -> Any:
        value: Any = run
        for key in keys:
            if isinstance(value, dict):
                value = value.get(key)
            else:
                return None
        return value

    return get


def _at(count: int, key: str) -> Getter:
    def get(run: dict[str, Any]) -> Any:
        for level in run.get("memory") or []:
            if level.get("jobs") == count:
                return level.get(key)
        return None

    return get


def _per_job_total(count: int) -> Getter:
    def get(run: dict[str, Any]) -> Any:
        total, jobs = _at(count, "total_pss_mb")(run), _at(count, "jobs_sampled")(run)
        return round(total / jobs, 1) if total is not None and jobs else None

    return get


def metric_rows(results: dict[str, Any]) -> list[tuple[str, Getter]]:
    rows: list[tuple[str, Getter]] = []
    for name, key in (
        ("dispatch → visible to observer", "dispatch_to_visible_ms"),
        ("dispatch → joined (ListParticipants)", "dispatch_to_joined_ms"),
    ):
        for stat in ("p50", "p95", "mean"):
            rows.append((f"{name} {stat} (ms)", _path("latency", key, stat)))
    for stat in ("p50", "p95"):
        rows.append(
            (f"offer → entrypoint {stat} (ms)", _path("latency", "offer_to_entrypoint_ms", stat))
        )
    rows += [
        ("idle: main process RSS (MB)", _path("idle", "main_rss_mb")),
        ("idle: main process PSS (MB)", _path("idle", "main_pss_mb")),
        ("idle: main process CPU (%)", _path("idle", "main_cpu_percent")),
        ("idle: helper processes PSS (MB)", _path("idle", "helpers_pss_mb")),
    ]
    counts = results.get("meta", {}).get("settings", {}).get("concurrency", [])
    for count in counts:
        rows += [
            (f"@{count} jobs: PSS per job (MB)", _at(count, "job_pss_mb")),
            (f"@{count} jobs: USS per job (MB)", _at(count, "job_uss_mb")),
            (f"@{count} jobs: PSS of everything / jobs (MB)", _per_job_total(count)),
            (f"@{count} jobs: main process RSS (MB)", _at(count, "main_rss_mb")),
            (f"@{count} jobs: main process PSS (MB)", _at(count, "main_pss_mb")),
            (f"@{count} jobs: main process CPU over hold (%)", _at(count, "main_cpu_percent")),
            (f"@{count} jobs: all job processes CPU (%)", _at(count, "jobs_cpu_percent")),
            (f"@{count} jobs: dispatch → all agents in (s)", _at(count, "all_in_s")),
        ]
    rows.append(("max concurrent jobs held", _path("max_jobs", "held")))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def _ratio(a: Any, b: Any) -> str:
    if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or b == 0:
        return "-"
    return f"{a / b:.2f}"


def table(results: dict[str, Any]) -> str:
    runs = results.get("runs", {})
    header = ["metric", *COLUMNS, *(f"lkrun/official {name}" for name, _, _ in RATIOS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for label, get in metric_rows(results):
        values = {col: get(runs[col]) if col in runs else None for col in COLUMNS}
        if all(v is None for v in values.values()):
            continue
        cells = [label, *(_fmt(values[c]) for c in COLUMNS)]
        cells += [_ratio(values[a], values[b]) for _, a, b in RATIOS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    settings = meta.get("settings", {})
    runs = results.get("runs", {})
    out = [
        f"# lkrun vs livekit-agents {meta.get('livekit_agents_version', '?')}, "
        f"{meta.get('started', '')}",
        "",
        f"Machine: {meta.get('cpus', '?')} CPUs, {meta.get('memory_gib', '?')} GiB; "
        f"livekit-server {meta.get('livekit_server_version', '?')} (dev mode, loopback); "
        f"lkrun {meta.get('lkrun_version', '?')}; Python {meta.get('python', '?')}. "
        f"Warm = {settings.get('idle')} prewarmed processes "
        "(lkrun `idle_processes`, official `num_idle_processes`); cold = 0.",
        f"{settings.get('dispatches')} sequential dispatches (+{settings.get('warmup')} warm-up), "
        f"memory at {settings.get('concurrency')} concurrent jobs held {settings.get('hold')} s, "
        f"max-jobs ramp +{settings.get('ramp_step')} up to {settings.get('max_jobs_cap')} "
        f"({settings.get('visible_timeout')} s per agent).",
        "",
        table(results),
        "",
        "Ratios are lkrun / official: below 1 means lkrun is lower (faster, smaller), "
        "which is better for every row but the last (max jobs, where higher is better). "
        "Absolute times drift on a shared 2-core machine; compare within one run.",
        "",
        "## How to read it",
        "",
        "- **dispatch → visible**: from just before CreateDispatch to `participant_connected` "
        "at an observer already in the room. livekit-server batches the join of a participant "
        "that publishes nothing and sends it to others on a 3 s room ticker "
        "(`subscriberUpdateInterval`), so this number is quantised by the server and hides "
        "most differences between the systems.",
        "- **dispatch → joined**: the same start, to the agent first listed by "
        "RoomService.ListParticipants (polled every 20 ms): what the agent host controls.",
        "- **offer → entrypoint**: each system's own wall-clock stamps. lkrun: `offered_at` "
        "(AvailabilityRequest received) to `started_at` (entrypoint called) from "
        "`lkrun jobs ls --json --all`. Official worker: `RunningJobInfo.received_at` (stamped "
        "by the worker in `_handle_availability`, handed to the job process) to `time.time()` "
        "at the start of the entrypoint, both written by `tests/bench/official_worker.py`.",
        "- **PSS/USS per job**: psutil `memory_full_info()` summed over each job's process "
        "tree, averaged over jobs. Job pids: `lkrun jobs ls --json`; official: the pid its "
        "entrypoint logged. **PSS of everything / jobs**: main process + helpers + all "
        "jobs, divided by the number of jobs: the whole cost of a job, sharing included. "
        "**Helpers**: the main process's other descendants (idle prewarmed "
        "processes and the fork server: lkrun's per agent, the official worker's with "
        "its resource tracker).",
        "- **main process CPU**: psutil `cpu_percent` of the daemon / worker main process "
        "over the hold (100 % = one core).",
        "- **max concurrent jobs held**: rooms added in steps until an agent is not in within "
        "the timeout, a held agent is gone, or a job fails; the last fully held count.",
        "- Limits: lkrun `max_jobs = 200`, `[daemon] load_threshold = 1.0` (the highest it "
        "accepts); official `load_threshold = inf` (never full), "
        "`initialize_process_timeout = 120` (lkrun's ready timeout), and "
        + (
            "a `load_fnc` shaped like lkrun's load (max(jobs/200, CPU) * 0.7, capped at "
            "0.69). Its default `load_fnc` reports the machine's CPU use, and livekit-server "
            "offers no job to a worker whose load is at or above its target load (0.7), "
            "whatever `load_threshold` says: run with `--official-load default` to see it."
            if settings.get("official_load", "lkrun") == "lkrun"
            else "its default `load_fnc` (machine CPU use): livekit-server offers it no job "
            "while that is at or above 0.7."
        ),
    ]
    problems = []
    for label in COLUMNS:
        run = runs.get(label)
        if run is None:
            continue
        if not run.get("ok"):
            lines = str(run.get("error") or "").strip().splitlines() or [""]
            error = lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "")
            problems.append(f"- {label}: failed: {error}")
        stop = (run.get("max_jobs") or {}).get("stop_reason")
        if stop and stop != "cap reached":
            problems.append(f"- {label}: max-jobs ramp stopped: {stop}")
        timeouts = (run.get("latency") or {}).get("timeouts")
        if timeouts:
            problems.append(f"- {label}: {timeouts} dispatches never became visible")
        problems += [f"- {label}: {note}" for note in run.get("notes") or []]
    skipped = [c for c in COLUMNS if c not in runs]
    if skipped:
        problems.append(f"- not run: {', '.join(skipped)}")
    if problems:
        out += ["", "## Run notes", "", *problems]
    return "\n".join(out) + "\n"
