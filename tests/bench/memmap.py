"""Where one process's memory goes (or one job's process tree's), by mapping kind.

    python -m tests.bench.memmap PID [--tree] [--json]

Reads /proc/PID/smaps (the rules that give each mapping its kind, and the readers, are in
`lkrun/memory_map.py`), the threads' stack pointers from /proc/PID/task/*/syscall where
readable (a descendant of the caller, or the same user without Yama's ptrace scope), and
the threads' names from /proc/PID/task/*/comm. ``--tree`` adds every descendant and sums
per kind. Prints a table in MB (MiB, as the bench does), or with ``--json`` the same
figures in kB (as smaps gives them) with the thread names counted. For a job of a running
lkrun daemon, `lkrun jobs show JOB --memory` gives the same (its tree) through the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lkrun import memory_map


def render(data: dict[str, Any]) -> None:
    from rich.console import Console

    from lkrun.cli.common import say
    from lkrun.cli.memory import ALL_COLUMNS, kinds_table, processes_line

    console = Console(width=max(Console().width, 100), highlight=False, emoji=False)
    say(f"memory by mapping kind, MB: {processes_line(data)}", console)
    console.print(kinds_table(data, ALL_COLUMNS, describe=False))
    names = ", ".join(f"{name} {count}" for name, count in data["thread_names"].items())
    say(f"threads: {data['threads']} ({names})", console)
    sps = sum(p["stack_pointers_read"] for p in data["processes"])
    say(
        f"stack pointers read: {sps} of {data['threads']} threads "
        "(stacks without a live thread's pointer are found by their guard page)",
        console,
    )
    for line in data["skipped"]:
        say(f"skipped: {line}", console)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.memmap", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("pid", type=int)
    parser.add_argument("--tree", action="store_true", help="add its descendants, per kind")
    parser.add_argument("--json", action="store_true", help="print JSON (kB) instead")
    args = parser.parse_args(argv)
    try:
        data = memory_map.report(args.pid, tree=args.tree)
    except memory_map.Unreadable as exc:
        print(f"memmap: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        render(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
