"""The agents workload's agent with a probe: what the pages a job copied or allocated hold.

    python -m tests.bench.cow_run --jobs 10 --entrypoint tests.bench.cow_probe:server \\
        --env COW_PROBE_OUT=/tmp/probe [--env COW_PROBE_TRACEMALLOC=1]

The job runs ``tests.bench.lka_agent``'s setup and entrypoint, then, ``COW_PROBE_DELAY``
seconds (default 3) after its session started, splits its pages against its fork server's
(`tests/bench/cow.py`, the page addresses kept) and only then looks at its objects (which
writes to many of them): every object the collector knows, frozen ones included
(``gc.unfreeze``), and the objects they refer to that it does not track (str, int, bytes,
...), each placed by its header's page (where its reference count is). Per type: objects
and pages in copied, new and shared pages; code objects by package; the modules created
after the fork (their object on a new page); with ``COW_PROBE_TRACEMALLOC`` the top
allocation sites since the job's setup. Writes ``$COW_PROBE_OUT/<pid>.json``.

For measuring only: it disturbs the job it probes (the probe's own allocations, the
objects' reference counts once it has split the pages).
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from livekit.agents import AgentServer, JobContext, JobProcess

from tests.bench import cow, lka_agent

OUT = os.environ.get("COW_PROBE_OUT", "")
DELAY = float(os.environ.get("COW_PROBE_DELAY", "3"))
TRACE = bool(os.environ.get("COW_PROBE_TRACEMALLOC"))


WATCH = bool(os.environ.get("COW_PROBE_WATCH"))
_walks: Counter[str] = Counter()
_WALKERS = {"getmodule", "whichmodule", "iter_modules", "walk_packages", "checkcache"}


def _watch(frame: Any, event: str, arg: Any) -> None:
    """Who walks every module (sys.modules copied or iterated, inspect.getmodule...)."""
    if event == "c_call" and getattr(arg, "__self__", None) is sys.modules:
        what = f"sys.modules.{arg.__name__}"
    elif event == "call" and frame.f_code.co_name in _WALKERS:
        what = frame.f_code.co_name
        frame = frame.f_back
    else:
        return
    stack = []
    while frame is not None and len(stack) < 8:
        stack.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        frame = frame.f_back
    _walks[what + " <- " + " <- ".join(stack)] += 1


def setup(proc: JobProcess) -> None:
    if TRACE:
        tracemalloc.start(1)
    if WATCH:
        sys.setprofile(_watch)
    lka_agent.prewarm(proc)


server = AgentServer(setup_fnc=setup)


@server.rtc_session(agent_name=os.environ.get("BENCH_AGENT_NAME", "bench-lka"))
async def entrypoint(ctx: JobContext) -> None:
    await lka_agent.entrypoint(ctx)
    if OUT:
        asyncio.get_running_loop().call_later(DELAY, _probe_safely)


def _probe_safely() -> None:
    try:
        data = probe()
    except Exception as exc:  # a probe that fails must say why, in its output
        data = {"error": repr(exc)}
    Path(OUT).mkdir(parents=True, exist_ok=True)
    (Path(OUT) / f"{os.getpid()}.json").write_text(json.dumps(data, indent=1) + "\n")


def _package(obj: Any) -> str:
    filename = getattr(obj, "co_filename", "") or ""
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in filename:
            rest = filename.split(marker, 1)[1]
            parts = rest.split("/")
            return "/".join(parts[:2]) if parts[0] == "livekit" else parts[0]
    return filename.rsplit("/", 1)[-1] or "?"


def probe() -> dict[str, Any]:
    started = time.monotonic()
    sys.setprofile(None)
    addresses: dict[str, list[int]] = {}
    split = cow.measure(os.getpid(), os.getppid(), addresses=addresses)
    page_of: dict[int, str] = {}
    for what, pages in addresses.items():
        for address in pages:
            page_of[address // cow.PAGE] = what
    gc.unfreeze()  # the fork server's frozen objects, back where get_objects sees them
    tracked = gc.get_objects()
    seen: set[int] = set()
    objects: list[Any] = []
    for obj in tracked:
        seen.add(id(obj))
        objects.append(obj)
    for obj in tracked:  # the untracked objects they hold: str, int, bytes, float, ...
        for ref in gc.get_referents(obj):
            if id(ref) not in seen and not gc.is_tracked(ref):
                seen.add(id(ref))
                objects.append(ref)
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    pages_by_type: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    code_copied: Counter[str] = Counter()
    code_pages: dict[str, set[int]] = defaultdict(set)
    pages_with_objects: dict[str, set[int]] = defaultdict(set)
    late_modules: list[str] = []
    types_on_page: dict[int, set[str]] = defaultdict(set)
    for obj in objects:
        page = id(obj) // cow.PAGE
        what = page_of.get(page, cow.SHARED)
        name = type(obj).__name__
        by_type[name][what] += 1
        pages_by_type[name][what].add(page)
        pages_with_objects[what].add(page)
        if what == cow.COPIED:
            types_on_page[page].add(name)
        if name == "code" and what == cow.COPIED:
            code_copied[_package(obj)] += 1
            code_pages[_package(obj)].add(page)
        if name == "module" and what in (cow.NEW, cow.NEW_RANGE):
            late_modules.append(obj.__name__)
    types = sorted(by_type, key=lambda t: -len(pages_by_type[t][cow.COPIED]))
    result: dict[str, Any] = {
        "pid": os.getpid(),
        "split": split,
        "pages": {what: len(pages) for what, pages in addresses.items()},
        "pages_with_an_object_header": {w: len(p) for w, p in pages_with_objects.items()},
        # Copied pages on which every object header is a str's: the pages immortal
        # (interned) strings could spare, at most.
        "copied_pages_only_str": sum(1 for t in types_on_page.values() if t == {"str"}),
        "copied_pages_by_types": Counter(
            ",".join(sorted(t)) if len(t) <= 2 else "3 types or more"
            for t in types_on_page.values()
        ).most_common(15),
        "objects": len(objects),
        "by_type": [
            {
                "type": t,
                "copied_pages": len(pages_by_type[t][cow.COPIED]),
                "objects": dict(by_type[t]),
            }
            for t in types[:40]
        ],
        "code_in_copied_pages": [
            {"package": p, "objects": n, "pages": len(code_pages[p])}
            for p, n in code_copied.most_common(25)
        ],
        "modules_after_fork": sorted(late_modules),
        "modules": len(sys.modules),
        "module_walks": [{"where": w, "count": n} for w, n in _walks.most_common(30)],
    }
    if tracemalloc.is_tracing():
        snapshot = tracemalloc.take_snapshot()
        stats = snapshot.statistics("lineno")
        result["tracemalloc_kb"] = round(sum(s.size for s in stats) / 1024)
        result["tracemalloc_top"] = [
            {"where": str(s.traceback[0]), "kb": round(s.size / 1024, 1), "count": s.count}
            for s in stats[:40]
        ]
        by_file = snapshot.statistics("filename")
        result["tracemalloc_files"] = [
            {"file": str(s.traceback[0].filename), "kb": round(s.size / 1024, 1)}
            for s in by_file[:25]
        ]
    result["probe_seconds"] = round(time.monotonic() - started, 2)
    return result
