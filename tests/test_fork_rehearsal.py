"""The fork server's rehearsal of a livekit-agents job's path (lkrun.child.framework.job.
rehearse_in_fork_server): the lazy caches a job would fill after the fork, copying the fork
server's pages, are filled before it, with no thread started."""

from __future__ import annotations

import os
import sys
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
