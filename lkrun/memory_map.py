"""Where a process's memory goes: /proc/PID/smaps parsed and each mapping given a kind.

The rules do no I/O: `parse` takes the text of an smaps file, `classify` the parsed
mappings (and, if known, the threads' stack pointers), `breakdown` sums the fields per
kind. The readers at the end (`measure` one process, `report` a process tree,
`BoundedReads` for the daemon's event loop) read /proc; `lkrun jobs show --memory` and
`python -m tests.bench.memmap` print what they return. Every rule is in `KINDS` and
`classify`:

- The name decides first: ``[heap]`` is ``heap``, ``[stack]`` is ``stacks``, other
  ``[...]`` names (vdso, vvar) are ``other``; glibc's own names for anonymous memory
  (tunable ``glibc.mem.decorate_maps``: ``[anon: glibc: malloc arena]``, ``... pthread
  stack: N]``) are taken at their word. A file is ``rtc`` (``liblivekit_ffi*.so``),
  ``python`` (the interpreter binary, ``libpython*``, the stdlib's ``lib-dynload/``,
  mapped ``.py``/``.pyc``), ``so`` (any other shared object, site-packages' extension
  modules included) or ``other`` (locale archive, gconv cache, data files, memfd).
- An anonymous mapping holding a thread's stack pointer is ``stacks``.
- An anonymous read-write mapping that starts on a 64 MiB boundary and either is 64 MiB
  long or is followed by an anonymous PROT_NONE mapping reaching the next boundary is a
  glibc malloc arena heap (``arenas``; the PROT_NONE reserve is counted with it, with Rss
  0). glibc allocates every non-main arena's heap as one HEAP_MAX_SIZE (64 MiB on 64-bit)
  aligned reservation and makes it read-write as it grows. Non-main arenas serve malloc
  calls made on threads other than the main one: the rtc runtime's, libwebrtc's
  (``AsyncResolver``), onnxruntime's.
- An anonymous read-write mapping just above (contiguous with) an anonymous PROT_NONE
  mapping of at most 1 MiB is a thread stack with its guard (``stacks``): glibc's
  pthread_create maps the stack and guard as one mapping and protects the lowest pages.
  Stacks kept in glibc's cache for reuse after their thread ended count too. This
  heuristic needs no permission beyond reading smaps; the stack pointers
  (``/proc/PID/task/TID/syscall``, which needs ptrace access) confirm or add to it.
- An anonymous read-write mapping right after (contiguous with) a file mapping of a
  shared object, ending within the object's memory image (its ELF PT_LOAD segments, from
  `image_span`), is that object's ``.bss`` and takes its kind (``rtc``, ``python``,
  ``so``): liblivekit_ffi.so's bss is about 2.3 MB. Without the object's span (file not
  readable), or when the mapping reaches past it (merged with what came next), it is
  ``anon``.
- Any other anonymous mapping is ``anon``: pymalloc's arenas (most Python objects live
  there, not in [heap]), malloc blocks above the mmap threshold (128 KiB and up),
  reservations of other runtimes.

What it cannot tell: the kernel merges adjacent anonymous mappings with the same
permissions, so an anonymous mapping that happens to start right after a stack, a
library's bss or an arena's heap is counted with it. And for a forked process, smaps says
per mapping how much is still shared (``Shared_*``: inherited pages neither side has
written since the fork, or pages shared with siblings) and how much is private
(``Private_*``: copied on write, or new since the fork), not which private pages were
copies: that needs the fork server's pagemap.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KINDS: dict[str, str] = {
    "heap": "[heap]: the brk heap, glibc's main arena (malloc on the main thread)",
    "arenas": "glibc malloc arenas of other threads (64 MiB-aligned anonymous heaps)",
    "stacks": "[stack] and thread stacks (anonymous, above a guard page, or a thread's SP)",
    "anon": "other anonymous memory: pymalloc arenas (Python objects), large malloc blocks",
    "rtc": "liblivekit_ffi*.so: code, data and its bss",
    "python": "the python binary, libpython, lib-dynload modules, mapped .py/.pyc",
    "so": "other shared objects (extension modules, libc, libssl, ...) and their bss",
    "other": "other files (locale, caches, memfd) and [vdso]/[vvar]",
}

FIELDS = (
    "Size",
    "Rss",
    "Pss",
    "Private_Clean",
    "Private_Dirty",
    "Shared_Clean",
    "Shared_Dirty",
    "Swap",
    "SwapPss",
)

ARENA_SIZE = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit (2 * DEFAULT_MMAP_THRESHOLD_MAX)
GUARD_MAX = 1 << 20  # glibc's default guard is one page; anything up to 1 MiB is a guard

_HEADER = re.compile(
    r"^(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+(?P<perms>\S{4})\s+(?P<offset>[0-9a-f]+)\s+"
    r"(?P<dev>\S+)\s+(?P<inode>\d+)\s*(?P<path>.*)$"
)
_FIELD = re.compile(r"^(?P<key>\w+):\s+(?P<value>\d+) kB$")
_SO = re.compile(r"\.so(\.\d+)*$")
_PYTHON_BINARY = re.compile(r"^python\d*(\.\d+)?$")
_FILE_KINDS = ("rtc", "python", "so")


@dataclass
class Mapping:
    """One line of /proc/PID/maps with its smaps fields (kB)."""

    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str
    fields: dict[str, int] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def anonymous(self) -> bool:
        """No file and no kernel name: a private or shared anonymous mmap."""
        return self.inode == 0 and not self.path

    @property
    def rw(self) -> bool:
        return self.perms.startswith("rw")

    @property
    def prot_none(self) -> bool:
        return self.perms[:3] == "---"


def parse(text: str) -> list[Mapping]:
    """The mappings of an smaps (or smaps-like) text, in file order (by address)."""
    mappings: list[Mapping] = []
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            path = header["path"].strip().removesuffix(" (deleted)")
            mappings.append(
                Mapping(
                    start=int(header["start"], 16),
                    end=int(header["end"], 16),
                    perms=header["perms"],
                    offset=int(header["offset"], 16),
                    inode=int(header["inode"]),
                    path=path,
                )
            )
            continue
        value = _FIELD.match(line)
        if value and mappings:
            mappings[-1].fields[value["key"]] = int(value["value"])
    return mappings


def named_kind(mapping: Mapping, exe: str = "") -> str | None:
    """The kind a mapping's name alone decides, or None for an unnamed anonymous one."""
    path = mapping.path
    if not path:
        return None if mapping.inode == 0 else "other"
    if path.startswith("[heap]"):
        return "heap"
    if path.startswith("[stack"):
        return "stacks"
    if path.startswith("[anon:"):
        return _glibc_anon_kind(path)
    if path.startswith("["):
        return "other"
    return file_kind(path, exe)


def _glibc_anon_kind(path: str) -> str:
    name = path[len("[anon:") :].strip()
    if name.startswith("glibc: malloc arena"):
        return "arenas"
    if name.startswith("glibc: pthread stack"):
        return "stacks"
    return "anon"


def file_kind(path: str, exe: str = "") -> str:
    """rtc, python, so or other, from a mapped file's path."""
    base = path.rsplit("/", 1)[-1]
    if base.startswith("liblivekit_ffi") and _SO.search(base):
        return "rtc"
    if (
        (exe and path == exe)
        or _PYTHON_BINARY.match(base)
        or base.startswith("libpython")
        or "/lib-dynload/" in path
        or base.endswith((".py", ".pyc"))
    ):
        return "python"
    if _SO.search(base):
        return "so"
    return "other"


def classify(
    mappings: Sequence[Mapping],
    *,
    stack_pointers: Iterable[int] = (),
    exe: str = "",
    image_spans: dict[str, int] | None = None,
) -> list[str]:
    """The kind of each mapping (a list parallel to ``mappings``, which must be sorted).

    ``image_spans``: per shared object's path, the bytes its PT_LOAD segments span
    (`image_span`), to recognise its bss.
    """
    kinds: list[str | None] = [named_kind(m, exe) for m in mappings]
    sps = sorted(stack_pointers)
    for i, m in enumerate(mappings):
        if kinds[i] is None and any(m.start <= sp < m.end for sp in sps):
            kinds[i] = "stacks"
    image_ends = _image_ends(mappings, image_spans or {})
    for i in range(len(mappings)):
        if kinds[i] is None:
            _anonymous_kind(mappings, kinds, i, image_ends)
    for i in range(len(mappings) - 1):  # the guard of a stack found by its stack pointer
        m, above = mappings[i], mappings[i + 1]
        if (
            kinds[i + 1] == "stacks"
            and _unclaimed_none(m, kinds[i], at=m.start)
            and m.end == above.start
            and m.size <= GUARD_MAX
        ):
            kinds[i] = "stacks"
    return [kind or "anon" for kind in kinds]


def _image_ends(mappings: Sequence[Mapping], spans: dict[str, int]) -> dict[str, int]:
    """Where each loaded object's memory image ends: its offset-0 mapping plus its span."""
    ends: dict[str, int] = {}
    for m in mappings:
        if m.path in spans and m.offset == 0 and m.path not in ends:
            ends[m.path] = m.start + spans[m.path]
    return ends


def _anonymous_kind(
    mappings: Sequence[Mapping], kinds: list[str | None], i: int, image_ends: dict[str, int]
) -> None:
    """Decide mapping i (anonymous, not yet decided), and its reserve or guard with it."""
    m = mappings[i]
    if not m.rw:
        return  # a PROT_NONE piece nobody claimed (claimed ones are decided already): anon
    after = mappings[i + 1] if i + 1 < len(mappings) else None
    before = mappings[i - 1] if i > 0 else None
    if m.start % ARENA_SIZE == 0 and m.size <= ARENA_SIZE:
        reserve = (
            after is not None
            and m.size < ARENA_SIZE
            and _unclaimed_none(after, kinds[i + 1], at=m.end)
            and after.end >= m.start + ARENA_SIZE
        )
        if m.size == ARENA_SIZE or reserve:
            kinds[i] = "arenas"
            if reserve:
                kinds[i + 1] = "arenas"
            return
    if (
        before is not None
        and _unclaimed_none(before, kinds[i - 1], at=before.start)
        and before.end == m.start
        and before.size <= GUARD_MAX
    ):
        kinds[i] = kinds[i - 1] = "stacks"
        return
    if (
        before is not None
        and before.end == m.start
        and not before.anonymous
        and before.rw
        and kinds[i - 1] in _FILE_KINDS
        and m.end <= image_ends.get(before.path, 0)
    ):
        kinds[i] = kinds[i - 1]  # the library's .bss


def _unclaimed_none(m: Mapping, kind: str | None, *, at: int) -> bool:
    """An anonymous PROT_NONE mapping starting at ``at`` that no rule has claimed yet."""
    return kind is None and m.anonymous and m.prot_none and m.start == at


def breakdown(mappings: Sequence[Mapping], kinds: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per kind (every kind, in KINDS order): how many mappings, and each field summed (kB)."""
    totals = {kind: empty() for kind in KINDS}
    for m, kind in zip(mappings, kinds, strict=True):
        row = totals[kind]
        row["mappings"] += 1
        for key in FIELDS:
            row[key] += m.fields.get(key, 0)
    return totals


def empty() -> dict[str, int]:
    return {"mappings": 0, **dict.fromkeys(FIELDS, 0)}


def add(into: dict[str, dict[str, int]], other: dict[str, dict[str, int]]) -> None:
    """Sum another breakdown into ``into`` (a process tree's total)."""
    for kind, row in other.items():
        target = into.setdefault(kind, empty())
        for key, value in row.items():
            target[key] = target.get(key, 0) + value


def total(per_kind: dict[str, dict[str, int]]) -> dict[str, int]:
    row = empty()
    for kind_row in per_kind.values():
        for key, value in kind_row.items():
            row[key] += value
    return row


PAGE = 4096
_PT_LOAD = 1


def image_span(elf: bytes, page: int = PAGE) -> int | None:
    """How many bytes a 64-bit little-endian ELF object's PT_LOAD segments span once
    mapped, from the page of the first to the page end of the last (bss included), given
    the file's first bytes (header and program headers: 4 KiB is plenty); None if not
    such an ELF file."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return None
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    lows, highs = [], []
    for n in range(phnum):
        at = phoff + n * phentsize
        if at + 56 > len(elf):
            return None
        p_type, _flags, _offset, vaddr, _paddr, _filesz, memsz = struct.unpack_from(
            "<IIQQQQQ", elf, at
        )
        if p_type == _PT_LOAD:
            lows.append(vaddr)
            highs.append(vaddr + memsz)
    if not lows:
        return None
    low = min(lows) // page * page
    high = -(-max(highs) // page) * page
    return high - low


def parse_stack_pointer(syscall_text: str) -> int | None:
    """The stack pointer in a /proc/PID/task/TID/syscall line, if the thread was stopped.

    The line is ``nr args... sp pc``, ``-1 sp pc`` (blocked outside a syscall) or
    ``running`` (no registers then).
    """
    parts = syscall_text.split()
    if len(parts) < 3:
        return None
    try:
        return int(parts[-2], 16)
    except ValueError:
        return None


# -- reading /proc ----------------------------------------------------------------------------

PROC = Path("/proc")


class Unreadable(Exception):
    """The process is gone, or its smaps is not ours to read."""


def threads(pid: int, proc: Path = PROC) -> tuple[Counter[str], list[int]]:
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
            sp = parse_stack_pointer((task / "syscall").read_text())
            if sp:
                pointers.append(sp)
    return names, pointers


def image_spans(mappings: list[Mapping], proc_root: Path) -> dict[str, int]:
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
                span = image_span(elf.read(PAGE))
        except OSError:
            continue
        if span is not None:
            spans[before.path] = span
    return spans


def measure(pid: int, proc: Path = PROC) -> dict[str, Any]:
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
    mappings = parse(text)
    spans = image_spans(mappings, proc / str(pid) / "root")
    kinds = classify(mappings, stack_pointers=pointers, exe=exe, image_spans=spans)
    return {
        "pid": pid,
        "name": name,
        "kinds": breakdown(mappings, kinds),
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
    """The process (and with ``tree`` its descendants): per process and summed per kind.
    Unreadable if the process itself cannot be read; descendants that end meanwhile are
    listed in ``skipped``."""
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
        add(per_kind, one["kinds"])
        names.update(one["thread_names"])
    return {
        "pid": pid,
        "tree": tree,
        "unit": "kB",
        "kinds": per_kind,
        "total": total(per_kind),
        "threads": sum(one["threads"] for one in processes),
        "thread_names": dict(names.most_common()),
        "processes": [
            {
                "pid": one["pid"],
                "name": one["name"],
                "threads": one["threads"],
                "stack_pointers_read": one["stack_pointers_read"],
                **{key: total(one["kinds"])[key] for key in ("Rss", "Pss")},
            }
            for one in processes
        ],
        "skipped": skipped,
    }


READ_TIMEOUT = 5.0  # a job's tree takes tens of ms; the CLI gives the daemon 10 s
READ_SLOTS = 2  # reads running at once, stuck ones included


class TooSlow(Exception):
    """A read did not finish within its time (or waited that long for a free slot)."""


class BoundedReads:
    """Process-tree reports for an event loop: each read runs in a thread (reading smaps is
    blocking I/O, a few ms per MB of mappings), at most ``slots`` at once, and a caller
    waits at most ``timeout``. A read that overran keeps its slot until its thread ends (a
    thread cannot be cancelled), so stuck reads cannot pile up threads either."""

    def __init__(
        self,
        read: Callable[[int], dict[str, Any]] | None = None,
        *,
        timeout: float = READ_TIMEOUT,
        slots: int = READ_SLOTS,
    ) -> None:
        self._read = read or (lambda pid: report(pid, tree=True))
        self.timeout = timeout
        self._slots = asyncio.Semaphore(slots)

    async def read(self, pid: int) -> dict[str, Any]:
        """``report(pid, tree=True)``; Unreadable as it raises it, TooSlow past the timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        too_slow = TooSlow(f"reading pid {pid}'s memory took over {self.timeout:g} s")
        try:  # (wait_for, not asyncio.timeout: lkrun runs on Python 3.10.)
            await asyncio.wait_for(self._slots.acquire(), self.timeout)
        except asyncio.TimeoutError as exc:
            raise too_slow from exc
        running = asyncio.ensure_future(asyncio.to_thread(self._read, pid))
        running.add_done_callback(self._release)
        try:
            left = max(0.0, deadline - loop.time())
            return await asyncio.wait_for(asyncio.shield(running), left)
        except asyncio.TimeoutError as exc:
            raise too_slow from exc

    def _release(self, done: asyncio.Future[dict[str, Any]]) -> None:
        self._slots.release()
        if not done.cancelled():
            done.exception()  # retrieved: a read nobody waits for any more must not warn
