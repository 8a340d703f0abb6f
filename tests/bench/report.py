"""results.md from results.json: per workload, one row per metric, one column per system and
variant; for the agents and media workloads, the issue's goals next to their tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

COLUMNS = ("lkrun-cold", "lkrun-warm", "official-cold", "official-warm")
RATIOS = (("cold", "lkrun-cold", "official-cold"), ("warm", "lkrun-warm", "official-warm"))
TITLES = {
    "join": "Workload `join`: join the room and stay",
    "agents": "Workload `agents`: the same livekit-agents AgentSession on both hosts",
    "media": "Workload `media`: a level meter per room on a 48 kHz tone",
}
DESCRIPTIONS = {
    "join": "lkrun runs `tests/bench/agents.py` (lkrun's own API), the official worker an "
    "entrypoint of `tests/bench/official_worker.py`; both call `ctx.connect()` and return, "
    "and the job lasts until the bench deletes the room.",
    "agents": "Both run `tests/bench/lka_agent.py`, one livekit-agents module: an "
    "`AgentSession` with an in-process echo LLM, text in and out, no STT/TTS/VAD, turn "
    'detection off (lkrun: manifest `entrypoint = "tests.bench.lka_agent:server"`; '
    "official: that `server` with the bench's load settings, `cli.run_app`). The job lasts "
    "until the bench deletes the room.",
    "media": "Each room has an observer publishing a 48 kHz mono 440 Hz tone at -20 dBFS "
    "(10 ms frames, paced in real time, from `tests/bench/tones.py` in processes of their "
    "own, 10 rooms each) and one meter job: lkrun runs its example "
    "`lkrun/examples/level_meter.py` (lkrun's `JobContext`), the official worker the same "
    "meter written against `livekit.agents.JobContext` (`tests/bench/lka_meter.py`); both "
    "publish every microphone's RMS/peak dBFS 4 times a second on data topic `levels`. "
    "CPU is over the hold window, once every meter reports the tone; 100 % is one core. "
    "A job **fell behind** if its observer got < 90 % of the reports due, two reports "
    "more than 0.75 s apart, or the audio it reports having metered grew by < 90 % of "
    "what its observer sent. The observers' CPU is the load, counted against neither "
    "system; they join, and the meters are dispatched, before the tones start.",
}
PSS_GOAL_JOBS = 50
MEDIA_GOAL_ROOMS = 50

Getter = Callable[[dict[str, Any]], Any]


def workloads(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """workload -> {"settings", "runs"}; a results.json from before workloads is ``join``."""
    if "workloads" in results:
        return dict(results["workloads"])
    settings = results.get("meta", {}).get("settings", {})
    return {"join": {"settings": settings, "runs": results.get("runs", {})}}


def title(workload: str) -> str:
    return TITLES.get(workload, f"Workload `{workload}`")


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


def _media_at(count: int, key: str) -> Getter:
    def get(run: dict[str, Any]) -> Any:
        for level in run.get("media") or []:
            if level.get("jobs") == count:
                return level.get(key)
        return None

    return get


def media_rows(settings: dict[str, Any]) -> list[tuple[str, Getter]]:
    rows: list[tuple[str, Getter]] = [
        ("idle: main process RSS (MB)", _path("idle", "main_rss_mb")),
        ("idle: main process CPU (%)", _path("idle", "main_cpu_percent")),
    ]
    for count in settings.get("concurrency", []):
        rows += [
            (f"@{count} rooms: CPU per job (% of a core)", _media_at(count, "job_cpu_percent")),
            (f"@{count} rooms: all job processes CPU (%)", _media_at(count, "jobs_cpu_percent")),
            (f"@{count} rooms: main process CPU (%)", _media_at(count, "main_cpu_percent")),
            (f"@{count} rooms: helper processes CPU (%)", _media_at(count, "helpers_cpu_percent")),
            (f"@{count} rooms: PSS per job (MB)", _media_at(count, "job_pss_mb")),
            (f"@{count} rooms: USS per job (MB)", _media_at(count, "job_uss_mb")),
            (f"@{count} rooms: main process RSS (MB)", _media_at(count, "main_rss_mb")),
            (f"@{count} rooms: jobs behind", _media_at(count, "jobs_behind")),
            (f"@{count} rooms: fewest reports/s of a job", _media_at(count, "min_report_rate")),
            (
                f"@{count} rooms: longest gap between reports (s)",
                _media_at(count, "max_report_gap_s"),
            ),
            (
                f"@{count} rooms: least audio metered (x audio sent)",
                _media_at(count, "min_audio_ratio"),
            ),
            (
                f"@{count} rooms: least tone sent by an observer (x real time)",
                _media_at(count, "min_sent_ratio"),
            ),
            (
                f"@{count} rooms: observers CPU, the load (%)",
                _media_at(count, "observers_cpu_percent"),
            ),
            (
                f"@{count} rooms: machine CPU (% of all cores)",
                _media_at(count, "machine_cpu_percent"),
            ),
        ]
    return rows


def metric_rows(settings: dict[str, Any], workload: str = "join") -> list[tuple[str, Getter]]:
    if workload == "media":
        return media_rows(settings)
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
    # Only where the entrypoint events gave the row above and the host has its own stamps.
    rows.append(
        (
            "offer → started, lkrun's jobs ls p50 (ms)",
            _path("latency", "offer_to_started_ms", "p50"),
        )
    )
    rows += [
        ("idle: main process RSS (MB)", _path("idle", "main_rss_mb")),
        ("idle: main process PSS (MB)", _path("idle", "main_pss_mb")),
        ("idle: main process CPU (%)", _path("idle", "main_cpu_percent")),
        ("idle: helper processes PSS (MB)", _path("idle", "helpers_pss_mb")),
    ]
    for count in settings.get("concurrency", []):
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


def table(results: dict[str, Any], workload: str = "join") -> str:
    part = workloads(results).get(workload, {})
    runs = part.get("runs", {})
    header = ["metric", *COLUMNS, *(f"lkrun/official {name}" for name, _, _ in RATIOS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for label, get in metric_rows(part.get("settings", {}), workload):
        values = {col: get(runs[col]) if col in runs else None for col in COLUMNS}
        if all(v is None for v in values.values()):
            continue
        cells = [label, *(_fmt(values[c]) for c in COLUMNS)]
        cells += [_ratio(values[a], values[b]) for _, a, b in RATIOS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _goal_cell(lkrun: Any, official: Any, target: float | None) -> str:
    """lkrun/official with "met"/"missed" against ``target`` (None: at least 1.0 of it)."""
    ratio = _ratio(lkrun, official)
    if ratio == "-":
        return "-"
    if target is None:
        met = lkrun >= official
        return f"{_fmt(lkrun)} vs {_fmt(official)}: {'met' if met else 'missed'}"
    return f"{ratio}: {'met' if lkrun / official <= target else 'missed'}"


def goals(results: dict[str, Any], workload: str = "agents") -> str:
    """The issue's goals for the agents workload, per variant, from this run's numbers."""
    part = workloads(results).get(workload, {})
    runs = part.get("runs", {})
    counts = part.get("settings", {}).get("concurrency") or [PSS_GOAL_JOBS]
    jobs = PSS_GOAL_JOBS if PSS_GOAL_JOBS in counts else max(counts)
    rows = [
        (
            f"PSS per job at {jobs} jobs",
            "lkrun ≤ 0.5 x official",
            _at(jobs, "job_pss_mb"),
            {"cold": 0.5, "warm": 0.5},
        ),
        (
            "offer → entrypoint p50",
            "lkrun ≤ 0.5 x official (warm)",
            _path("latency", "offer_to_entrypoint_ms", "p50"),
            {"warm": 0.5},
        ),
        (
            "max concurrent jobs held",
            "lkrun ≥ official",
            _path("max_jobs", "held"),
            {"cold": None, "warm": None},
        ),
    ]
    lines = [
        "| goal (from the issue) | target | cold: lkrun/official | warm: lkrun/official |",
        "|---|---|---:|---:|",
    ]
    for name, target, get, limits in rows:
        cells = [name, target]
        for variant, lkrun, official in RATIOS:
            a = get(runs[lkrun]) if lkrun in runs else None
            b = get(runs[official]) if official in runs else None
            if variant in limits:
                cells.append(_goal_cell(a, b, limits[variant]))
            else:
                cells.append(f"{_ratio(a, b)} (no goal)")
        lines.append("| " + " | ".join(cells) + " |")
    if jobs != PSS_GOAL_JOBS:
        lines.append(
            f"\n(The PSS goal is set at {PSS_GOAL_JOBS} jobs; this run went up to {jobs}.)"
        )
    return "\n".join(lines)


def media_goals(results: dict[str, Any], workload: str = "media") -> str:
    """The issue's goals for the media workload, per variant run."""
    part = workloads(results).get(workload, {})
    runs = part.get("runs", {})
    counts = part.get("settings", {}).get("concurrency") or [MEDIA_GOAL_ROOMS]
    rooms = MEDIA_GOAL_ROOMS if MEDIA_GOAL_ROOMS in counts else max(counts)
    behind = _media_at(rooms, "jobs_behind")
    cpu = _media_at(rooms, "job_cpu_percent")
    sampled = _media_at(rooms, "jobs_sampled")
    lines = [
        "| goal (from the issue) | target | cold | warm |",
        "|---|---|---:|---:|",
    ]
    no_behind = [f"no job behind at {rooms} rooms", "lkrun: 0 jobs behind"]
    cheaper = [f"CPU per job at {rooms} rooms", "lkrun ≤ official"]
    for _, lkrun, official in RATIOS:
        a, b = runs.get(lkrun), runs.get(official)
        mine = behind(a) if a else None
        theirs = behind(b) if b else None
        if mine is None:
            no_behind.append("-")
        else:
            verdict = "met" if mine == 0 else "missed"
            other = f", official {theirs}" if theirs is not None else ""
            no_behind.append(f"lkrun {mine}{other}: {verdict}")
        x, y = (cpu(a) if a else None), (cpu(b) if b else None)
        short = {
            name: f"{sampled(run)} of {rooms}"
            for name, run in (("lkrun", a), ("official", b))
            if run and (sampled(run) or 0) < rooms
        }
        if short:
            # CPU over the few jobs still running says nothing about a job's cost.
            running = ", ".join(f"{name} {n}" for name, n in short.items())
            cheaper.append(f"no verdict: jobs running {running}")
        elif isinstance(x, (int, float)) and isinstance(y, (int, float)):
            cheaper.append(f"{_fmt(x)} vs {_fmt(y)}: {'met' if x <= y else 'missed'}")
        else:
            cheaper.append("-")
    lines += ["| " + " | ".join(no_behind) + " |", "| " + " | ".join(cheaper) + " |"]
    if rooms != MEDIA_GOAL_ROOMS:
        lines.append(
            f"\n(The goals are set at {MEDIA_GOAL_ROOMS} rooms; this run went up to {rooms}.)"
        )
    return "\n".join(lines)


def _settings_line(settings: dict[str, Any], workload: str = "join") -> str:
    if workload == "media":
        return (
            f"Rooms: {settings.get('concurrency')}, each held {settings.get('hold')} s "
            "after every meter reported the tone (+3 s warm-in)."
        )
    return (
        f"{settings.get('dispatches')} sequential dispatches (+{settings.get('warmup')} "
        f"warm-up), memory at {settings.get('concurrency')} concurrent jobs held "
        f"{settings.get('hold')} s, max-jobs ramp +{settings.get('ramp_step')} up to "
        f"{settings.get('max_jobs_cap')} ({settings.get('visible_timeout')} s per agent)."
    )


def _problems(workload: str, runs: dict[str, Any]) -> list[str]:
    problems = []
    for label in COLUMNS:
        run = runs.get(label)
        if run is None:
            continue
        where = f"{workload} {label}"
        if not run.get("ok"):
            lines = str(run.get("error") or "").strip().splitlines() or [""]
            error = lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "")
            problems.append(f"- {where}: failed: {error}")
        stop = (run.get("max_jobs") or {}).get("stop_reason")
        if stop and stop != "cap reached":
            problems.append(f"- {where}: max-jobs ramp stopped: {stop}")
        timeouts = (run.get("latency") or {}).get("timeouts")
        if timeouts:
            problems.append(f"- {where}: {timeouts} dispatches never became visible")
        problems += [f"- {where}: {note}" for note in run.get("notes") or []]
    # Only the variants this workload ran (media runs warm alone by default).
    ran = {label.rsplit("-", 1)[-1] for label in runs}
    skipped = [c for c in COLUMNS if c not in runs and c.rsplit("-", 1)[-1] in ran]
    if skipped:
        problems.append(f"- {workload}: not run: {', '.join(skipped)}")
    return problems


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    settings = meta.get("settings", {})
    parts = workloads(results)
    out = [
        f"# lkrun vs livekit-agents {meta.get('livekit_agents_version', '?')}, "
        f"{meta.get('started', '')}",
        "",
        f"Machine: {meta.get('cpus', '?')} CPUs, {meta.get('memory_gib', '?')} GiB; "
        f"livekit-server {meta.get('livekit_server_version', '?')} (dev mode, loopback); "
        f"lkrun {meta.get('lkrun_version', '?')}; Python {meta.get('python', '?')}. "
        f"Warm = {settings.get('idle')} prewarmed processes "
        "(lkrun `idle_processes`, official `num_idle_processes`); cold = 0.",
        "",
        "Ratios are lkrun / official: below 1 means lkrun is lower (faster, smaller), "
        "which is better for every row but the last (max jobs, where higher is better). "
        "Absolute times drift on a shared 2-core machine; compare within one run.",
    ]
    if meta.get("command"):  # runs before the field existed do not name theirs
        out += ["", f"Command (from the repository's root, in its venv): `{meta['command']}`"]
    problems: list[str] = []
    for workload, part in parts.items():
        out += [
            "",
            f"## {title(workload)}",
            "",
            DESCRIPTIONS.get(workload, ""),
            _settings_line(part.get("settings", {}), workload),
            "",
            table(results, workload),
        ]
        if workload == "agents":
            out += ["", "Goals for this workload (from the issue), from the table above:", ""]
            out.append(goals(results, workload))
        if workload == "media":
            out += ["", "Goals for this workload (from the issue), from the table above:", ""]
            out.append(media_goals(results, workload))
        problems += _problems(workload, part.get("runs", {}))
    out += ["", *_how_to_read(settings)]
    if problems:
        out += ["", "## Run notes", "", *problems]
    return "\n".join(out) + "\n"


def _how_to_read(settings: dict[str, Any]) -> list[str]:
    return [
        "## How to read it",
        "",
        "- **dispatch → visible**: from just before CreateDispatch to `participant_connected` "
        "at an observer already in the room. livekit-server may batch the join of a "
        "participant that publishes nothing and send it to others on its room ticker "
        "(`subscriberUpdateInterval`), so this number can be quantised by the server.",
        "- **dispatch → joined**: the same start, to the agent first listed by "
        "RoomService.ListParticipants (polled every 20 ms): what the agent host controls.",
        "- **offer → entrypoint**: each system's own wall-clock stamps. Official worker (both "
        "workloads): `RunningJobInfo.received_at` (stamped by the worker in "
        "`_handle_availability`, handed to the job process) to `time.time()` at the start of "
        "the entrypoint, written to `events.jsonl` by the entrypoint. lkrun, `join`: "
        "`offered_at` (AvailabilityRequest received) to `started_at` (entrypoint called) from "
        "`lkrun jobs ls --json --all`. lkrun, `agents`: the same entrypoint event as the "
        "official worker's, where `RunningJobInfo.received_at` is the daemon's `offered_at` "
        "(falling back to `jobs ls` if it were 0); the `jobs ls` number is the row "
        "*offer → started, lkrun's jobs ls*.",
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
        '- Limits: lkrun `max_jobs = 200`, `[daemon] load_threshold = "off"` (the CPU never '
        'makes it full; `agents` also `prewarm_timeout = "120s"`); official '
        "`load_threshold = inf` (never full), "
        "`initialize_process_timeout = 120`, and "
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
