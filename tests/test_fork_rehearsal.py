"""The fork server's rehearsal of a livekit-agents job's path (lkrun.child.framework.job.
rehearse_in_fork_server): the lazy caches a job would fill after the fork, copying the fork
server's pages, are filled before it, with no thread started and no event loop left
behind."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import BaseModel, PrivateAttr
from pydantic._internal import _fields

from lkrun.child.framework import job


class Model(BaseModel):
    items: list[int] = []
    _seen: set[str] = PrivateAttr(default_factory=set)


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> list[str]:
    return sorted(os.listdir("/proc/self/fd"))


def _current_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop installed in this thread, None if none (RuntimeError: the rehearsal
    cleared it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            return None


@pytest.fixture(autouse=True)
def _as_in_a_fresh_fork_server() -> Iterator[None]:
    """A policy of its own for each test, as a fresh interpreter's: no loop installed, none
    ever set (pytest's is given back after)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the policy API, in 3.14
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.set_event_loop_policy(previous)


def test_rehearsal_fills_the_private_attribute_caches_before_any_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Late(Model):  # no instance made yet: its cache is empty, as in a fresh fork server
        _more: dict[str, Any] = PrivateAttr(default_factory=dict)

    threads = _threads()
    job.rehearse_in_fork_server()
    assert _threads() == threads  # safe before fork: no thread of its own
    calls: list[Any] = []
    original = _fields.takes_validated_data_argument

    def counted(factory: Any) -> Any:
        calls.append(factory)
        return original(factory)

    monkeypatch.setattr(_fields, "takes_validated_data_argument", counted)
    instance = Late(items=[1])
    # No signature taken on the job's first instance (inspect copies sys.modules for a
    # builtin factory's, writing every module object's reference count).
    assert calls == []
    assert instance._seen == set() and instance._more == {}


def test_rehearsal_imports_what_the_framework_imports_lazily(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in job.LAZY_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    job.rehearse_in_fork_server()
    assert all(name in sys.modules for name in job.LAZY_MODULES)


def test_the_rehearsal_leaves_no_event_loop_and_no_fd() -> None:
    fds = _fds()
    assert job.rehearse_in_fork_server() is True  # the AgentSession built: its caches filled
    # Before the fix AgentSession() took asyncio.get_event_loop(), which created and
    # installed a loop: an epoll fd and a socketpair inherited by every job forked after.
    assert _fds() == fds
    assert _current_loop() is None


def test_a_failed_rehearsal_is_a_warning_and_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import livekit.agents

    class Broken:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("no session-17")

    monkeypatch.setattr(livekit.agents, "AgentSession", Broken)
    fds = _fds()
    with caplog.at_level(logging.DEBUG, logger="lkrun.child.framework"):
        assert job.rehearse_in_fork_server() is False
    [record] = [r for r in caplog.records if r.name == "lkrun.child.framework"]
    assert record.levelno == logging.WARNING  # on the fork server's stderr, relayed
    assert any("no session-17" in str(arg) for arg in record.args or ())
    assert _fds() == fds and _current_loop() is None


def test_the_rehearsal_gives_the_session_a_loop_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import livekit.agents

    real = livekit.agents.AgentSession
    loops: list[Any] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        loops.append(kwargs.get("loop"))
        return real(*args, **kwargs)

    monkeypatch.setattr(livekit.agents, "AgentSession", recorded)
    fds = _fds()
    assert job.rehearse_in_fork_server() is True
    [loop] = loops
    assert isinstance(loop, asyncio.AbstractEventLoop) and loop.is_closed()
    assert _fds() == fds and _current_loop() is None
