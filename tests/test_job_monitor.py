"""Process tree sampling: a job counts what it started; a fork server counts only itself."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lkrun.supervision.job_monitor import TreeSampler, Usage


@pytest.mark.e2e  # a real process tree
def test_a_root_is_sampled_with_or_without_its_descendants() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess; subprocess.run(['sleep', '30'])"]
    )
    try:
        sampler = TreeSampler()

        def whole() -> Usage | None:
            return sampler.sample([(parent.pid, True)]).get(parent.pid)

        deadline = time.monotonic() + 20
        while (usage := whole()) is None or usage.processes < 2:  # until the grandchild runs
            assert time.monotonic() < deadline, "the grandchild did not start"
            time.sleep(0.05)
        alone = sampler.sample([(parent.pid, False)])[parent.pid]
        assert alone.processes == 1 and usage.processes == 2
        assert usage.rss_bytes > alone.rss_bytes
    finally:
        subprocess.run(["pkill", "-P", str(parent.pid)], check=False)
        parent.kill()
        parent.wait()


def test_descendants_come_from_one_map_and_a_cycle_does_not_loop() -> None:
    from lkrun.supervision.job_monitor import _descendants

    children = {1: [2, 3], 2: [4], 4: [1]}  # 4 -> 1: a pid reused while the table was read
    assert sorted(_descendants(1, children)) == [1, 2, 3, 4]
    assert _descendants(1, children)[0] == 1
    assert _descendants(9, children) == [9]
