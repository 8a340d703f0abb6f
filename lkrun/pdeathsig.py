"""Linux's parent-death signal: a child that dies with its parent, even one killed by SIGKILL."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def set_parent_death_signal(sig: signal.Signals, parent: int | None) -> None:
    """In a child: receive ``sig`` when the parent dies; exit now if it already has.

    The signal fires when the *thread* that forked exits, so fork from a long-lived thread.
    """
    prctl = _prctl()
    if prctl is None:
        return
    with contextlib.suppress(OSError):
        prctl(_PR_SET_PDEATHSIG, int(sig))
    if parent is not None and os.getppid() != parent:  # died before prctl took effect
        os._exit(1)


def preexec(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A Popen ``preexec_fn`` that sets the parent-death signal; None off Linux."""
    prctl = _prctl()  # resolved in the parent: the child only makes the call
    if prctl is None:
        return None
    parent = os.getpid()
    number = int(sig)

    def run() -> None:
        prctl(_PR_SET_PDEATHSIG, number)
        if os.getppid() != parent:
            os._exit(1)

    return run
