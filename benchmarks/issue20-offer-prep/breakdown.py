"""Where offer -> entrypoint goes, step by step: p50 of each step over the jobs of one run.

    python breakdown.py TRACE.jsonl EVENTS.jsonl

TRACE: the marks of breakdown-marks.patch (LKRUN_E_TRACE), one JSON line per mark
(``m`` its name, ``j`` the job id, or "" in the child before it knows it, ``t`` wall time,
``pid``). EVENTS: the bench's events.jsonl of that run (tests/bench/lka_agent.py): its
``received_at`` (the daemon's offered_at) and ``entrypoint_at``. The first job is a
warm-up and left out. Standard library only.
"""

import json
import statistics as st
import sys
from pathlib import Path

ORDER = [
    "received_at",
    "d.offer_recv",
    "d.answer_queued",
    "d.assign_recv",
    "d.assign_in",
    "d.pre_book",
    "d.booked",
    "d.claimed",
    "d.start_built",
    "d.run_enter",
    "d.pre_ready",
    "d.ready_ok",
    "d.start_written",
    "c.start_recv",
    "c.run_resume",
    "c.fj_init",
    "c.info",
    "c.new_job",
    "c.running_sent",
    "c.run_in",
    "c.room",
    "c.ctx",
    "c.setup",
    "entrypoint",
]


def main(trace_path: str, events_path: str) -> None:
    trace = [json.loads(line) for line in Path(trace_path).read_text().splitlines()]
    events = [json.loads(line) for line in Path(events_path).read_text().splitlines()]
    job_of_pid = {m["pid"]: m["j"] for m in trace if m["m"] == "c.start_recv"}
    jobs: dict[str, dict[str, float]] = {}
    for m in trace:
        job = m["j"] or job_of_pid.get(m["pid"], "")
        if job:
            jobs.setdefault(job, {})[m["m"]] = m["t"]
    for e in events:
        if e["event"] == "entrypoint":
            d = jobs.setdefault(e["job_id"], {})
            d["received_at"], d["entrypoint"] = e["received_at"], e["entrypoint_at"]
    full = [d for d in jobs.values() if all(k in d for k in ("received_at", "entrypoint"))]
    full = sorted(full, key=lambda d: d["received_at"])[1:]
    print(f"{len(full)} jobs")
    prev, total = ORDER[0], 0.0
    for key in ORDER[1:]:
        steps = [(d[key] - d[prev]) * 1000 for d in full if key in d and prev in d]
        if steps:
            total += st.median(steps)
            print(f"{prev:>16} -> {key:<16} p50 {st.median(steps):7.3f} ms")
            prev = key
    whole = st.median([(d["entrypoint"] - d["received_at"]) * 1000 for d in full])
    print(f"sum of the steps' p50s {total:.3f} ms; p50 of offer -> entrypoint {whole:.3f} ms")


if __name__ == "__main__":
    main(*sys.argv[1:3])
