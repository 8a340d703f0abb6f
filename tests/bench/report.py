"""results.md from results.json: per workload, one row per metric, one column per system and
variant; for the agents, media and venv workloads, the issues' goals next to their tables."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

COLUMNS = ("lkrun-cold", "lkrun-warm", "official-cold", "official-warm")
# (variant, numerator, denominator) of each ratio column.
RATIOS = (("cold", "lkrun-cold", "official-cold"), ("warm", "lkrun-warm", "official-warm"))
# The workloads that compare lkrun with itself (issue 18): the reference system, the one
# compared with it, the ratio's name (compared / reference) and the columns' names.
PAIRS: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "venv": (
        "lkrun",
        "lkrun-venv",
        "own venv/daemon's",
        {"lkrun": "daemon's env", "lkrun-venv": "own venv"},
    ),
    "node": ("lkrun", "node", "Node/Python", {"lkrun": "Python echo", "node": "Node echo"}),
}
# Issue 18: an agent on its own interpreter stays within 10 % of the same agent on the
# daemon's (offer -> entrypoint, PSS per job): own venv / daemon's env <= 1.10.
VENV_GOAL = 1.10
TITLES = {
    "join": "Workload `join`: join the room and stay",
    "agents": "Workload `agents`: the same livekit-agents AgentSession on both hosts",
    "media": "Workload `media`: a level meter per room on a 48 kHz tone",
    "venv": "Workload `venv`: the same AgentSession on the daemon's interpreter and on its own",
    "node": "Workload `node`: the Node echo next to the Python echo",
    "recovery": "Workload `recovery`: a job's SIGKILL to its replacement agent in the room",
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
    "(paced in real time, from `tests/bench/tones.py` in processes of their own, up to 10 "
    "rooms each; the frame size is under this paragraph) and one meter job: lkrun runs its example "
    "`lkrun/examples/level_meter.py` (lkrun's `JobContext`), the official worker the same "
    "meter written against `livekit.agents.JobContext` (`tests/bench/lka_meter.py`); both "
    "publish every microphone's RMS/peak dBFS 4 times a second on data topic `levels`. "
    "CPU is over the hold window, once every meter reports the tone; 100 % is one core. "
    "A job **fell behind** if its observer got < 90 % of the reports due, two reports "
    "more than 0.75 s apart, or the audio it reports having metered grew by < 90 % of "
    "what its observer sent. The observers' CPU is the load, counted against neither "
    "system; they join, and the meters are dispatched, before the tones start.",
    "venv": "lkrun alone, twice: `tests/bench/lka_agent.py` (the `agents` workload's "
    "AgentSession) on the daemon's interpreter, and the same agent with the manifest's "
    "`python` set to another virtualenv's interpreter (the bench venv: livekit-agents and "
    "livekit at the daemon's versions), so only the interpreter differs; lkrun's child "
    "side reaches it as a copy on its PYTHONPATH. Each agent has its own fork server "
    "either way. Ratios are own venv / daemon's env: 1.10 or less meets the issue's goal.",
    "node": "lkrun alone, twice: the Python echo `lkrun/examples/echo.py` (lkrun's "
    "`JobContext`, forked from its agent's fork server, or a warm process) and the Node "
    "echo `examples/node/echo/echo.mjs` on `@livekit/rtc-node`, a `command` agent (a new "
    "`node` process per job, or a warm one started ahead: no fork server). Both join the "
    "room, set an attribute (so the server announces them at once) and echo data. "
    "**offer → entrypoint** is `offered_at` → `started_at` of `lkrun jobs ls --json "
    "--all` for both: the daemon's receipt of the offer to the time stamped in the job's "
    "`running` message (Python: the entrypoint called; Node: the start message handled). "
    "Ratios are Node / Python.",
    "recovery": "Each kill is a fresh call: an observer (`rtc.Room`) in a new room, one "
    "dispatch of the `join` workload's agent (lkrun: `tests/bench/agents.py` with "
    '`on_failure = "redispatch"`; official: the entrypoint of '
    "`tests/bench/official_worker.py`), warm; once the agent is in and its job runs, the "
    "bench SIGKILLs the job's process. **kill → replacement visible**: from just before "
    "the kill to the observer's `participant_connected` of an agent participant carrying "
    "`lkrun.recovered_from`. The official worker does not bring a killed job's agent back "
    "(LiveKit does not reassign jobs either): it gets a few kills, each watched for any new "
    "agent, and reads *never* when none came. The stage rows split lkrun's time by its own "
    "records of both jobs (`lkrun jobs ls --json --all`, the same clock): the daemon "
    "seeing the exit, the redispatch until LiveKit's offer of the new job (the decision, "
    "RoomService ListParticipants, CreateDispatch, LiveKit's routing), the warm process "
    "starting the job, and the join until the observer hears of it.",
}
# Issue 19: a killed job's replacement in the room within 1.5 s, p95, warm.
RECOVERY_GOAL_MS = 1500.0
RECOVERY_COLUMNS = ("lkrun-warm", "official-warm")
RECOVERY_STAGES = (
    ("kill → the daemon records the failure", "kill_to_failed_ms"),
    ("failure → replacement offered (redispatch, LiveKit)", "failed_to_offer_ms"),
    ("offer → replacement's entrypoint", "offer_to_started_ms"),
    ("entrypoint → visible to observer", "started_to_visible_ms"),
)
PSS_GOAL_JOBS = 50
BREAKDOWN_NOTE = (
    "Each job's process tree by mapping kind from `/proc/PID/smaps` "
    "(`python -m tests.bench.memmap PID --tree`; the kinds are in `lkrun/memory_map.py`), "
    "the mean over the first few jobs at the highest memory level, in MB (MiB). "
    "**PSS** splits pages shared with the fork server and the other jobs among them; "
    "**Priv dirty** is what the job alone wrote: copied on write since the fork, or new. "
    "Threads are counted by name (`/proc/PID/task/*/comm`) in every job at that level."
)
MEDIA_GOAL_ROOMS = 50
# Issue 20's goals from the ramps to the limit (tests/bench/limit.py): lkrun / official.
MAX_JOBS_GOAL = 2.0
MEDIA_ROOMS_GOAL = 1.5
MAX_JOBS_ROW = "max concurrent jobs held"
MAX_JOBS_ROWS = {"agents": "max concurrent AgentSession jobs held"}
MEDIA_ROOMS_ROW = "media rooms held with no job behind"

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


def _stopped(key: str) -> Getter:
    """What ended a ramp: "the real limit: ..." or "capped: ..." (limit.verdict_text)."""

    def get(run: dict[str, Any]) -> Any:
        part = run.get(key)
        return limit_text(part) if part else None

    return get


def _held_step(key: str, field: str) -> Getter:
    """A figure of the last ramp step that held (every meter on time)."""

    def get(run: dict[str, Any]) -> Any:
        part = run.get(key) or {}
        held = [s for s in part.get("steps") or [] if s.get("target") == part.get("held")]
        return held[-1].get(field) if held else None

    return get


def limit_text(part: dict[str, Any]) -> str:
    """One cell for a ramp's end (as tests.bench.limit.verdict_text, without importing it:
    this module reads results.json alone)."""
    if "limit_found" not in part:  # a run from before issue 20's ramp
        reason = str(part.get("stop_reason", ""))
        return "capped" if reason == "cap reached" else "stopped: " + reason[:60]
    if part["limit_found"]:
        at = part.get("stop_step")
        return f"the real limit: {part.get('stopped_by_text')}" + (f" at {at}" if at else "")
    return f"capped: {part.get('stopped_by_text')}"


def _found(run: dict[str, Any] | None, key: str) -> bool | None:
    """Whether a run's ramp found the host's limit; None: no ramp."""
    part = (run or {}).get(key)
    if not part:
        return None
    if "limit_found" not in part:  # before issue 20: every stop but the cap was a limit
        return part.get("stop_reason") != "cap reached"
    return bool(part["limit_found"])


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
        # Issue 20: the rooms ramp (--ramp-to-limit), tests/bench/limit.py.
        (MEDIA_ROOMS_ROW, _path("media_rooms", "held")),
        ("media rooms ramp: what stopped it", _stopped("media_rooms")),
        (
            "media rooms ramp: observers CPU at the last step held (%)",
            _held_step("media_rooms", "observers_cpu_percent"),
        ),
        (
            "media rooms ramp: CPU per job at the last step held (%)",
            _held_step("media_rooms", "job_cpu_percent"),
        ),
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


def columns(workload: str) -> tuple[str, ...]:
    """The run labels a workload's table shows, in order."""
    if workload in PAIRS:
        base, other = PAIRS[workload][:2]
        return (f"{base}-cold", f"{base}-warm", f"{other}-cold", f"{other}-warm")
    return COLUMNS


def ratios(workload: str) -> tuple[tuple[str, str, str], ...]:
    """(variant, numerator, denominator) of a workload's ratio columns."""
    if workload in PAIRS:
        base, other = PAIRS[workload][:2]
        return tuple((v, f"{other}-{v}", f"{base}-{v}") for v in ("cold", "warm"))
    return RATIOS


def ratio_name(workload: str) -> str:
    return PAIRS[workload][2] if workload in PAIRS else "lkrun/official"


def column_name(workload: str, label: str) -> str:
    """A run label as its table's header says it (e.g. node's lkrun-cold: Python echo cold)."""
    if workload not in PAIRS:
        return label
    system, variant = label.rsplit("-", 1)
    return f"{PAIRS[workload][3].get(system, system)} {variant}"


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
            # Resident memory, as the job records' memory_mb counts it.
            (f"@{count} jobs: RSS per job (MB)", _at(count, "job_rss_mb")),
            (f"@{count} jobs: PSS of everything / jobs (MB)", _per_job_total(count)),
            (f"@{count} jobs: main process RSS (MB)", _at(count, "main_rss_mb")),
            (f"@{count} jobs: main process PSS (MB)", _at(count, "main_pss_mb")),
            (f"@{count} jobs: main process CPU over hold (%)", _at(count, "main_cpu_percent")),
            (f"@{count} jobs: all job processes CPU (%)", _at(count, "jobs_cpu_percent")),
            (f"@{count} jobs: dispatch → all agents in (s)", _at(count, "all_in_s")),
        ]
    rows.append((MAX_JOBS_ROWS.get(workload, MAX_JOBS_ROW), _path("max_jobs", "held")))
    rows.append(("max jobs ramp: what stopped it", _stopped("max_jobs")))
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
    if workload == "recovery":
        return recovery_table(results)
    part = workloads(results).get(workload, {})
    runs = part.get("runs", {})
    shown, pairs = columns(workload), ratios(workload)
    header = [
        "metric",
        *(column_name(workload, c) for c in shown),
        *(f"{ratio_name(workload)} {name}" for name, _, _ in pairs),
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for label, get in metric_rows(part.get("settings", {}), workload):
        if workload not in PAIRS and "RSS per job" in label:
            continue  # the lkrun-vs-official tables as they were
        values = {col: get(runs[col]) if col in runs else None for col in shown}
        if all(v is None for v in values.values()):
            continue
        ramp = _RAMP_ROWS.get(label)
        if ramp:
            # The ramps (issue 20): whether each figure is the host's limit or a bound's.
            found = {c: _found(runs.get(c), ramp) for c in shown}
            label = _limit_label(label, [f for f in found.values() if f is not None])
            cells = [label, *(_fmt(values[c]) for c in shown)]
            cells += [_limit_ratio(values[a], values[b], found[a], found[b]) for _, a, b in pairs]
        else:
            cells = [label, *(_fmt(values[c]) for c in shown)]
            cells += [_ratio(values[a], values[b]) for _, a, b in pairs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The ramp rows of the tables: label -> the run's key.
_RAMP_ROWS = {
    MAX_JOBS_ROW: "max_jobs",
    **{label: "max_jobs" for label in MAX_JOBS_ROWS.values()},
    MEDIA_ROOMS_ROW: "media_rooms",
}


def _limit_label(label: str, found: list[bool]) -> str:
    """The ramp row's label: "(the real limit)" when every host's ramp found its limit."""
    if not found:
        return label
    if all(found):
        return f"{label} (the real limit)"
    return f"{label} (capped: not every host reached its limit)"


def _limit_ratio(a: Any, b: Any, a_found: bool | None, b_found: bool | None) -> str:
    """lkrun/official of two ramps' counts: a bound (≥, ≤) where one of them was capped."""
    ratio = _ratio(a, b)
    if ratio == "-" or a_found is None or b_found is None or (a_found and b_found):
        return ratio
    if not a_found and not b_found:
        return f"{ratio} (both capped)"
    return f"≥ {ratio}" if not a_found else f"≤ {ratio}"


def _recovered(run: dict[str, Any]) -> tuple[int, int]:
    part = run.get("recovery") or {}
    return int(part.get("recovered") or 0), int(part.get("kills") or 0)


def _recovery_cell(run: dict[str, Any] | None, get: Getter, *, never: bool) -> str:
    """A time; with ``never``, "never" for a system that brought no agent back after any
    kill (the stage rows come from lkrun's own records: "-" there)."""
    if run is None:
        return "-"
    recovered, kills = _recovered(run)
    if kills and not recovered:
        return "never" if never else "-"
    return _fmt(get(run))


def recovery_table(results: dict[str, Any]) -> str:
    """lkrun against the official worker after a job's SIGKILL: times, or "never"."""
    runs = workloads(results).get("recovery", {}).get("runs", {})
    lines = [
        "| metric | " + " | ".join(RECOVERY_COLUMNS) + " |",
        "|---|" + "---:|" * len(RECOVERY_COLUMNS),
    ]
    rows: list[tuple[str, Getter, bool]] = []
    for name, key in (
        ("kill → replacement visible to observer", "kill_to_visible_ms"),
        ("kill → replacement joined (ListParticipants)", "kill_to_joined_ms"),
    ):
        rows += [
            (f"{name} {stat} (ms)", _path("recovery", key, stat), True)
            for stat in ("p50", "p95", "max")
        ]
    rows += [
        (f"{name} p50 (ms)", _path("recovery", "stages", key, "p50"), False)
        for name, key in RECOVERY_STAGES
    ]
    for label, get, never in rows:
        cells = [_recovery_cell(runs.get(c), get, never=never) for c in RECOVERY_COLUMNS]
        if all(c == "-" for c in cells):
            continue
        lines.append("| " + " | ".join([label, *cells]) + " |")
    counts = []
    for column in RECOVERY_COLUMNS:
        run = runs.get(column)
        if run is None or not _recovered(run)[1]:
            counts.append("-")
            continue
        recovered, kills = _recovered(run)
        wait = (run.get("recovery") or {}).get("wait_s")
        counts.append(f"{recovered} of {kills}" + (f" (within {wait:g} s)" if wait else ""))
    if any(c != "-" for c in counts):
        lines.append("| " + " | ".join(["kills whose call got an agent back", *counts]) + " |")
    return "\n".join(lines)


def recovery_goals(results: dict[str, Any]) -> str:
    """Issue 19's goal: kill -> replacement visible, p95 warm, under 1.5 s."""
    run = workloads(results).get("recovery", {}).get("runs", {}).get("lkrun-warm")
    p95 = _path("recovery", "kill_to_visible_ms", "p95")(run) if run else None
    recovered, kills = _recovered(run) if run else (0, 0)
    if not isinstance(p95, (int, float)):
        verdict = "-"
    else:
        met = p95 < RECOVERY_GOAL_MS and recovered == kills
        verdict = f"{_fmt(p95)} ms ({recovered} of {kills}): {'met' if met else 'missed'}"
    return "\n".join(
        [
            "| goal (issue 19) | target | lkrun warm |",
            "|---|---|---:|",
            f"| kill → replacement visible p95 | < {RECOVERY_GOAL_MS:,.0f} ms, every call "
            f"back | {verdict} |",
        ]
    )


def _goal_cell(lkrun: Any, official: Any, target: float | None) -> str:
    """lkrun/official with "met"/"missed" against ``target`` (None: at least 1.0 of it)."""
    ratio = _ratio(lkrun, official)
    if ratio == "-":
        return "-"
    if target is None:
        met = lkrun >= official
        return f"{_fmt(lkrun)} vs {_fmt(official)}: {'met' if met else 'missed'}"
    return f"{ratio}: {'met' if lkrun / official <= target else 'missed'}"


def _ramp_goal(runs: dict[str, Any], name: str, key: str, factor: float) -> str:
    """A goal row "lkrun ≥ factor x official" for a ramp's count, per variant; met or
    missed only where both ramps found their host's limit (else what the bound says)."""
    cells = [name, f"lkrun ≥ {factor:g} x official, the real limit on both"]
    for _, lkrun, official in RATIOS:
        a, b = runs.get(lkrun), runs.get(official)
        x = (a or {}).get(key, {}).get("held") if a else None
        y = (b or {}).get(key, {}).get("held") if b else None
        if not isinstance(x, int) or not isinstance(y, int) or y == 0:
            cells.append("-")
            continue
        ratio = _limit_ratio(x, y, _found(a, key), _found(b, key))
        if _found(a, key) and _found(b, key):
            verdict = "met" if x >= factor * y else "missed"
        elif not _found(a, key) and _found(b, key) and x >= factor * y:
            verdict = "met (lkrun capped)"
        else:
            verdict = "no verdict: capped"
        cells.append(f"{x} vs {y}, {ratio}: {verdict}")
    return "| " + " | ".join(cells) + " |"


def goals(results: dict[str, Any], workload: str = "agents") -> str:
    """The issue's goals for the agents workload, per variant, from this run's numbers."""
    part = workloads(results).get(workload, {})
    runs = part.get("runs", {})
    counts = part.get("settings", {}).get("concurrency") or [PSS_GOAL_JOBS]
    jobs = PSS_GOAL_JOBS if PSS_GOAL_JOBS in counts else max(counts)
    rows = [
        (
            f"PSS per job at {jobs} jobs",
            "lkrun ≤ 0.7 x official (issue 20)",
            _at(jobs, "job_pss_mb"),
            {"cold": 0.7, "warm": 0.7},
        ),
        (
            "offer → entrypoint p50",
            "lkrun ≤ 0.5 x official (warm, before issue 20)",
            _path("latency", "offer_to_entrypoint_ms", "p50"),
            {"warm": 0.5},
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
    lines.append(
        _ramp_goal(runs, MAX_JOBS_ROWS.get(workload, MAX_JOBS_ROW), "max_jobs", MAX_JOBS_GOAL)
    )
    if jobs != PSS_GOAL_JOBS:
        lines.append(
            f"\n(The PSS goal is set at {PSS_GOAL_JOBS} jobs; this run went up to {jobs}.)"
        )
    return "\n".join(lines)


BREAKDOWN_KINDS = ("heap", "arenas", "stacks", "anon", "rtc", "python", "so", "other")
BREAKDOWN_THREAD_NAMES = 8  # the most frequent thread names shown; the rest summed


def _breakdown(run: dict[str, Any] | None) -> tuple[int, dict[str, Any]] | None:
    """The memory level with a smaps breakdown and the most jobs: (jobs, breakdown)."""
    levels = [
        (level.get("jobs", 0), level["breakdown"])
        for level in (run or {}).get("memory") or []
        if (level.get("breakdown") or {}).get("jobs_sampled")
    ]
    return max(levels, key=lambda item: item[0]) if levels else None


def _mb(kb: Any) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


def breakdown_table(results: dict[str, Any], workload: str = "agents") -> str:
    """Where a job's memory goes, both hosts side by side: per mapping kind (the mean of a
    few jobs' process trees, ``tests.bench.memmap``), PSS and Private_Dirty in MB, at the
    highest memory level measured, then the threads per job by name. Warm runs if there
    are any, else cold. Empty if no run has a breakdown."""
    runs = workloads(results).get(workload, {}).get("runs", {})
    variant = "warm" if any(f"{s}-warm" in runs for s in ("lkrun", "official")) else "cold"
    hosts = [(s, _breakdown(runs.get(f"{s}-{variant}"))) for s in ("lkrun", "official")]
    if all(found is None for _, found in hosts):
        return ""
    header = ["kind"]
    for system, found in hosts:
        at = f"@{found[0]}, {found[1]['jobs_sampled']} jobs" if found else "not measured"
        header += [f"{system} PSS ({at})", f"{system} Priv dirty"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for kind in (*BREAKDOWN_KINDS, "total"):
        cells = [f"**{kind}**" if kind == "total" else kind]
        for _, found in hosts:
            row = None
            if found:
                row = found[1]["total"] if kind == "total" else found[1]["kinds"].get(kind)
            cells += [_mb((row or {}).get("Pss")), _mb((row or {}).get("Private_Dirty"))]
        lines.append("| " + " | ".join(cells) + " |")
    names: dict[str, list[float]] = {}
    for i, (_, found) in enumerate(hosts):
        per_name = found[1].get("thread_names_per_job", {}) if found else {}
        for name, counts in per_name.items():
            names.setdefault(name, [0.0, 0.0])[i] = counts["mean"]
    ordered = sorted(names, key=lambda n: (-max(names[n]), n))
    shown, rest = ordered[:BREAKDOWN_THREAD_NAMES], ordered[BREAKDOWN_THREAD_NAMES:]
    threads = [f"{system} ({_threads_at(found)})" for system, found in hosts]
    lines += [
        "",
        "| threads per job, by name (mean over the jobs) | " + " | ".join(threads) + " |",
        "|---|" + "---:|" * len(hosts),
    ]
    total = [(found[1].get("threads_per_job") or {}) if found else {} for _, found in hosts]
    lines.append(
        "| **all threads** (min-max) | "
        + " | ".join(
            f"{_fmt(t.get('mean'))} ({_fmt(t.get('min'))}-{_fmt(t.get('max'))})" if t else "-"
            for t in total
        )
        + " |"
    )
    for name in shown:
        lines.append(f"| `{name}` | " + " | ".join(_fmt(v) for v in names[name]) + " |")
    if rest:
        others = [sum(names[n][i] for n in rest) for i in range(len(hosts))]
        lines.append(f"| {len(rest)} other names | " + " | ".join(_fmt(v) for v in others) + " |")
    return "\n".join(lines)


def _threads_at(found: tuple[int, dict[str, Any]] | None) -> str:
    return f"@{found[0]}, {found[1].get('thread_jobs', 0)} jobs" if found else "not measured"


def venv_goals(results: dict[str, Any], workload: str = "venv") -> str:
    """Issue 18's goal: an agent on its own interpreter within 10 % of the same agent on the
    daemon's, for offer -> entrypoint p50 and PSS per job at each count, cold and warm."""
    part = workloads(results).get(workload, {})
    runs = part.get("runs", {})
    rows: list[tuple[str, Getter]] = [
        ("offer → entrypoint p50", _path("latency", "offer_to_entrypoint_ms", "p50"))
    ]
    for count in part.get("settings", {}).get("concurrency") or []:
        rows.append((f"PSS per job at {count} jobs", _at(count, "job_pss_mb")))
    target = f"own venv ≤ {VENV_GOAL:.2f} x daemon's env"
    lines = [
        "| goal (issue 18) | target | cold: own venv/daemon's | warm: own venv/daemon's |",
        "|---|---|---:|---:|",
    ]
    for name, get in rows:
        cells = [name, target]
        for _, mine, reference in ratios(workload):
            a = get(runs[mine]) if mine in runs else None
            b = get(runs[reference]) if reference in runs else None
            cells.append(_goal_cell(a, b, VENV_GOAL))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def media_goals(results: dict[str, Any], workload: str = "media") -> str:
    """The issue's goals for the media workload, per variant run."""
    part = workloads(results).get(workload, {})
    runs = part.get("runs", {})
    lines = [
        "| goal (from the issue) | target | cold | warm |",
        "|---|---|---:|---:|",
    ]
    if any(run.get("media_rooms") for run in runs.values()):
        # Issue 20: the rooms ramp, the ratio this machine can measure.
        lines.append(_ramp_goal(runs, MEDIA_ROOMS_ROW, "media_rooms", MEDIA_ROOMS_GOAL))
    if not any(run.get("media") for run in runs.values()):
        return "\n".join(lines)  # no fixed levels (--ramp-to-limit alone)
    counts = part.get("settings", {}).get("concurrency") or [MEDIA_GOAL_ROOMS]
    rooms = MEDIA_GOAL_ROOMS if MEDIA_GOAL_ROOMS in counts else max(counts)
    behind = _media_at(rooms, "jobs_behind")
    cpu = _media_at(rooms, "job_cpu_percent")
    sampled = _media_at(rooms, "jobs_sampled")
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
    if workload == "recovery":
        return (
            f"{settings.get('dispatches')} kills (official: at most 3), one after the other, "
            f"each in a fresh room; a replacement counts within {settings.get('recovery_wait')} "
            "s of its kill."
        )
    if workload == "media":
        frames = f"tone frames of {settings.get('tone_frame_ms', 10)} ms"
        fixed = (
            f"Rooms: {settings.get('concurrency')}, each held {settings.get('hold')} s "
            f"after every meter reported the tone (+3 s warm-in); {frames}."
        )
        if not settings.get("max_jobs_cap"):
            return fixed
        rooms = (
            f"Rooms ramp: +{settings.get('ramp_step')} rooms a step (one observer process "
            f"each), every room held and playing, {settings.get('hold')} s per step over all "
            f"of them, {_ramp_bounds(settings, 'rooms')}; {frames}."
        )
        return f"{fixed} {rooms}" if settings.get("concurrency") else rooms
    ramp = (
        f"max-jobs ramp +{settings.get('ramp_step')} "
        + (
            f"to the host's limit ({_ramp_bounds(settings, 'jobs')})"
            if settings.get("ramp_to_limit")
            else f"up to {settings.get('max_jobs_cap')}"
        )
        + f", {settings.get('visible_timeout')} s per agent"
        if settings.get("max_jobs_cap")
        else "no max-jobs ramp"
    )
    memory = (
        f"memory at {settings.get('concurrency')} concurrent jobs held {settings.get('hold')} s"
        if settings.get("concurrency")
        else "no memory levels"
    )
    return (
        f"{settings.get('dispatches')} sequential dispatches (+{settings.get('warmup')} "
        f"warm-up), {memory}, {ramp}."
    )


def _ramp_bounds(settings: dict[str, Any], unit: str) -> str:
    return (
        f"safety bounds: {settings.get('max_jobs_cap')} {unit}, 10 % of the machine's memory "
        f"left, {settings.get('ramp_timeout', 600):g} s per host"
    )


def ramp_table(results: dict[str, Any], workload: str) -> str:
    """Where each host's ramp stopped (issue 20): the count held, what stopped it at which
    step, and the host's CPU and memory at that step. Empty without a ramp."""
    runs = workloads(results).get(workload, {}).get("runs", {})
    key = "media_rooms" if workload == "media" else "max_jobs"
    found = [
        (label, runs[label][key]) for label in columns(workload) if runs.get(label, {}).get(key)
    ]
    if not found:
        return ""
    lines = [
        "| host | held | what stopped it | host CPU (%) | machine CPU (%) | observers CPU (%) "
        "| host PSS (MB) | host threads | machine memory available (MB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, part in found:
        at = part.get("at_stop") or {}
        cells = [
            label,
            _fmt(part.get("held")),
            f"{limit_text(part)}: {str(part.get('stop_reason', ''))[:240]}".replace("|", "/"),
            *(
                _fmt(at.get(name))
                for name in (
                    "host_cpu_percent",
                    "machine_cpu_percent",
                    "observers_cpu_percent",
                    "host_pss_mb",
                    "host_threads",
                    "machine_available_mb",
                )
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RAMP_NOTE = (
    "Each host's ramp (`tests/bench/limit.py`): **the real limit** is the first step where "
    "an agent did not get in within the timeout, a job held from an earlier step dropped "
    "(its agent participant left the room, or its job no longer ran), a job failed, or "
    "(media) a meter fell behind or the observers fell below real time; **capped** is a "
    "safety bound (the ceiling, the machine's memory, the time per host). CPU (100 % is one "
    "core; the machine's: % of all cores) and memory are the host's processes (main and "
    "every descendant) at the step that stopped the ramp."
)


def _problems(workload: str, runs: dict[str, Any]) -> list[str]:
    problems = []
    for label in columns(workload):
        run = runs.get(label)
        if run is None:
            continue
        where = f"{workload} {label}"
        if not run.get("ok"):
            lines = str(run.get("error") or "").strip().splitlines() or [""]
            error = lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "")
            problems.append(f"- {where}: failed: {error}")
        ramp = run.get("max_jobs") or {}
        stop = ramp.get("stop_reason")
        if stop and stop != "cap reached" and "limit_found" not in ramp:  # else: ramp table
            problems.append(f"- {where}: max-jobs ramp stopped: {stop}")
        recovered, kills = _recovered(run)
        if workload == "recovery" and run.get("system") == "lkrun" and recovered < kills:
            problems.append(f"- {where}: {kills - recovered} of {kills} kills got no agent back")
        timeouts = (run.get("latency") or {}).get("timeouts")
        if timeouts:
            problems.append(f"- {where}: {timeouts} dispatches never became visible")
        problems += [f"- {where}: {note}" for note in run.get("notes") or []]
    # Only the variants this workload ran (media runs warm alone by default).
    ran = {label.rsplit("-", 1)[-1] for label in runs}
    skipped = [c for c in columns(workload) if c not in runs and c.rsplit("-", 1)[-1] in ran]
    if skipped:
        problems.append(f"- {workload}: not run: {', '.join(skipped)}")
    return problems


def markdown(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    settings = meta.get("settings", {})
    parts = workloads(results)
    official = any(w not in PAIRS for w in parts) or not parts
    if official:
        heading = f"lkrun vs livekit-agents {meta.get('livekit_agents_version', '?')}"
    else:  # venv and node alone: lkrun against itself
        heading = "lkrun: an agent on its own interpreter, and the Node echo"
    extra = "".join(
        f" {name} {meta[key]}."
        for name, key in (("Second interpreter:", "second_interpreter"), ("Node:", "node"))
        if meta.get(key)
    )
    out = [
        f"# {heading}, {meta.get('started', '')}",
        "",
        f"Machine: {meta.get('cpus', '?')} CPUs, {meta.get('memory_gib', '?')} GiB; "
        f"livekit-server {meta.get('livekit_server_version', '?')} (dev mode, loopback); "
        f"lkrun {meta.get('lkrun_version', '?')}; Python {meta.get('python', '?')}; "
        f"livekit-agents {meta.get('livekit_agents_version', '?')}.{extra} "
        f"Warm = {settings.get('idle')} prewarmed processes "
        "(lkrun `idle_processes`, official `num_idle_processes`); cold = 0.",
        "",
        (
            "Ratios are lkrun / official (venv and node: as their tables say): below 1 "
            "means lkrun is lower (faster, smaller), which is better for every row but "
            "max jobs, where higher is better. "
            if official
            else "Ratios are as each table says (compared / reference): below 1 means "
            "lower (faster, smaller). "
        )
        + "Absolute times drift on a shared 2-core machine; compare within one run.",
    ]
    moments = (("at the start", "load_average_start"), ("at the end", "load_average_end"))
    load = [f"{when} {' / '.join(map(str, meta[key]))}" for when, key in moments if meta.get(key)]
    if load:
        cpus = meta.get("cpus", "?")
        out += [
            "",
            f"Load average (1 / 5 / 15 min, {cpus} CPUs: {cpus} is a busy machine) "
            f"{', '.join(load)}, the bench's own load included.",
        ]
    out += [f"\nNote: {note}" for note in meta.get("notes") or []]
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
            memory = breakdown_table(results, workload)
            if memory:
                out += ["", "### Where a job's memory goes", "", BREAKDOWN_NOTE, "", memory]
        if workload == "media":
            out += ["", "Goals for this workload (from the issue), from the table above:", ""]
            out.append(media_goals(results, workload))
        ramps = ramp_table(results, workload)
        if ramps:
            out += ["", "### Where the ramp stopped", "", RAMP_NOTE, "", ramps]
        if workload == "venv":
            out += ["", "Issue 18's goal for this workload, from the table above:", ""]
            out.append(venv_goals(results, workload))
        if workload == "recovery":
            out += ["", "Issue 19's goal for this workload, from the table above:", ""]
            out.append(recovery_goals(results))
        problems += _problems(workload, part.get("runs", {}))
    out += ["", *_how_to_read(settings, list(parts))]
    if problems:
        out += ["", "## Run notes", "", *problems]
    return "\n".join(out) + "\n"


def _how_to_read(settings: dict[str, Any], ran: list[str] | None = None) -> list[str]:
    extra: list[str] = []
    if "venv" in (ran or []):
        extra.append(
            "- **venv**: offer → entrypoint from the agent's entrypoint events, as in the "
            "`agents` workload (`RunningJobInfo.received_at`, the daemon's `offered_at`, to "
            "the entrypoint's `time.time()`). The goal compares each cell of the own-venv "
            "run with the daemon's-env run of the same variant: own venv / daemon's ≤ "
            f"{VENV_GOAL:.2f} is met. p50s of a few milliseconds (warm) move by more than "
            "10 % between runs on a busy machine: read a miss there with the p95 and the "
            "cold row. At 1 job the own venv's job has about 10 MB more USS (half of it in "
            "PSS): the pages of `liblivekit_ffi.so` the job touches are shared with the "
            "bench's own observers, which run the daemon env's copy of that file, and with "
            "no one on another venv (smaps); with a few jobs they share them among "
            "themselves. In production neither job shares them at 1 job."
        )
    if "node" in (ran or []):
        extra.append(
            "- **node**: the Node echo's warm processes are `node` processes started ahead "
            "(the helpers' PSS, at idle, is the warm pool), the Python echo's are forks of "
            "its fork server. RSS per job counts shared pages in full (what the job "
            "records' `memory_mb` shows); PSS splits them among the processes that map "
            "them."
        )
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
        "the timeout, a held job drops (its agent leaves the room or its job ends), or a job "
        "fails (the host's limit), or a safety bound ends the ramp (capped); the last fully "
        "held count. **media rooms held with no job behind**: the same with a tone observer "
        "and a meter per room, until a meter falls behind.",
        "- Limits: lkrun `max_jobs = 200` (with `--ramp-to-limit`: the ramp's ceiling, so "
        "that it never ends the ramp; the official worker's load is shaped by the same "
        'number), `[daemon] load_threshold = "off"` (the CPU never '
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
        *extra,
    ]
