"""A/B of the head start a waiting job process takes (head-start-ab.patch, LKRUN_E_AB=1):
each job process draws lots once it has loaded: B keeps the job context it built while
waiting and reads the job from the start's protobuf bytes; A drops that context and
parses the job's JSON, as lkrun did before. One run, so the machine's noise falls on both.

    python ab_idle.py TRACE.jsonl EVENTS.jsonl

TRACE (LKRUN_E_TRACE): one ``c.A`` or ``c.B`` mark per job process (by pid).
EVENTS: the bench's events.jsonl (tests/bench/lka_agent.py; ``received_at`` is the
daemon's offered_at, ``assigned_at`` the assignment in the daemon, ``launched_at`` the
child's RunningJobInfo, ``entrypoint_at``). The first job is a warm-up and left out.
Standard library only.
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
    lots = {m["pid"]: m["m"] for m in map(json.loads, Path(trace_path).read_text().splitlines())}
    events = [json.loads(line) for line in Path(events_path).read_text().splitlines()]
    entries = [e for e in events if e["event"] == "entrypoint" and e.get("received_at")]
    entries = sorted(entries, key=lambda e: e["received_at"])[1:]
    groups = {
        "A (as before)": [e for e in entries if lots.get(e["pid"]) == "c.A"],
        "B (head start)": [e for e in entries if lots.get(e["pid"]) == "c.B"],
    }

    def ms(e: dict, a: str, b: str) -> float:
        return (e[b] - e[a]) * 1000

    total = {n: [ms(e, "received_at", "entrypoint_at") for e in g] for n, g in groups.items()}
    for name, v in total.items():
        print(
            f"offer -> entrypoint {name:15} n={len(v):3}  p50 {st.median(v):7.3f} ms  "
            f"p25 {quantile(v, 0.25):7.3f}  p75 {quantile(v, 0.75):7.3f}  "
            f"p95 {quantile(v, 0.95):7.3f}"
        )
    a, b = total["A (as before)"], total["B (head start)"]
    print(f"p50 B - A: {st.median(b) - st.median(a):+.3f} ms")
    random.seed(1)
    diffs = sorted(
        st.median(random.choices(b, k=len(b))) - st.median(random.choices(a, k=len(a)))
        for _ in range(2000)
    )
    low, high = diffs[50], diffs[1949]
    print(f"noise: bootstrap 95% interval of p50(B) - p50(A): [{low:+.3f}, {high:+.3f}] ms")
    half = len(a) // 2
    print(
        f"noise: p50 of A over the run's first half {st.median(a[:half]):.3f} ms, "
        f"second half {st.median(a[half:]):.3f} ms"
    )
    for label, x, y in (
        ("offer -> assigned", "received_at", "assigned_at"),
        ("assigned -> entrypoint", "assigned_at", "entrypoint_at"),
        ("assigned -> launched", "assigned_at", "launched_at"),
        ("launched -> entrypoint", "launched_at", "entrypoint_at"),
    ):
        da = [ms(e, x, y) for e in groups["A (as before)"]]
        db = [ms(e, x, y) for e in groups["B (head start)"]]
        print(
            f"{label:24} A p50 {st.median(da):7.3f}  B p50 {st.median(db):7.3f}  "
            f"B - A {st.median(db) - st.median(da):+.3f} ms"
        )


if __name__ == "__main__":
    main(*sys.argv[1:3])
