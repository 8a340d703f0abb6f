"""Tasks started in the background by an object that owns them until they end.

The event loop keeps only weak references to tasks: one nobody holds can vanish mid-way.
BackgroundTasks holds them while they run and lets their owner wait for them, or cancel
them, when it closes. Used by both sides, so it lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

_T = TypeVar("_T")


class BackgroundTasks:
    """A set of running tasks: ``spawn`` adds one, it leaves when done.

    ``on_error(task, exc)``, if given, hears of every task that raised; without it, an
    exception is the business of whoever awaits ``join``/``close`` (which swallow them).
    """

    def __init__(
        self, on_error: Callable[[asyncio.Future[Any], BaseException], None] | None = None
    ) -> None:
        self._tasks: set[asyncio.Future[Any]] = set()
        self._on_error = on_error

    def spawn(self, awaitable: Awaitable[_T], name: str | None = None) -> asyncio.Future[_T]:
        task = asyncio.ensure_future(awaitable)
        if name is not None and isinstance(task, asyncio.Task):
            task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if self._on_error is not None and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self._on_error(task, exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Future[Any]]:
        return iter(list(self._tasks))

    def cancel(self) -> None:
        """Cancel every task; ``join`` waits for them to finish cancelling."""
        for task in list(self._tasks):
            task.cancel()

    async def join(self) -> None:
        """Wait until no task is left, including tasks spawned meanwhile."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self, grace: float | None = 0.0) -> None:
        """Give the tasks ``grace`` seconds to end (None: as long as they take), then
        cancel what is left and wait for it."""
        if grace is None or grace > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.join(), grace)
        self.cancel()
        await self.join()
