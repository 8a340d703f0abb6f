"""The load reported to LiveKit, and the CPU monitor it reads."""

from __future__ import annotations

import asyncio
import math
from collections import namedtuple
from pathlib import Path

import pytest

from lkrun import load
from lkrun.load import TARGET_LOAD, CpuMonitor, WorkerLoad, agent_load

CpuTimes = namedtuple("CpuTimes", "user nice system idle iowait guest guest_nice")


@pytest.mark.parametrize(
    ("jobs", "max_jobs", "cpu", "overloaded", "draining", "expected"),
    [
        pytest.param(0, 4, 0.0, False, False, WorkerLoad(False, 0.0, 0), id="idle"),
        pytest.param(2, 4, 0.1, False, False, WorkerLoad(False, 0.39, 2), id="half jobs"),
        pytest.param(1, 4, 0.4, False, False, WorkerLoad(False, 0.44, 1), id="half cpu"),
        pytest.param(4, 4, 0.0, False, False, WorkerLoad(True, 1.0, 4, "max_jobs"), id="max jobs"),
        pytest.param(5, 4, 0.0, False, False, WorkerLoad(True, 1.0, 5, "max_jobs"), id="over max"),
        # A busy CPU alone raises the load (at most CPU_MAX of the way) but leaves the agent
        # available...
        pytest.param(0, 4, 0.95, False, False, WorkerLoad(False, 0.52, 0), id="cpu peak"),
        # ...until it has stayed busy (CpuPressure decides).
        pytest.param(0, 4, 0.95, True, False, WorkerLoad(True, 1.0, 0, "cpu"), id="cpu sustained"),
        pytest.param(0, 4, 0.0, False, True, WorkerLoad(True, 1.0, 0, "draining"), id="draining"),
        pytest.param(3, 4, 0.0, True, True, WorkerLoad(True, 1.0, 3, "draining"), id="drain first"),
        pytest.param(3, 4, 0.799, False, False, WorkerLoad(False, 0.66, 3), id="nearly full"),
        pytest.param(0, 4, -0.5, False, False, WorkerLoad(False, 0.0, 0), id="odd cpu clamped"),
    ],
)
def test_agent_load(
    jobs: int, max_jobs: int, cpu: float, overloaded: bool, draining: bool, expected: WorkerLoad
) -> None:
    got = agent_load(
        jobs=jobs,
        max_jobs=max_jobs,
        cpu=cpu,
        load_threshold=0.8,
        cpu_overloaded=overloaded,
        draining=draining,
    )
    assert got == WorkerLoad(
        expected.full,
        pytest.approx(expected.load),  # type: ignore[arg-type]
        expected.job_count,
        expected.reason,
    )


@pytest.mark.parametrize("cpu", [0.5, 0.75, 1.0])
def test_jobs_still_count_on_a_busy_cpu(cpu: float) -> None:
    """Two daemons on equally busy hosts must differ by the jobs they run, or LiveKit
    cannot spread jobs between them: the jobs, reserved ones too, raise the load (in steps
    of 0.01), even with the CPU at or over load_threshold (it used to cap every load)."""
    loads = [
        agent_load(jobs=n, max_jobs=100, cpu=cpu, load_threshold=0.75, draining=False).load
        for n in range(50)
    ]
    assert loads == sorted(loads) and len(set(loads)) >= 8, loads


@pytest.mark.parametrize("cpus", [(0.0, 0.0), (0.6, 0.95), (0.8, 1.0)])
def test_hosts_whose_cpu_is_at_the_cap_report_the_same_load(cpus: tuple[float, float]) -> None:
    """livekit-server gives every request of a fast burst to the node with the lower load
    and splits only a tie: two busy CPUs read a moment apart, with as many jobs, make the
    same load to the bit (LiveKit compares float32 sums of them), and the jobs decide."""
    a, b = (
        agent_load(jobs=7, max_jobs=100, cpu=c, load_threshold=0.75, draining=False).load
        for c in cpus
    )
    assert a == b


def test_the_cpu_counts_at_most_cpu_max_of_the_way() -> None:
    assert load.cpu_part(2.0) == load.cpu_part(0.75) == load.CPU_MAX == 0.75
    assert load.cpu_part(0.3) == 0.3 and load.cpu_part(-1.0) == 0.0


def test_cpu_off_counts_only_jobs() -> None:
    """load_threshold = "off": a machine at 100 % CPU is not full; max_jobs still is."""
    busy = agent_load(jobs=1, max_jobs=4, cpu=1.0, load_threshold=math.inf, draining=False)
    assert busy == WorkerLoad(False, 0.17, 1)
    full = agent_load(jobs=4, max_jobs=4, cpu=1.0, load_threshold=math.inf, draining=False)
    assert full.full


def test_available_load_stays_below_target() -> None:
    """Any load at or above TARGET_LOAD would stop the server sending jobs at all."""
    for max_jobs in (1, 2, 3, 7, 100):
        for jobs in range(max_jobs):
            for step in range(101):
                got = agent_load(
                    jobs=jobs, max_jobs=max_jobs, cpu=step / 100, load_threshold=0.9, draining=False
                )
                assert not got.full
                assert 0.0 <= got.load < TARGET_LOAD


def pressure(clock: FakeClock, **settings: float) -> load.CpuPressure:
    return load.CpuPressure(clock=clock, **settings)


def test_a_single_busy_sample_does_not_overload_the_cpu() -> None:
    clock = FakeClock()
    cpu = pressure(clock, threshold=0.75, overload_after=10.0, window=5.0)
    cpu.observe(1.0)  # one sample at 100 %
    assert not cpu.overloaded
    clock.now += 1
    cpu.observe(0.2)
    assert not cpu.overloaded and cpu.high_for() == 0.0
    assert cpu.level == pytest.approx(0.6)  # smoothed over the window


def test_a_sustained_busy_cpu_overloads_and_a_dip_starts_over() -> None:
    clock = FakeClock()
    cpu = pressure(clock, threshold=0.75, overload_after=10.0, window=5.0)
    for _ in range(10):
        cpu.observe(0.9)
        clock.now += 1
    assert cpu.high_for() == 10.0 and cpu.overloaded
    assert "for 10s (now 90%)" in cpu.why()
    cpu.observe(0.5)  # one sample below: the run is over
    assert not cpu.overloaded
    cpu.observe(0.9)
    clock.now += 9
    assert not cpu.overloaded


def test_overload_off_never_overloads_and_the_window_forgets() -> None:
    clock = FakeClock()
    cpu = pressure(clock, threshold=0.75, overload_after=math.inf, window=5.0)
    for _ in range(100):
        cpu.observe(1.0)
        clock.now += 1
    assert not cpu.overloaded
    for _ in range(6):
        cpu.observe(0.0)
        clock.now += 1
    assert cpu.level == 0.0  # the busy samples left the window
    assert not pressure(clock, threshold=math.inf).overloaded


def test_a_load_update_is_worth_sending_only_when_it_changed_enough() -> None:
    base = WorkerLoad(False, 0.30, 1)
    assert base.differs(None)
    assert not WorkerLoad(False, 0.33, 1).differs(base)  # CPU jitter
    assert WorkerLoad(False, 0.36, 1).differs(base)
    assert WorkerLoad(False, 0.30, 2).differs(base)  # a job more
    assert WorkerLoad(True, 1.0, 1, "cpu").differs(WorkerLoad(True, 1.0, 1, "max_jobs"))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write_cgroup(root: Path, *, cpu_max: str = "50000 100000", usage_usec: int = 0) -> None:
    root.mkdir(exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    (root / "cpu.stat").write_text(
        f"usage_usec {usage_usec}\nuser_usec {usage_usec // 2}\nsystem_usec 0\n"
    )


@pytest.fixture
def host_times(monkeypatch: pytest.MonkeyPatch) -> list[CpuTimes]:
    """Host CPU readings the monitor will take, in order (the last one repeats)."""
    readings: list[CpuTimes] = []

    def cpu_times() -> CpuTimes:
        return readings.pop(0) if len(readings) > 1 else readings[0]

    monkeypatch.setattr(load.psutil, "cpu_times", cpu_times)
    return readings


def test_cgroup_quota(tmp_path: Path) -> None:
    clock = FakeClock()
    write_cgroup(tmp_path, usage_usec=1_000_000)
    monitor = CpuMonitor(cgroup_root=tmp_path, clock=clock)
    assert monitor.value == 0.0
    assert monitor.sample() == 0.0  # the first reading is only a baseline

    # Half a CPU allowed; 0.25 CPU-seconds used in 1 s is half of it.
    clock.now += 1.0
    write_cgroup(tmp_path, usage_usec=1_250_000)
    assert monitor.sample() == pytest.approx(0.5)
    assert monitor.value == pytest.approx(0.5)

    clock.now += 2.0
    write_cgroup(tmp_path, usage_usec=1_350_000)
    assert monitor.sample() == pytest.approx(0.1)


def test_cgroup_over_quota_is_clamped(tmp_path: Path) -> None:
    clock = FakeClock()
    write_cgroup(tmp_path, usage_usec=0)
    monitor = CpuMonitor(cgroup_root=tmp_path, clock=clock)
    monitor.sample()
    clock.now += 1.0
    write_cgroup(tmp_path, usage_usec=2_000_000)
    assert monitor.sample() == 1.0


def test_cgroup_no_elapsed_time_keeps_value(tmp_path: Path) -> None:
    clock = FakeClock()
    write_cgroup(tmp_path, usage_usec=0)
    monitor = CpuMonitor(cgroup_root=tmp_path, clock=clock)
    monitor.sample()
    clock.now += 1.0
    write_cgroup(tmp_path, usage_usec=100_000)
    assert monitor.sample() == pytest.approx(0.2)
    write_cgroup(tmp_path, usage_usec=300_000)
    assert monitor.sample() == pytest.approx(0.2)


def test_quota_change_restarts_baseline(tmp_path: Path) -> None:
    clock = FakeClock()
    write_cgroup(tmp_path, usage_usec=0)
    monitor = CpuMonitor(cgroup_root=tmp_path, clock=clock)
    monitor.sample()
    clock.now += 1.0
    write_cgroup(tmp_path, cpu_max="200000 100000", usage_usec=250_000)
    assert monitor.sample() == 0.0  # new capacity: only a baseline
    clock.now += 1.0
    write_cgroup(tmp_path, cpu_max="200000 100000", usage_usec=1_250_000)
    assert monitor.sample() == pytest.approx(0.5)


def test_unlimited_quota_uses_host(tmp_path: Path, host_times: list[CpuTimes]) -> None:
    write_cgroup(tmp_path, cpu_max="max 100000", usage_usec=0)
    host_times += [
        CpuTimes(100.0, 0.0, 50.0, 800.0, 50.0, 0.0, 0.0),
        # +30 user, +10 system, +50 idle, +10 iowait: 40 busy of 100.
        CpuTimes(130.0, 0.0, 60.0, 850.0, 60.0, 0.0, 0.0),
    ]
    monitor = CpuMonitor(cgroup_root=tmp_path)
    assert monitor.sample() == 0.0
    assert monitor.sample() == pytest.approx(0.4)


def test_guest_time_is_not_counted_twice(tmp_path: Path, host_times: list[CpuTimes]) -> None:
    host_times += [
        CpuTimes(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        # 20 user of which 10 guest, 80 idle: 20 busy of 100.
        CpuTimes(20.0, 0.0, 0.0, 80.0, 0.0, 10.0, 0.0),
    ]
    monitor = CpuMonitor(cgroup_root=tmp_path / "missing")
    monitor.sample()
    assert monitor.sample() == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("cpu_max", "cpu_stat"),
    [
        pytest.param(None, None, id="missing dir"),
        pytest.param("garbage", "usage_usec 5\n", id="odd cpu.max"),
        pytest.param("50000 100000", None, id="missing cpu.stat"),
        pytest.param("50000 100000", "user_usec 5\n", id="no usage_usec"),
        pytest.param("50000 100000", "usage_usec lots\n", id="odd usage_usec"),
        pytest.param("0 100000", "usage_usec 5\n", id="zero quota"),
    ],
)
def test_odd_cgroup_falls_back_to_host(
    tmp_path: Path, host_times: list[CpuTimes], cpu_max: str | None, cpu_stat: str | None
) -> None:
    root = tmp_path / "cg"
    if cpu_max is not None:
        root.mkdir()
        (root / "cpu.max").write_text(cpu_max)
        if cpu_stat is not None:
            (root / "cpu.stat").write_text(cpu_stat)
    host_times += [
        CpuTimes(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
        CpuTimes(25.0, 0.0, 0.0, 75.0, 0.0, 0.0, 0.0),
    ]
    monitor = CpuMonitor(cgroup_root=root)
    monitor.sample()
    assert monitor.sample() == pytest.approx(0.25)


def test_host_read_failure_keeps_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> CpuTimes:
        raise OSError("no /proc")

    monkeypatch.setattr(load.psutil, "cpu_times", broken)
    monitor = CpuMonitor(cgroup_root=tmp_path)
    assert monitor.sample() == 0.0
    assert monitor.sample() == 0.0


def test_real_host_sample_is_a_fraction() -> None:
    monitor = CpuMonitor()
    monitor.sample()
    sum(i * i for i in range(200_000))  # some work between the readings
    assert 0.0 <= monitor.sample() <= 1.0


async def test_run_samples_until_cancelled(tmp_path: Path) -> None:
    clock = FakeClock()
    write_cgroup(tmp_path, usage_usec=0)
    monitor = CpuMonitor(0.01, cgroup_root=tmp_path, clock=clock)
    task = asyncio.create_task(monitor.run())
    await asyncio.sleep(0.005)  # the first sample is taken at once
    clock.now += 1.0
    write_cgroup(tmp_path, usage_usec=300_000)
    for _ in range(200):
        if monitor.value:
            break
        await asyncio.sleep(0.005)
    assert monitor.value == pytest.approx(0.6)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
