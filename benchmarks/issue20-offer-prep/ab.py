"""A/B of offer-time preparation within one run: the daemon of ab-experiment.patch, with
LKRUN_E_AB=1, prepares every second accepted offer (B) and not the others (A), so the
machine's noise falls on both alike.

    python ab.py TRACE.jsonl EVENTS.jsonl

TRACE (LKRUN_E_TRACE): ``d.prepared`` names the jobs that got a prepare; ``c.used`` those
whose start found their prepared context; ``c.parsed_match`` those whose assigned job
differed from the offered one only in its ``state``. EVENTS: the bench's events.jsonl
(``received_at``: the daemon's offered_at; ``assigned_at``: the assignment in the daemon;
``launched_at``: the child's RunningJobInfo, made once the start is read and its job
parsed; ``entrypoint_at``). The first job is a warm-up and left out. Standard library only.
"""

import json
import random
import statistics as st
import sys
from pathlib import Path


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(trace_path: str, events_path: str) -> None:
    trace = [json.loads(line) for line in Path(trace_path).read_text().splitlines()]
    events = [json.loads(line) for line in Path(events_path).read_text().splitlines()]
    marked = lambda name: {m["j"] for m in trace if m["m"] == name}  # noqa: E731
    prepared, used, match = marked("d.prepared"), marked("c.used"), marked("c.parsed_match")
    entries = [e for e in events if e["event"] == "entrypoint" and e.get("received_at")]
    entries = sorted(entries, key=lambda e: e["received_at"])[1:]
    groups = {
        "A (no prepare)": [e for e in entries if e["job_id"] not in prepared],
        "B (prepare)": [e for e in entries if e["job_id"] in prepared],
    }
    print(
        f"jobs: {len(entries)}; prepared {len(groups['B (prepare)'])}, of which the start "
        f"used the prepared context {len(used & prepared)}, the offered job parsed at the "
        f"offer {len(match & prepared)}"
    )

    def ms(e: dict, a: str, b: str) -> float:
        return (e[b] - e[a]) * 1000

    a_total = [ms(e, "received_at", "entrypoint_at") for e in groups["A (no prepare)"]]
    b_total = [ms(e, "received_at", "entrypoint_at") for e in groups["B (prepare)"]]
    for name, v in (("A (no prepare)", a_total), ("B (prepare)", b_total)):
        print(
            f"offer -> entrypoint {name:15} n={len(v):3}  p50 {st.median(v):7.3f} ms  "
            f"p25 {quantile(v, 0.25):7.3f}  p75 {quantile(v, 0.75):7.3f}  "
            f"p95 {quantile(v, 0.95):7.3f}"
        )
    print(f"p50 B - A: {st.median(b_total) - st.median(a_total):+.3f} ms")
    random.seed(1)
    diffs = sorted(
        st.median(random.choices(b_total, k=len(b_total)))
        - st.median(random.choices(a_total, k=len(a_total)))
        for _ in range(2000)
    )
    low, high = diffs[50], diffs[1949]
    print(f"noise: bootstrap 95% interval of p50(B) - p50(A): [{low:+.3f}, {high:+.3f}] ms")
    half = len(a_total) // 2
    print(
        f"noise: p50 of A over the run's first half {st.median(a_total[:half]):.3f} ms, "
        f"second half {st.median(a_total[half:]):.3f} ms"
    )
    for label, a, b in (
        ("offer -> assigned", "received_at", "assigned_at"),
        ("assigned -> entrypoint", "assigned_at", "entrypoint_at"),
        ("launched -> entrypoint", "launched_at", "entrypoint_at"),
    ):
        da = [ms(e, a, b) for e in groups["A (no prepare)"]]
        db = [ms(e, a, b) for e in groups["B (prepare)"]]
        print(
            f"{label:24} A p50 {st.median(da):7.3f}  B p50 {st.median(db):7.3f}  "
            f"B - A {st.median(db) - st.median(da):+.3f} ms"
        )


if __name__ == "__main__":
    main(*sys.argv[1:3])
