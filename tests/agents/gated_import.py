"""An agent module whose import in a fork server waits until a file exists, so a test decides
when the fork server has loaded (LKRUN_TEST_IMPORT_GATE: the file's path; unset: no wait).
Other imports (the daemon's import check before it serves) do not wait."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lkrun.context import JobContext

_main = getattr(sys.modules.get("__main__"), "__spec__", None)
_in_zygote = _main is not None and _main.name == "lkrun.child.zygote"
_gate = os.environ.get("LKRUN_TEST_IMPORT_GATE") if _in_zygote else None
_deadline = time.monotonic() + 120  # a test that never opens the gate must not hang forever
while _gate and not Path(_gate).exists() and time.monotonic() < _deadline:
    time.sleep(0.02)


async def entrypoint(ctx: JobContext) -> None:
    print("the entrypoint ran")
