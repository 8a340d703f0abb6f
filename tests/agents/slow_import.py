"""An agent module that takes a while to import, like one that loads a model at import."""

from __future__ import annotations

import time

from lkrun.context import JobContext

time.sleep(1.5)


async def entrypoint(ctx: JobContext) -> None:
    print("the entrypoint ran")
