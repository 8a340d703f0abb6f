"""The bench's ramps to a host's limit (tests/bench/limit.py, issue 20): what stops them,
the safety bounds, and how results.md shows them; the ramps run on fakes (no server)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.bench import limit, media, report, run
from tests.bench.measure import Settings
from tests.bench.suts import LkrunSut

MB = 1024 * 1024


def test_a_held_room_drops_when_its_agent_leaves_or_its_job_ends() -> None:
    got = limit.dropped(["a", "b", "c", "d"], listed={"a", "c"}, running={"a", "b"})
    assert got == {
        "b": "agent participant gone",
        "c": "job not running",
        "d": "agent participant gone and job not running",
    }


def test_the_memory_bound_reckons_a_job_by_the_memory_used_so_far() -> None:
    total = 24 * 1024 * MB
    # 100 jobs took 3 GiB: 30.7 MB each; 25 more need ~960 MB, with 1 GiB over the reserve.
    ok = limit.memory_bound(
        available=total * 0.1 + 1100 * MB,
        start_available=total * 0.1 + 1100 * MB + 3072 * MB,
        total=total,
        held=100,
        step=25,
    )
    assert ok is None
    tight = limit.memory_bound(
        available=total * 0.1 + 500 * MB,
        start_available=total * 0.1 + 500 * MB + 3072 * MB,
        total=total,
        held=100,
        step=25,
    )
    assert tight is not None and "25 more jobs at 30.7 MB each" in tight
    assert limit.memory_bound(available=1, start_available=2, total=total, held=0, step=5) is None


def test_bounds_ceiling_then_time_then_memory() -> None:
    common: dict[str, Any] = {"now": 10.0, "deadline": 20.0, "timeout": 600.0, "memory": None}
    assert limit.bound(held=100, ceiling=100, **common) == ("cap", "the ceiling of 100 reached")
    assert limit.bound(held=50, ceiling=100, **common) is None
    late = {**common, "now": 21.0}
    assert limit.bound(held=50, ceiling=100, **late)[0] == "time"  # type: ignore[index]
    full = {**common, "memory": "no room"}
    assert limit.bound(held=50, ceiling=100, **full) == ("memory", "no room")


class FakeLk:
    def __init__(self, sut: FakeSut) -> None:
        self.sut = sut
        self.rooms: set[str] = set()
        self.server = None

    async def agent_in(self, room: str) -> bool:
        return room in self.sut.listed

    async def create_room(self, name: str) -> None:
        self.rooms.add(name)


class FakeProc:
    def alive(self) -> bool:
        return True


class FakeSut:
    """A host that takes ``capacity`` jobs; ``drop`` rooms' agents leave at ``drop_at``."""

    def __init__(self, capacity: int, drop_at: int | None = None, workdir: Path = Path()) -> None:
        self.capacity = capacity
        self.drop_at = drop_at
        self.listed: set[str] = set()
        self.running: set[str] = set()
        self.main_pid = os.getpid()
        self.proc = FakeProc()
        self.workdir = workdir

    async def job_pids(self, rooms: list[str]) -> dict[str, int]:
        return {r: os.getpid() for r in rooms if r in self.running}

    async def failed_jobs(self, rooms: list[str]) -> list[str]:
        return []

    def why_missing(self, rooms: list[str]) -> str:
        return f"the fake is full at {self.capacity}"


class FakeBench:
    def __init__(self, sut: FakeSut, **settings: Any) -> None:
        self.sut = sut
        self.lk = FakeLk(sut)
        self.settings = Settings(**settings)
        self.cleaned: list[str] = []
        self.settle_timeouts: list[float] = []

    def say(self, message: str) -> None:
        pass

    def room(self, phase: str, index: int) -> str:
        return f"bench-fake-{phase}-{index}"

    async def ready_for_next(self) -> None:
        pass

    async def settle(self, window: float = 2.5, timeout: float = 15.0) -> float:
        self.settle_timeouts.append(timeout)
        return 12.5

    async def dispatch_rooms(self, rooms: list[str]) -> dict[str, float]:
        self.lk.rooms.update(rooms)
        return {r: time.time() for r in rooms}

    async def wait_agents(self, sent: dict[str, float], timeout: float) -> dict[str, float]:
        arrived = {}
        for room in sent:
            if len(self.sut.running) < self.sut.capacity:
                self.sut.running.add(room)
                self.sut.listed.add(room)
                arrived[room] = 0.5
        if self.sut.drop_at is not None and len(self.sut.running) >= self.sut.drop_at:
            self.sut.listed.discard("bench-fake-max-0")  # an early agent left its room
        return arrived

    async def cleanup(self, rooms: list[str], timeout: float = 90.0) -> None:
        self.cleaned = rooms


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """host_snapshot without waiting or reading /proc: the host's job count as its PSS."""
    taken: list[int] = []

    async def fake(main_pid: int, window: float = 0.0) -> dict[str, Any]:
        taken.append(main_pid)
        return {"host_cpu_percent": 150.0, "machine_cpu_percent": 80.0, "host_pss_mb": 1.0}

    monkeypatch.setattr(limit, "host_snapshot", fake)
    return taken


async def test_the_ramp_stops_at_the_first_step_an_agent_does_not_get_in(
    snapshots: list[int],
) -> None:
    bench = FakeBench(FakeSut(capacity=45), max_jobs_cap=1000, ramp_step=20, ramp_to_limit=True)
    got = await limit.max_jobs(bench)  # type: ignore[arg-type]
    assert got["held"] == 40
    assert got["limit_found"] is True and got["stopped_by"] == "agent_not_in"
    assert got["stop_step"] == 60
    assert "15 of 20 agents not in" in got["stop_reason"]
    assert "the fake is full at 45" in got["stop_reason"]
    assert [s["target"] for s in got["steps"]] == [20, 40, 60]
    assert got["at_stop"]["host_cpu_percent"] == 150.0  # the host at the failing step
    assert len(bench.cleaned) == 60  # every room, held or not
    assert limit.verdict_text(got) == "the real limit: an agent not in within the timeout at 60"
    assert bench.settle_timeouts == [limit.STEP_SETTLE_TIMEOUT] * 3  # short: calls keep it busy


async def test_an_earlier_job_dropping_is_the_limit_too(snapshots: list[int]) -> None:
    bench = FakeBench(FakeSut(capacity=1000, drop_at=60), max_jobs_cap=1000, ramp_step=20)
    got = await limit.max_jobs(bench)  # type: ignore[arg-type]
    assert got["held"] == 40 and got["stopped_by"] == "dropped" and got["limit_found"]
    assert "bench-fake-max-0: agent participant gone" in got["stop_reason"]
    assert got["steps"][-1]["dropped"] == 1


async def test_a_ceiling_caps_the_ramp_without_a_limit(snapshots: list[int]) -> None:
    bench = FakeBench(FakeSut(capacity=1000), max_jobs_cap=50, ramp_step=20)
    got = await limit.max_jobs(bench)  # type: ignore[arg-type]
    assert got["held"] == 50 and got["stopped_by"] == "cap" and not got["limit_found"]
    assert [s["target"] for s in got["steps"]] == [20, 40, 50]
    assert limit.verdict_text(got) == "capped: the ceiling"


async def test_the_time_bound_caps_the_ramp(snapshots: list[int]) -> None:
    bench = FakeBench(FakeSut(capacity=1000), max_jobs_cap=1000, ramp_step=20, ramp_timeout=0)
    got = await limit.max_jobs(bench)  # type: ignore[arg-type]
    assert got["stopped_by"] == "time" and not got["limit_found"]


class FakeObservers:
    """Tone observers whose meters keep up while the rooms are at most ``keeps_up``."""

    keeps_up = 4
    made: list[FakeObservers] = []

    def __init__(self, server: Any, rooms: list[str], log_dir: Path, **kwargs: Any) -> None:
        self.rooms = rooms
        self.kwargs = kwargs
        self.closed = False
        FakeObservers.made.append(self)

    @property
    def pids(self) -> list[int]:
        return [] if self.closed else [os.getpid()]

    async def start(self, timeout: float) -> None:
        pass

    async def play(self) -> None:
        pass

    async def metering(self) -> int:
        return len(self.rooms)

    async def collect(self) -> dict[str, dict[str, Any]]:
        rooms = sum(len(o.rooms) for o in FakeObservers.made)
        pace = 1.0 if rooms <= FakeObservers.keeps_up else 0.5  # the meters' audio
        now = time.time()
        reports = [
            [now - 2 + i * 0.125, i, round(i * 0.125 * media.SAMPLE_RATE * pace)] for i in range(17)
        ]
        sent = [[now - 3 + i, i * media.SAMPLE_RATE] for i in range(5)]
        return {room: {"reports": reports, "sent": sent} for room in self.rooms}

    async def close(self) -> None:
        self.closed = True


async def test_the_media_ramp_holds_rooms_until_a_meter_falls_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(limit.media, "ToneObservers", FakeObservers)
    monkeypatch.setattr(limit, "MEDIA_WARM_IN", 0.0)
    FakeObservers.made = []
    bench = FakeBench(
        FakeSut(capacity=1000, workdir=tmp_path),
        max_jobs_cap=200,
        ramp_step=2,
        hold=1.0,
        tone_frame_ms=100,
        ramp_to_limit=True,
    )
    got = await limit.media_rooms(bench)  # type: ignore[arg-type]
    assert got["held"] == 4 and got["unit"] == "rooms"
    assert got["stopped_by"] == "behind" and got["limit_found"]
    assert "0.50x the audio sent" in got["stop_reason"]
    held = got["steps"][1]
    assert held["target"] == 4 and held["jobs_behind"] == 0
    assert held["observer_processes"] == 2  # one per step, each with the step's rooms
    assert "observers_cpu_percent" in got["at_stop"]
    assert all(o.closed and o.kwargs["frame_ms"] == 100 for o in FakeObservers.made)


def _ramp(held: int, found: bool, kind: str = "agent_not_in") -> dict[str, Any]:
    stop = (kind, "why") if found else ("cap", "the ceiling of 100 reached")
    steps = [
        {
            "target": held + 25,
            "host": {"host_cpu_percent": 180.5, "machine_cpu_percent": 97.0, "host_pss_mb": 4321.0},
        }
    ]
    return limit.summary(held, 1000, steps, stop)


def _results(lkrun: dict[str, Any], official: dict[str, Any], key: str = "max_jobs") -> Any:
    workload = "media" if key == "media_rooms" else "agents"
    runs = {
        "lkrun-warm": {"system": "lkrun", "ok": True, key: lkrun},
        "official-warm": {"system": "official", "ok": True, key: official},
    }
    settings = {"max_jobs_cap": 1000, "ramp_step": 25, "ramp_to_limit": True, "concurrency": []}
    return {"meta": {}, "workloads": {workload: {"settings": settings, "runs": runs}}}


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_the_row_says_the_real_limit_when_both_hosts_reached_it() -> None:
    results = _results(_ramp(300, True), _ramp(125, True, "dropped"))
    text = report.markdown(results)
    row = _line(text, "| max concurrent AgentSession jobs held")
    assert row.startswith("| max concurrent AgentSession jobs held (the real limit) |")
    assert "capped" not in row and "| 2.40 |" in row
    goal = _line(text, "| max concurrent AgentSession jobs held | lkrun ≥ 2 x official")
    assert "300 vs 125, 2.40: met" in goal
    stopped = _line(text, "| official-warm | 125 |")
    assert "the real limit: a held job dropped at 150: why" in stopped
    assert "| 180.5 | 97.0 |" in stopped and "4,321.0" in stopped


def test_a_capped_host_makes_the_row_say_capped_and_the_ratio_a_bound() -> None:
    results = _results(_ramp(1000, False), _ramp(125, True))
    text = report.markdown(results)
    row = _line(text, "| max concurrent AgentSession jobs held")
    assert "(capped: not every host reached its limit)" in row and "≥ 8.00" in row
    assert "capped: the ceiling" in _line(text, "| max jobs ramp: what stopped it")
    goal = _line(text, "| max concurrent AgentSession jobs held | lkrun ≥ 2 x official")
    assert "met (lkrun capped)" in goal


def test_the_media_row_is_the_rooms_held_with_no_job_behind() -> None:
    results = _results(_ramp(24, True, "behind"), _ramp(12, True, "behind"), "media_rooms")
    text = report.markdown(results)
    row = _line(text, "| media rooms held with no job behind")
    assert "(the real limit)" in row and "| 2.00 |" in row
    goal = _line(text, "| media rooms held with no job behind | lkrun ≥ 1.5 x official")
    assert "24 vs 12, 2.00: met" in goal
    assert "no job behind at 50 rooms" not in text  # no fixed levels in this run


def test_ramp_to_limit_raises_the_ceiling_and_lkrun_s_max_jobs(tmp_path: Path) -> None:
    args = run.parse_args(["--workload", "agents,media", "--ramp-to-limit"])
    agents, rooms = run._settings(args, "agents"), run._settings(args, "media")
    assert agents.max_jobs_cap == limit.JOBS_CEILING and agents.ramp_step == 10
    assert agents.concurrency == [1, 10, 50] and agents.ramp_to_limit
    assert rooms.max_jobs_cap == limit.ROOMS_CEILING and rooms.ramp_step == 4
    assert rooms.concurrency == [] and rooms.tone_frame_ms == 100
    given = run.parse_args(["--ramp-to-limit", "--max-jobs-cap", "300", "--concurrency", "0"])
    assert run._settings(given, "agents").max_jobs_cap == 300
    assert run._settings(given, "agents").concurrency == []
    sut = run._make_sut("lkrun", "warm", "agents", args, None, None, tmp_path, tmp_path, None)  # type: ignore[arg-type]
    assert isinstance(sut, LkrunSut)
    assert f"max_jobs = {limit.JOBS_CEILING}" in sut.manifest_text()
    plain = run.parse_args(["--workload", "agents"])
    sut = run._make_sut("lkrun", "warm", "agents", plain, None, None, tmp_path, tmp_path, None)  # type: ignore[arg-type]
    assert "max_jobs = 200" in sut.manifest_text()  # type: ignore[union-attr]


def test_tone_frames_of_100_ms_are_a_second_in_ten() -> None:
    from tests.bench import tones

    frames = tones.tone_frames(100)
    assert len(frames) == 10
    assert all(f.samples_per_channel == 4800 for f in frames)
    assert tones.parse_args(["--frame-ms", "100", "r1", "r2"]).rooms == ["r1", "r2"]


def test_a_server_refusal_is_where_the_ramp_stops() -> None:
    """Found in a run: at 125 official jobs CreateDispatch failed with "could not find any
    available nodes" (the node's CPU full) and the whole bench stopped instead of recording
    the limit."""
    from livekit.api.twirp_client import ServerError

    from tests.bench import limit

    exc = ServerError("unknown", "could not find any available nodes", status=500)
    reason, text = limit.server_full(exc, 100)
    assert reason == "server_refused"
    assert text.startswith("with 100 held") and "available nodes" in text
    assert limit.summary(100, 1000, [], (reason, text))["limit_found"]
