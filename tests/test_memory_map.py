"""The memory breakdown by mapping kind (lkrun/memory_map.py): the rules on synthetic smaps
text, the readers on a fake /proc and on this process, the bounded reads the daemon makes,
and `python -m tests.bench.memmap`; one e2e test measures a forked child of the test
process."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
from pathlib import Path

import pytest

from lkrun import memory_map
from tests.bench import memmap

MiB = 1 << 20
ARENA = memory_map.ARENA_SIZE
BASE = 0x7F0000000000  # 64 MiB-aligned
RTC = "/venv/site-packages/livekit/rtc/resources/liblivekit_ffi.so"
LIBC = "/usr/lib/x86_64-linux-gnu/libc.so.6"


def vma(start: int, end: int, perms: str = "rw-p", path: str = "", **kb: int) -> str:
    """One smaps entry; a path starting with / is a file (inode 7), fields in kB."""
    inode = 7 if path.startswith("/") else 0
    offset = kb.pop("offset", 0)
    lines = [f"{start:x}-{end:x} {perms} {offset:08x} fe:00 {inode:<10} {path}".rstrip()]
    fields = {"Size": (end - start) // 1024, **kb}
    lines += [f"{key}: {value:>8} kB" for key, value in fields.items()]
    lines.append("VmFlags: rd wr mr mw me ac")
    return "\n".join(lines) + "\n"


def kinds_of(text: str, **kwargs: object) -> list[str]:
    return memory_map.classify(memory_map.parse(text), **kwargs)  # type: ignore[arg-type]


def test_parse_reads_each_mapping_and_its_fields() -> None:
    text = vma(0x1000, 0x3000, "r-xp", "/opt/my lib.so (deleted)", Rss=8, Pss=4) + vma(
        0x5000, 0x6000, path="[heap]", Rss=4, Private_Dirty=4
    )
    first, heap = memory_map.parse(text)
    assert (first.start, first.end, first.perms, first.path) == (
        0x1000,
        0x3000,
        "r-xp",
        "/opt/my lib.so",
    )
    assert first.fields == {"Size": 8, "Rss": 8, "Pss": 4} and not first.anonymous
    assert heap.path == "[heap]" and heap.fields["Private_Dirty"] == 4 and not heap.anonymous


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("[heap]", "heap"),
        ("[stack]", "stacks"),
        ("[vdso]", "other"),
        ("[anon: glibc: malloc arena]", "arenas"),
        ("[anon: glibc: pthread stack: 42]", "stacks"),
        ("[anon: glibc: malloc]", "anon"),
        (RTC, "rtc"),
        ("/venv/livekit/rtc/resources/liblivekit_ffi.so.1", "rtc"),
        ("/root/.pyenv/versions/3.11.7/bin/python3.11", "python"),
        ("/usr/bin/python3", "python"),
        ("/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0", "python"),
        ("/usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so", "python"),
        ("/app/__pycache__/mod.cpython-311.pyc", "python"),
        ("/venv/site-packages/numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so", "so"),
        (LIBC, "so"),
        ("/usr/lib/x86_64-linux-gnu/libcrypto.so.3", "so"),
        ("/usr/lib/locale/C.utf8/LC_CTYPE", "other"),
        ("/memfd:wayland (deleted)", "other"),
    ],
)
def test_a_name_decides_the_kind(path: str, kind: str) -> None:
    assert kinds_of(vma(BASE, BASE + 0x1000, "r--p", path)) == [kind]


def test_the_executable_is_python_whatever_its_name() -> None:
    assert kinds_of(vma(BASE, BASE + 0x1000, "r-xp", "/opt/agent"), exe="/opt/agent") == ["python"]


def test_a_malloc_arena_is_an_aligned_heap_with_its_reserve_to_the_next_boundary() -> None:
    text = (
        vma(BASE, BASE + 132 * 1024, Rss=100, Private_Dirty=100)
        + vma(BASE + 132 * 1024, BASE + ARENA, "---p")
        + vma(BASE + ARENA, BASE + 2 * ARENA, Rss=4)  # grown to the full 64 MiB
        + vma(BASE + 2 * ARENA, BASE + 2 * ARENA + 4096, "---p")  # not its reserve
    )
    assert kinds_of(text) == ["arenas", "arenas", "arenas", "anon"]


def test_an_unaligned_or_unreserved_mapping_is_no_arena() -> None:
    unaligned = vma(BASE + 4096, BASE + 8192) + vma(BASE + 8192, BASE + ARENA + 4096, "---p")
    short = vma(BASE, BASE + 4096) + vma(BASE + 4096, BASE + 8 * MiB, "---p")
    assert kinds_of(unaligned) == ["anon", "anon"]
    assert kinds_of(short) == ["anon", "anon"]


def test_a_thread_stack_sits_just_above_its_guard_page() -> None:
    start = BASE + 0x100000
    text = (
        vma(start, start + 4096, "---p")
        + vma(start + 4096, start + 4096 + 8 * MiB, Rss=16)
        + vma(start + 9 * MiB, start + 9 * MiB + 2 * MiB, "---p")  # too big for a guard
        + vma(start + 11 * MiB, start + 12 * MiB)
    )
    assert kinds_of(text) == ["stacks", "stacks", "anon", "anon"]


def test_a_stack_pointer_finds_a_stack_and_its_guard() -> None:
    start = BASE + 0x200000
    lone = vma(start + 4 * MiB, start + 6 * MiB)  # no guard below
    assert kinds_of(lone) == ["anon"]
    assert kinds_of(lone, stack_pointers=[start + 5 * MiB]) == ["stacks"]
    guarded = vma(start, start + 4096, "---p") + vma(start + 4096, start + 2 * MiB)
    assert kinds_of(guarded, stack_pointers=[start + MiB]) == ["stacks", "stacks"]


def test_the_bss_after_a_library_takes_its_kind_within_its_image() -> None:
    lib = (
        vma(BASE, BASE + 0x10000, "r--p", RTC)
        + vma(BASE + 0x10000, BASE + 0x20000, "r-xp", RTC, offset=0x10000)
        + vma(BASE + 0x20000, BASE + 0x21000, "rw-p", RTC, offset=0x20000)
    )
    bss = lib + vma(BASE + 0x21000, BASE + 0x30000, Rss=8)
    assert kinds_of(bss, image_spans={RTC: 0x30000}) == ["rtc"] * 4
    # without the library's span, or reaching past it (merged with a later mmap): anon
    assert kinds_of(bss)[-1] == "anon"
    assert kinds_of(bss, image_spans={RTC: 0x28000})[-1] == "anon"


def test_breakdown_sums_fields_per_kind_and_the_total_adds_up() -> None:
    text = (
        vma(BASE, BASE + 0x8000, path="[heap]", Rss=32, Pss=20, Private_Dirty=8, Shared_Dirty=24)
        + vma(BASE + 0x10000, BASE + 0x20000, Rss=64, Pss=64, Private_Dirty=64)
        + vma(BASE + 0x20000, BASE + 0x21000, "r--p", LIBC, Rss=4, Pss=1, Shared_Clean=4)
    )
    mappings = memory_map.parse(text)
    per_kind = memory_map.breakdown(mappings, memory_map.classify(mappings))
    assert list(per_kind) == list(memory_map.KINDS)
    heap = per_kind["heap"]
    assert (heap["mappings"], heap["Rss"], heap["Private_Dirty"], heap["Shared_Dirty"]) == (
        1,
        32,
        8,
        24,
    )
    assert per_kind["anon"]["Pss"] == 64 and per_kind["so"]["Shared_Clean"] == 4
    assert per_kind["stacks"]["mappings"] == 0
    total = memory_map.total(per_kind)
    assert (total["mappings"], total["Rss"], total["Pss"]) == (3, 100, 85)
    tree = {kind: dict(row) for kind, row in per_kind.items()}
    memory_map.add(tree, per_kind)
    assert tree["heap"]["Rss"] == 64 and memory_map.total(tree)["Pss"] == 170


def elf(*loads: tuple[int, int]) -> bytes:
    """A 64-bit little-endian ELF header and PT_LOAD program headers (vaddr, memsz)."""
    phoff, phentsize = 64, 56
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, phentsize, len(loads) + 1)
    phdrs = struct.pack("<IIQQQQQQ", 6, 4, 64, 64, 64, 56, 56, 8)  # PT_PHDR, not a load
    for vaddr, memsz in loads:
        phdrs += struct.pack("<IIQQQQQQ", 1, 6, vaddr, vaddr, vaddr, memsz // 2, memsz, 4096)
    return bytes(header) + phdrs


def test_image_span_covers_the_load_segments_bss_included() -> None:
    assert memory_map.image_span(elf((0, 0x6A85FC), (0x1ADF520, 0x249264))) == 0x1D29000
    assert memory_map.image_span(elf((0x400000, 0x1000))) == 0x1000
    assert memory_map.image_span(b"#!/bin/sh\n" + bytes(100)) is None
    assert memory_map.image_span(elf()) is None


@pytest.mark.parametrize(
    ("line", "sp"),
    [
        (
            "202 0x7f1244000ba0 0x189 0x0 0x0 0x0 0xffffffff 0x7f124befb8c0 0x7f124c2a3f16",
            0x7F124BEFB8C0,
        ),
        ("-1 0x7ffd0000 0x401000", 0x7FFD0000),
        ("running", None),
        ("", None),
    ],
)
def test_the_stack_pointer_of_a_syscall_line(line: str, sp: int | None) -> None:
    assert memory_map.parse_stack_pointer(line) == sp


def test_measure_reads_a_proc_tree_of_files(tmp_path: Path) -> None:
    """measure() on a fake /proc: smaps, each thread's name and stack pointer."""
    pid = tmp_path / "42"
    stack = BASE + 0x400000
    (pid / "task").mkdir(parents=True)
    (pid / "smaps").write_text(
        vma(BASE, BASE + 0x1000, path="[heap]", Rss=4) + vma(stack, stack + 2 * MiB, Rss=8)
    )
    (pid / "comm").write_text("python\n")
    for tid, name, sp in [
        (42, "python", "running"),
        (43, "AsyncResolver", f"-1 {stack + 64:#x} 0x1"),
        (44, "AsyncResolver", "running"),
    ]:
        (pid / "task" / str(tid)).mkdir()
        (pid / "task" / str(tid) / "comm").write_text(name + "\n")
        (pid / "task" / str(tid) / "syscall").write_text(sp + "\n")
    data = memory_map.measure(42, proc=tmp_path)
    assert data["threads"] == 3 and data["thread_names"] == {"AsyncResolver": 2, "python": 1}
    assert data["stack_pointers_read"] == 1
    assert data["kinds"]["stacks"]["Rss"] == 8 and data["kinds"]["heap"]["Rss"] == 4
    with pytest.raises(memory_map.Unreadable):
        memory_map.measure(7, proc=tmp_path)


@pytest.mark.e2e
def test_a_forked_child_shares_what_it_has_not_written() -> None:
    """A child forked from this process, having written half of a 32 MiB buffer the
    parent filled: that half is private to it, the rest still shared."""
    size = 32 * MiB
    buf = bytearray(b"\x01") * size
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            for i in range(0, size // 2, 4096):
                buf[i] = 2
            os.write(ready_w, b"r")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        os.read(ready_r, 1)
        data = memory_map.report(child)
    finally:
        os.write(done_w, b"d")
        os.waitpid(child, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)
    total = data["total"]
    assert data["threads"] == 1 and data["processes"][0]["pid"] == child
    assert total["Private_Dirty"] >= 16 * 1024 and total["Shared_Dirty"] >= 16 * 1024
    assert data["kinds"]["python"]["Rss"] > 0 and data["kinds"]["anon"]["Rss"] >= 32 * 1024


def test_the_bench_tool_prints_this_process(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m tests.bench.memmap PID [--json]` still works, on the package's reader."""
    assert memmap.main([str(os.getpid()), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pid"] == os.getpid() and data["unit"] == "kB"
    assert data["total"]["Pss"] > 0 and data["threads"] >= 1
    assert memmap.main([str(os.getpid())]) == 0
    text = capsys.readouterr().out
    assert "memory by mapping kind, MB" in text and "Priv dirty" in text and "total" in text
    assert memmap.main(["999999999"]) == 1
    assert "memmap: pid 999999999" in capsys.readouterr().err


async def test_bounded_reads_run_off_the_loop_and_pass_errors_on() -> None:
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def read(pid: int) -> dict[str, object]:
        seen.append(threading.get_ident())
        if pid == 2:
            raise memory_map.Unreadable("pid 2: No such file or directory")
        return {"pid": pid}

    reads = memory_map.BoundedReads(read)
    assert await reads.read(1) == {"pid": 1}
    with pytest.raises(memory_map.Unreadable, match="pid 2"):
        await reads.read(2)
    assert seen and loop_thread not in seen


async def test_a_stuck_read_times_out_and_keeps_its_slot_until_it_ends() -> None:
    release = threading.Event()

    def read(pid: int) -> dict[str, object]:
        if pid == 1:
            release.wait(10)  # a read stuck in /proc (a process in D state)
        return {"pid": pid}

    reads = memory_map.BoundedReads(read, timeout=1.0, slots=1)
    with pytest.raises(memory_map.TooSlow, match="took over 1 s"):
        await reads.read(1)
    # Its thread still runs: no second thread starts beside it, the caller waits its time.
    with pytest.raises(memory_map.TooSlow):
        await reads.read(3)
    release.set()
    await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)
    assert await asyncio.wait_for(reads.read(4), 5) == {"pid": 4}
