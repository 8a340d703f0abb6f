"""The copy-on-write split (tests/bench/cow.py) on synthetic pagemap entries; one test
measures a forked child of the test process (frames are readable as root only)."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from tests.bench import cow

smaps = cow.smaps
P = cow.PRESENT
X = cow.EXCLUSIVE
BASE = 0x7F0000001000


def page(pfn: int, *, exclusive: bool = False) -> int:
    return P | pfn | (X if exclusive else 0)


def mapping(start: int, pages: int, path: str = "") -> smaps.Mapping:
    return smaps.Mapping(
        start=start, end=start + pages * cow.PAGE, perms="rw-p", offset=0, inode=0, path=path
    )


def test_decode_reads_present_frame_and_exclusive_bits() -> None:
    assert cow.Page.decode(page(42, exclusive=True)) == cow.Page(True, 42, True)
    assert cow.Page.decode(42) == cow.Page(False, 0, False)  # not present: no frame
    assert cow.Page.decode(cow.SWAPPED).present is False


@pytest.mark.parametrize(
    ("child", "parent", "parent_maps", "expected"),
    [
        (page(7), page(7), True, cow.SHARED),
        (page(8, exclusive=True), page(7), True, cow.COPIED),
        (page(8, exclusive=True), 0, True, cow.NEW),
        (page(8, exclusive=True), 0, False, cow.NEW_RANGE),
        # The fork server wrote its page after the fork; the jobs still share the old frame.
        (page(8), page(7), True, cow.OTHER_SHARED),
        (0, page(7), True, None),  # the job has no page there
        # Frames unreadable (not root): every pfn reads 0, so nothing can be called shared.
        (P, P, True, cow.OTHER_SHARED),
    ],
)
def test_category(child: int, parent: int, parent_maps: bool, expected: str | None) -> None:
    assert cow.category(child, parent, parent_maps) == expected


def test_split_sums_pages_per_kind_and_category() -> None:
    heap = mapping(BASE, 4, "[heap]")
    anon = mapping(BASE + 0x100000, 3)
    fresh = mapping(BASE + 0x200000, 2)
    child = {
        heap.start: [page(1), page(2, exclusive=True), page(3, exclusive=True), 0],
        anon.start: [page(10), page(11), page(12, exclusive=True)],
        fresh.start: [page(20, exclusive=True), page(21, exclusive=True)],
    }
    parent = {
        heap.start: [page(1), page(9), 0, page(5)],
        anon.start: [page(10), page(11), page(13)],
    }
    # The fork server's heap ends two pages early: the job's brk grew past it.
    ranges = cow.Ranges([(heap.start, heap.start + 2 * cow.PAGE), (anon.start, anon.end)])
    mappings = [heap, anon, fresh]
    kinds = ["heap", "anon", "anon"]
    counts = {1: 4, 10: 2, 11: 2}
    addresses: dict[str, list[int]] = {}
    per_kind = cow.split(
        mappings,
        kinds,
        lambda start, end: child[start],
        lambda start, end: parent.get(start, []),
        ranges,
        mapcount=lambda pfn: counts.get(pfn, 1),
        addresses=addresses,
    )
    assert per_kind["heap"][cow.SHARED] == 4
    assert per_kind["heap"][cow.COPIED] == 4
    assert per_kind["heap"][cow.NEW_RANGE] == 4  # page 3: past the fork server's heap
    assert per_kind["heap"]["pss"] == 1 + 4 + 4
    assert per_kind["anon"][cow.SHARED] == 8 and per_kind["anon"][cow.COPIED] == 4
    assert per_kind["anon"][cow.NEW_RANGE] == 8
    assert per_kind["anon"]["pss"] == 2 + 2 + 4 + 8
    assert per_kind["stacks"] == cow.empty()  # every kind has a row
    assert addresses[cow.COPIED] == [heap.start + cow.PAGE, anon.start + 2 * cow.PAGE]
    assert addresses[cow.NEW_RANGE] == [heap.start + 2 * cow.PAGE, fresh.start, fresh.end - 4096]
    total = cow.total(per_kind)
    assert total[cow.SHARED] == 12 and total[cow.COPIED] == 8 and total[cow.NEW_RANGE] == 12


def test_split_without_mapcounts_leaves_pss_zero_and_short_parent_reads_absent() -> None:
    m = mapping(BASE, 2)
    per_kind = cow.split(
        [m],
        ["anon"],
        lambda s, e: [page(1, exclusive=True), page(2, exclusive=True)],
        lambda s, e: [page(3)],  # a read cut short: the second page counts as absent
        cow.Ranges([(m.start, m.end)]),
    )
    assert per_kind["anon"][cow.COPIED] == 4 and per_kind["anon"][cow.NEW] == 4
    assert per_kind["anon"]["pss"] == 0


def test_ranges_cover_half_open_intervals() -> None:
    ranges = cow.Ranges([(0x3000, 0x4000), (0x1000, 0x2000)])
    assert [ranges.covers(a) for a in (0x0, 0x1000, 0x1FFF, 0x2000, 0x3800, 0x4000)] == [
        False,
        True,
        True,
        False,
        True,
        False,
    ]


def test_mean_averages_reports_per_kind() -> None:
    one = {"kinds": {"anon": {**cow.empty(), cow.COPIED: 8.0}}}
    two = {"kinds": {"anon": {**cow.empty(), cow.COPIED: 4.0, cow.NEW: 2.0}}}
    result = cow.mean([one, two])
    assert result["jobs"] == 2
    assert result["kinds"]["anon"][cow.COPIED] == 6.0 and result["total"][cow.NEW] == 1.0


def _fork_server(report: int, done: int) -> None:  # pragma: no cover - in a child
    """A quiet fork server: a 16 MiB buffer, one child that writes half of it and maps 8 MiB
    of its own; reports (child pid, buffer start, mapping start) and waits for ``done``."""
    inherited = bytearray(os.urandom(64 * cow.PAGE)) * 64
    start = ctypes.addressof(ctypes.c_char.from_buffer(inherited))
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:
        view = memoryview(inherited)
        for at in range(0, len(inherited) // 2, cow.PAGE):
            view[at] = 1
        fresh = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for at in range(0, len(fresh), cow.PAGE):
            fresh[at] = 1
        os.write(ready_w, ctypes.addressof(ctypes.c_char.from_buffer(fresh)).to_bytes(8, "little"))
        os.read(done, 1)
        os._exit(0)
    fresh = int.from_bytes(os.read(ready_r, 8), "little")
    os.write(report, b"".join(n.to_bytes(8, "little") for n in (child, start, fresh)))
    os.read(done, 1)  # quiet until measured: its pages stay as they were at the fork
    os.waitpid(child, 0)


@pytest.mark.e2e
@pytest.mark.skipif(os.geteuid() != 0, reason="page frame numbers are readable as root only")
def test_measure_a_forked_child_tells_copied_from_shared_and_new() -> None:
    report_r, report_w = os.pipe()
    done_r, done_w = os.pipe()
    server = os.fork()
    if server == 0:  # pragma: no cover - the fork server
        code = 0
        try:
            _fork_server(report_w, done_r)
        except BaseException:
            code = 1
        os._exit(code)
    addresses: dict[str, list[int]] = {}
    try:
        data = os.read(report_r, 24)
        child, start, fresh = (int.from_bytes(data[i : i + 8], "little") for i in (0, 8, 16))
        measured = cow.measure(child, addresses=addresses)
    finally:
        os.write(done_w, b"xx")  # one byte for each of the two
        os.waitpid(server, 0)
        for fd in (report_r, report_w, done_r, done_w):
            os.close(fd)
    assert measured["parent"] == server and measured["frames_readable"]
    size = 64 * 64 * cow.PAGE
    first, last = -(-start // cow.PAGE) * cow.PAGE, (start + size) // cow.PAGE * cow.PAGE
    copied = [a for a in addresses[cow.COPIED] if first <= a < last]
    # The half written, to a page (the buffer need not start on one); the rest still shared.
    assert size // 2 // cow.PAGE - 1 <= len(copied) <= size // 2 // cow.PAGE + 1
    assert measured["kinds"]["anon"][cow.SHARED] >= 8 * 1024 - cow.PAGE_KB
    new = [a for a in addresses[cow.NEW_RANGE] if fresh <= a < fresh + (8 << 20)]
    assert len(new) == (8 << 20) // cow.PAGE
