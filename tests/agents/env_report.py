"""An agent that says which Python environment it runs in (tests/test_python_envs.py).

It joins its room and sets participant attributes: the interpreter, the versions of livekit
(rtc) and numpy it imported, where lkrun's child side came from, and whether it can see a
package only the daemon's env has. Loaded as a file entrypoint, so it imports nothing of
the repository but lkrun's child side.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy
from livekit import rtc

import lkrun
from lkrun.context import JobContext

# typer is a dependency of the daemon (its CLI), never of an agent env.
DAEMON_ONLY = "typer"


def report() -> dict[str, str]:
    return {
        "python": sys.executable,
        "livekit": rtc.__version__,
        "numpy": numpy.__version__,
        "lkrun": lkrun.__file__,
        "sees_daemon_packages": str(importlib.util.find_spec(DAEMON_ONLY) is not None).lower(),
    }


async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
    await ctx.room.local_participant.set_attributes(report())
    ctx.logger.info("reporting %s", report())
