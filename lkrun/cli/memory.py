"""How `lkrun jobs show --memory` (and `python -m tests.bench.memmap`) print a memory
breakdown (`lkrun.memory_map.report`): a table per mapping kind in MB, a total row, and the
threads counted by name. Process and thread names come from the job (``prctl``, the
runtimes it loads): shown as data, never Rich markup or terminal escapes."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from lkrun import memory_map
from lkrun.cli.common import cell, say

# (key in a breakdown row, header); "Private" is Private_Clean + Private_Dirty (USS).
Column = tuple[str, str]
JOB_COLUMNS: tuple[Column, ...] = (
    ("Pss", "PSS"),
    ("Private_Dirty", "PRIV DIRTY"),
    ("Rss", "RSS"),
)
ALL_COLUMNS: tuple[Column, ...] = (
    ("Size", "Size"),
    ("Rss", "Rss"),
    ("Pss", "Pss"),
    ("Private", "Private"),
    ("Private_Dirty", "Priv dirty"),
    ("Shared_Dirty", "Shr dirty"),
    ("Shared_Clean", "Shr clean"),
    ("Swap", "Swap"),
)


def mb(row: dict[str, int], key: str) -> str:
    """One figure of a breakdown row (kB, as smaps gives them) in MB (MiB)."""
    kb = row["Private_Clean"] + row["Private_Dirty"] if key == "Private" else row[key]
    return f"{kb / 1024:.1f}"


def kinds_table(
    data: dict[str, Any], columns: tuple[Column, ...] = JOB_COLUMNS, *, describe: bool = True
) -> Table:
    """One row per kind that has mappings, in `memory_map.KINDS` order, then the total."""
    table = Table(box=None, pad_edge=False)
    table.add_column("KIND")
    table.add_column("MAPS", justify="right")
    for _, header in columns:
        table.add_column(header, justify="right")
    if describe:
        table.add_column("WHAT", overflow="fold")
    for kind, row in data["kinds"].items():
        if row["mappings"]:
            what = [memory_map.KINDS.get(kind, "")] if describe else []
            cells = (kind, str(row["mappings"]), *(mb(row, key) for key, _ in columns), *what)
            table.add_row(*(cell(value) for value in cells))
    row = data["total"]
    cells = ("total", str(row["mappings"]), *(mb(row, key) for key, _ in columns))
    table.add_row(*(cell(value) for value in cells), *([""] if describe else []), style="bold")
    return table


def threads_table(data: dict[str, Any]) -> Table:
    """The threads by name, most first (``/proc/PID/task/*/comm``)."""
    table = Table(box=None, pad_edge=False)
    table.add_column("THREAD NAME")
    table.add_column("COUNT", justify="right")
    for name, count in data["thread_names"].items():
        table.add_row(cell(name), str(count))
    table.add_row("total", str(data["threads"]), style="bold")
    return table


def processes_line(data: dict[str, Any]) -> str:
    return ", ".join(f"{p['pid']} {p['name']}" for p in data["processes"])


def print_job_memory(data: dict[str, Any], console: Console) -> None:
    """`lkrun jobs show JOB --memory`."""
    count = len(data["processes"])
    say(f"job {data['job_id']}: {count} process(es): {processes_line(data)}", console)
    say("memory by mapping kind (from /proc/PID/smaps), MB (MiB):", console)
    console.print(kinds_table(data))
    console.print()
    say(f"threads: {data['threads']}", console)
    console.print(threads_table(data))
    for line in data.get("skipped") or []:
        say(f"skipped (ended during the read): {line}", console)
