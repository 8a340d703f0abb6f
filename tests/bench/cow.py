"""Which of a forked job's pages are still its fork server's, which were copied on write,
and which are new, by mapping kind, from /proc/PID/pagemap.

    python -m tests.bench.cow JOB_PID [--parent PID] [--json]

smaps says how much of a mapping is private, not whether a private page was the fork
server's page copied when the job wrote to it, or memory the job allocated itself. The
pagemap says: it gives each present page's physical frame (PFN; readable as root, else
zero) and whether the page is mapped once only ("exclusive", bit 56). A job's page is

- ``shared``: the fork server maps the same frame at the same address (never written by
  either since the fork);
- ``copied``: the fork server has a page at that address, another frame, and the job's
  is its own: copied on write (by a reference count, a gc header, an inline cache...);
- ``new``: the fork server maps the address but has no page there (heap or arena space
  it never touched): memory the job allocated in inherited address space;
- ``new_range``: the fork server does not map the address at all (a mapping made after
  the fork: new pymalloc arenas, thread stacks and arenas, the rtc runtime's buffers);
- ``other_shared``: neither the fork server's frame nor the job's alone (a page the fork
  server wrote after the fork while jobs kept the old one, or the zero page).

``copied + new + new_range`` is what smaps calls Private (private pages, dirty or not).
``pss`` weighs each page by 1/mapcount from /proc/kpagecount when that is readable (root),
so it adds up to smaps' Pss. The parent defaults to the job's parent process (under lkrun,
the agent's fork server). Figures are kB per kind (the kinds of the memory classifier).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:  # the classifier moved into the package (issue 20); older trees kept it here
    from lkrun import memory_map as smaps  # type: ignore[attr-defined,unused-ignore]
except ImportError:  # pragma: no cover - depends on the tree
    from tests.bench import smaps  # type: ignore[no-redef,unused-ignore]

PAGE = 4096
PAGE_KB = PAGE // 1024
ENTRY = 8  # bytes per page in /proc/PID/pagemap and /proc/kpagecount
PFN_MASK = (1 << 55) - 1
EXCLUSIVE = 1 << 56
SWAPPED = 1 << 62
PRESENT = 1 << 63

SHARED = "shared"
COPIED = "copied"
NEW = "new"
NEW_RANGE = "new_range"
OTHER_SHARED = "other_shared"
CATEGORIES = (SHARED, COPIED, NEW, NEW_RANGE, OTHER_SHARED)
PRIVATE = (COPIED, NEW, NEW_RANGE)


@dataclass(frozen=True)
class Page:
    present: bool
    pfn: int  # 0 when not present, or when the reader may not see frames (not root)
    exclusive: bool

    @classmethod
    def decode(cls, entry: int) -> Page:
        present = bool(entry & PRESENT)
        return cls(present, entry & PFN_MASK if present else 0, bool(entry & EXCLUSIVE))


def category(child: int, parent: int, parent_maps: bool) -> str | None:
    """The category of one job page from its pagemap entry and the fork server's at the same
    address (``parent_maps``: whether the fork server maps that address); None when the
    job has no page there."""
    mine = Page.decode(child)
    if not mine.present:
        return None
    theirs = Page.decode(parent)
    if theirs.present and mine.pfn and mine.pfn == theirs.pfn:
        return SHARED
    if not mine.exclusive:
        return OTHER_SHARED
    if theirs.present:
        return COPIED
    return NEW if parent_maps else NEW_RANGE


class Ranges:
    """Address ranges (start, end), sorted: which addresses a process maps."""

    def __init__(self, ranges: Iterable[tuple[int, int]]) -> None:
        self._ranges = sorted(ranges)
        self._starts = [start for start, _ in self._ranges]

    def covers(self, address: int) -> bool:
        i = bisect.bisect_right(self._starts, address) - 1
        return i >= 0 and address < self._ranges[i][1]


Entries = Callable[[int, int], Sequence[int]]  # (start, end) -> one pagemap entry per page


def empty() -> dict[str, float]:
    return {**dict.fromkeys(CATEGORIES, 0.0), "pss": 0.0}


def split(
    mappings: Sequence[smaps.Mapping],
    kinds: Sequence[str],
    child: Entries,
    parent: Entries,
    parent_ranges: Ranges,
    mapcount: Callable[[int], int] | None = None,
    addresses: dict[str, list[int]] | None = None,
) -> dict[str, dict[str, float]]:
    """kB per kind and category (and ``pss``, if ``mapcount`` gives each frame's mapcount).

    ``addresses``, if given, receives each copied and new page's address per category (what
    the probe attributes to objects)."""
    totals = {kind: empty() for kind in smaps.KINDS}
    for m, kind in zip(mappings, kinds, strict=True):
        mine, theirs = child(m.start, m.end), parent(m.start, m.end)
        row = totals.setdefault(kind, empty())
        for n, entry in enumerate(mine):
            address = m.start + n * PAGE
            theirs_entry = theirs[n] if n < len(theirs) else 0
            what = category(entry, theirs_entry, parent_ranges.covers(address))
            if what is None:
                continue
            row[what] += PAGE_KB
            if mapcount is not None:
                count = mapcount(Page.decode(entry).pfn) or 1
                row["pss"] += PAGE_KB / count
            if addresses is not None and what in PRIVATE:
                addresses.setdefault(what, []).append(address)
    return totals


def total(per_kind: dict[str, dict[str, float]]) -> dict[str, float]:
    row = empty()
    for kind_row in per_kind.values():
        for key, value in kind_row.items():
            row[key] += value
    return row


# -- /proc ------------------------------------------------------------------------------


class Unreadable(Exception):
    """The process is gone, or its pagemap is not ours to read."""


def read_entries(pagemap: Any, start: int, end: int) -> list[int]:
    """The pagemap entries of [start, end) from an open pagemap file (binary, unbuffered)."""
    pages = (end - start) // PAGE
    data = b""
    with contextlib.suppress(OSError):  # e.g. [vsyscall]: not readable through pagemap
        data = os.pread(pagemap.fileno(), pages * ENTRY, start // PAGE * ENTRY)
    count = len(data) // ENTRY
    return list(struct.unpack(f"<{count}Q", data[: count * ENTRY])) + [0] * (pages - count)


def parent_of(pid: int, proc: Path = Path("/proc")) -> int:
    for line in (proc / str(pid) / "status").read_text().splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise Unreadable(f"pid {pid}: no PPid in its status")


def mapped_ranges(pid: int, proc: Path = Path("/proc")) -> Ranges:
    ranges = []
    for line in (proc / str(pid) / "maps").read_text().splitlines():
        low, _, high = line.split(" ", 1)[0].partition("-")
        ranges.append((int(low, 16), int(high, 16)))
    return Ranges(ranges)


def measure(
    pid: int,
    parent: int | None = None,
    *,
    proc: Path = Path("/proc"),
    addresses: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """One job process against its fork server: kB per kind and category, and the total."""
    # threads() and image_spans() live beside the classifier once it is in the package.
    if hasattr(smaps, "threads"):
        memmap: Any = smaps
    else:  # pragma: no cover - an older tree
        from tests.bench import memmap

    parent = parent or parent_of(pid, proc)
    try:
        text = (proc / str(pid) / "smaps").read_text()
        exe = os.readlink(proc / str(pid) / "exe")
        parent_ranges = mapped_ranges(parent, proc)
        child_map = open(proc / str(pid) / "pagemap", "rb", buffering=0)  # noqa: SIM115
    except OSError as exc:
        raise Unreadable(f"pid {pid} or its parent {parent}: {exc.strerror or exc}") from exc
    with contextlib.ExitStack() as stack:
        stack.enter_context(child_map)
        try:
            parent_map = stack.enter_context(
                open(proc / str(parent) / "pagemap", "rb", buffering=0)
            )
        except OSError as exc:
            raise Unreadable(f"parent {parent}: {exc.strerror or exc}") from exc
        counts: Any = None
        with contextlib.suppress(OSError):
            counts = stack.enter_context(open(proc / "kpagecount", "rb", buffering=0))
        mappings = smaps.parse(text)
        _, pointers = memmap.threads(pid, proc)
        spans = memmap.image_spans(mappings, proc / str(pid) / "root")
        kinds = smaps.classify(mappings, stack_pointers=pointers, exe=exe, image_spans=spans)

        def mapcount(pfn: int) -> int:
            data = os.pread(counts.fileno(), ENTRY, pfn * ENTRY)
            return struct.unpack("<Q", data)[0] if len(data) == ENTRY else 1

        per_kind = split(
            mappings,
            kinds,
            lambda s, e: read_entries(child_map, s, e),
            lambda s, e: read_entries(parent_map, s, e),
            parent_ranges,
            mapcount if counts is not None else None,
            addresses,
        )
    frames = any(row[SHARED] for row in per_kind.values())
    return {
        "pid": pid,
        "parent": parent,
        "unit": "kB",
        "frames_readable": frames,  # else every page looks unshared: run as root
        "pss_readable": counts is not None,
        "kinds": {k: {c: round(v, 1) for c, v in row.items()} for k, row in per_kind.items()},
        "total": {c: round(v, 1) for c, v in total(per_kind).items()},
    }


def mean(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean per kind and category over several jobs' reports (kB)."""
    kinds: dict[str, dict[str, float]] = {}
    for one in reports:
        for kind, row in one["kinds"].items():
            into = kinds.setdefault(kind, empty())
            for key, value in row.items():
                into[key] += value / len(reports)
    return {
        "jobs": len(reports),
        "unit": "kB",
        "kinds": {k: {c: round(v, 1) for c, v in row.items()} for k, row in kinds.items()},
        "total": {c: round(v, 1) for c, v in total(kinds).items()},
    }


def render(data: dict[str, Any]) -> str:
    header = f"{'kind':<8}" + "".join(f"{c:>14}" for c in (*CATEGORIES, "pss"))
    lines = [f"pid {data['pid']} against its fork server {data['parent']}, MB", header]
    rows = [*data["kinds"].items(), ("total", data["total"])]
    for kind, row in rows:
        if any(row.values()):
            lines.append(
                f"{kind:<8}" + "".join(f"{row[c] / 1024:>14.1f}" for c in (*CATEGORIES, "pss"))
            )
    if not data["frames_readable"]:
        lines.append("no frame numbers readable (not root?): nothing can be told shared")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.cow", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("pid", type=int, help="a job process (forked from a fork server)")
    parser.add_argument("--parent", type=int, help="the fork server [the job's parent]")
    parser.add_argument("--json", action="store_true", help="print JSON (kB) instead")
    args = parser.parse_args(argv)
    try:
        data = measure(args.pid, args.parent)
    except (Unreadable, OSError) as exc:
        print(f"cow: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if args.json else render(data) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
