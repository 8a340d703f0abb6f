"""Where one process's memory goes (or one job's process tree's), by mapping kind.

    python -m tests.bench.memmap PID [--tree] [--json]

Reads /proc/PID/smaps (the rules that give each mapping its kind are in
`lkrun/memory_map.py`), the threads' stack pointers from /proc/PID/task/*/syscall where
readable (a descendant of the caller, or the same user without Yama's ptrace scope), and
the threads' names from /proc/PID/task/*/comm. ``--tree`` adds every descendant and sums
per kind. Prints a table in MB (MiB, as the bench does), or with ``--json`` the same
figures in kB (as smaps gives them) with the thread names counted.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from lkrun import memory_map


class Unreadable(Exception):
    """The process is gone, or its smaps is not ours to read."""


def threads(pid: int, proc: Path = Path("/proc")) -> tuple[Counter[str], list[int]]:
    """Each thread's name (counted) and the stack pointers that could be read."""
    names: Counter[str] = Counter()
    pointers: list[int] = []
    try:
        tids = os.listdir(proc / str(pid) / "task")
    except OSError:
        return names, pointers
    for tid in tids:
        task = proc / str(pid) / "task" / tid
        with contextlib.suppress(OSError):
            names[(task / "comm").read_text().strip()] += 1
        with contextlib.suppress(OSError):
            sp = memory_map.parse_stack_pointer((task / "syscall").read_text())
            if sp:
                pointers.append(sp)
    return names, pointers


def image_spans(mappings: list[memory_map.Mapping], proc_root: Path) -> dict[str, int]:
    """The ELF image span of each file mapping followed directly by an anonymous one (a
    bss candidate), read from the file (through the process's root, so a process in a
    container or whose file was replaced still reads its own)."""
    spans: dict[str, int] = {}
    for before, m in itertools.pairwise(mappings):
        if not (m.anonymous and before.path.startswith("/") and before.end == m.start):
            continue
        if before.path in spans:
            continue
        try:
            with open(f"{proc_root}{before.path}", "rb") as elf:
                span = memory_map.image_span(elf.read(memory_map.PAGE))
        except OSError:
            continue
        if span is not None:
            spans[before.path] = span
    return spans


def measure(pid: int, proc: Path = Path("/proc")) -> dict[str, Any]:
    """One process: its breakdown per kind (kB), thread names, and how stacks were found."""
    try:
        text = (proc / str(pid) / "smaps").read_text()
    except OSError as exc:
        raise Unreadable(f"pid {pid}: {exc.strerror or exc}") from exc
    exe = ""
    with contextlib.suppress(OSError):
        exe = os.readlink(proc / str(pid) / "exe")
    name = ""
    with contextlib.suppress(OSError):
        name = (proc / str(pid) / "comm").read_text().strip()
    names, pointers = threads(pid, proc)
    mappings = memory_map.parse(text)
    spans = image_spans(mappings, proc / str(pid) / "root")
    kinds = memory_map.classify(mappings, stack_pointers=pointers, exe=exe, image_spans=spans)
    return {
        "pid": pid,
        "name": name,
        "kinds": memory_map.breakdown(mappings, kinds),
        "threads": sum(names.values()),
        "thread_names": dict(names.most_common()),
        "stack_pointers_read": len(pointers),
    }


def descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def report(pid: int, *, tree: bool = False) -> dict[str, Any]:
    """The process (and with ``tree`` its descendants): per process and summed per kind."""
    processes = [measure(pid)]
    skipped: list[str] = []
    for child in descendants(pid) if tree else []:
        try:
            processes.append(measure(child))
        except Unreadable as exc:  # ended meanwhile
            skipped.append(str(exc))
    per_kind: dict[str, dict[str, int]] = {}
    names: Counter[str] = Counter()
    for one in processes:
        memory_map.add(per_kind, one["kinds"])
        names.update(one["thread_names"])
    return {
        "pid": pid,
        "tree": tree,
        "unit": "kB",
        "kinds": per_kind,
        "total": memory_map.total(per_kind),
        "threads": sum(one["threads"] for one in processes),
        "thread_names": dict(names.most_common()),
        "processes": [
            {
                "pid": one["pid"],
                "name": one["name"],
                "threads": one["threads"],
                "stack_pointers_read": one["stack_pointers_read"],
                **{key: memory_map.total(one["kinds"])[key] for key in ("Rss", "Pss")},
            }
            for one in processes
        ],
        "skipped": skipped,
    }


COLUMNS = (
    ("Size", "Size"),
    ("Rss", "Rss"),
    ("Pss", "Pss"),
    ("Private", "Private"),
    ("Private_Dirty", "Priv dirty"),
    ("Shared_Dirty", "Shr dirty"),
    ("Shared_Clean", "Shr clean"),
    ("Swap", "Swap"),
)


def _cell(row: dict[str, int], key: str) -> str:
    kb = row["Private_Clean"] + row["Private_Dirty"] if key == "Private" else row[key]
    return f"{kb / 1024:.1f}"


def render(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    pids = ", ".join(f"{p['pid']} {p['name']}" for p in data["processes"])
    title = f"memory by mapping kind, MB: {pids}"
    table = Table(title=title, box=None, pad_edge=False, title_justify="left")
    table.add_column("kind")
    table.add_column("maps", justify="right")
    for _, header in COLUMNS:
        table.add_column(header, justify="right")
    for kind, row in data["kinds"].items():
        if row["mappings"]:
            table.add_row(kind, str(row["mappings"]), *(_cell(row, key) for key, _ in COLUMNS))
    row = data["total"]
    table.add_row(
        "total", str(row["mappings"]), *(_cell(row, key) for key, _ in COLUMNS), style="bold"
    )
    console = Console(width=max(Console().width, 100))
    console.print(table)
    names = ", ".join(f"{name} {count}" for name, count in data["thread_names"].items())
    console.print(f"threads: {data['threads']} ({names})", markup=False, highlight=False)
    sps = sum(p["stack_pointers_read"] for p in data["processes"])
    console.print(
        f"stack pointers read: {sps} of {data['threads']} threads "
        "(stacks without a live thread's pointer are found by their guard page)",
        markup=False,
        highlight=False,
    )
    for line in data["skipped"]:
        console.print(f"skipped: {line}", markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.memmap", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("pid", type=int)
    parser.add_argument("--tree", action="store_true", help="add its descendants, per kind")
    parser.add_argument("--json", action="store_true", help="print JSON (kB) instead")
    args = parser.parse_args(argv)
    try:
        data = report(args.pid, tree=args.tree)
    except Unreadable as exc:
        print(f"memmap: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        render(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
