"""Linux process controls: the parent-death signal (a child that dies with its parent, even
one killed by SIGKILL), a daemon that processes of its own user cannot look into, and
signalling a process group."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4


def libc_prctl() -> Callable[..., int] | None:
    """libc's prctl(), on Linux only."""
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
    prctl = libc_prctl()
    if prctl is None:
        return
    with contextlib.suppress(OSError):
        prctl(_PR_SET_PDEATHSIG, int(sig))
    if parent is not None and os.getppid() != parent:  # died before prctl took effect
        os._exit(1)


def make_undumpable() -> bool:
    """Make this process non-dumpable; True if that took effect.

    Every job runs as the daemon's user, and a process of the same user may read another's
    /proc/PID/environ (where LIVEKIT_API_SECRET usually is) and memory, or ptrace it.
    Once non-dumpable, those belong to root. Job processes are exec'd, which makes them
    dumpable again: debugging a job stays possible.
    """
    prctl = libc_prctl()
    if prctl is None:
        return False
    return prctl(_PR_SET_DUMPABLE, 0) == 0


def signal_group(pgid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to process group ``pgid`` (the pid of a process started in a new session
    or group); False if the group is gone or not ours to signal."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def preexec(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A Popen ``preexec_fn`` that sets the parent-death signal; None off Linux."""
    prctl = libc_prctl()  # resolved in the parent: the child only makes the call
    if prctl is None:
        return None
    parent = os.getpid()
    number = int(sig)

    def run() -> None:
        prctl(_PR_SET_PDEATHSIG, number)
        if os.getppid() != parent:
            os._exit(1)

    return run
