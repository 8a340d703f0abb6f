"""How a job ended, decided in one place (lifecycle.conclude): every path to every status
and cause, from plain facts, in microseconds. (test_lifecycle.py shows the same ends
against a real livekit-server.)"""

from __future__ import annotations

import pytest

from lkrun.jobs.fields import JobStatus
from lkrun.shared import jobpipe
from lkrun.shared.jobpipe import RoomGone
from lkrun.supervision.lifecycle import (
    Asked,
    Cause,
    Done,
    Facts,
    Phase,
    Verdict,
    conclude,
    status_of,
)

SUCCESS, FAILED = JobStatus.SUCCESS, JobStatus.FAILED
GONE = RoomGone(room="talk", assigned_sid="RM_a", joined_sid="RM_b")

# What lkrun asks, worded as the daemon words it.
TERMINATE = Asked(Cause.TERMINATED, "terminated by LiveKit")
JOBS_KILL = Asked(Cause.KILLED, "stopped by `lkrun jobs kill`")
FORCE_KILL = Asked(Cause.KILLED, "killed by `lkrun jobs kill --force`", force=True)
MEMORY = Asked(Cause.MEMORY_LIMIT, "memory limit exceeded: 170 MB > 150", force=True)
TIMEOUT = Asked(Cause.JOB_TIMEOUT, "job exceeded job_timeout=2s")
SHUTDOWN = Asked(Cause.DRAIN, "daemon shutting down")
THIRD_SIGNAL = Asked(Cause.DRAIN, "daemon received a third stop signal", force=True)
REFUSED = Asked(Cause.START_FAILED, "job process speaks job protocol 2", force=True)
LAUNCH = Asked(Cause.START_FAILED, "cannot start job process: denied", force=True)


def overdue(first: Asked, timeout: str = "1s") -> Asked:
    """JobProcess ending a job that did not stop in time: the stop's cause, by force."""
    why = f"did not stop within {timeout} of a shutdown request ({first.reason})"
    return Asked(first.cause, why, force=True)


OK = Done(ok=True, reason="room disconnected (CLIENT_INITIATED)")
EMPTY = Done(ok=True, reason="room empty", cause="room_empty")
CASES: list[tuple[str, Facts, Verdict]] = [
    # -- the job ended itself
    ("the entrypoint returned", Facts(exit_code=0, running=True, done=Done(ok=True)),
     Verdict(SUCCESS, Cause.CLEAN)),
    ("it ended with a reason", Facts(exit_code=0, running=True, done=OK),
     Verdict(SUCCESS, Cause.CLEAN, OK.reason)),
    ("alone for empty_timeout",
     Facts(exit_code=0, running=True, done=Done(ok=True, reason="room empty", cause="room_empty")),
     Verdict(SUCCESS, Cause.ROOM_EMPTY, "room empty")),
    ("alone, and LiveKit terminated it on its way out",
     Facts((TERMINATE,), 0, True, Done(ok=True, reason="room empty", cause="room_empty")),
     Verdict(SUCCESS, Cause.ROOM_EMPTY, "room empty")),
    ("over memory_limit_mb as it left its empty room",
     Facts((MEMORY,), -15, True, Done(ok=True, reason="room empty", cause="room_empty")),
     Verdict(FAILED, Cause.MEMORY_LIMIT, MEMORY.reason, MEMORY.reason)),
    ("alone, and killed for not stopping after LiveKit terminated it: its done stands",
     Facts((TERMINATE, overdue(TERMINATE)), -15, True, EMPTY),
     Verdict(SUCCESS, Cause.ROOM_EMPTY, "room empty")),
    ("alone, and killed at the daemon's third signal: its done stands",
     Facts((THIRD_SIGNAL,), -15, True, EMPTY),
     Verdict(SUCCESS, Cause.ROOM_EMPTY, "room empty")),
    ("alone, as `jobs kill` crossed its done", Facts((JOBS_KILL,), 0, True, EMPTY),
     Verdict(SUCCESS, Cause.ROOM_EMPTY, "room empty")),
    ("alone, as the daemon's shutdown crossed its done", Facts((SHUTDOWN,), 0, True, EMPTY),
     Verdict(SUCCESS, Cause.ROOM_EMPTY, "room empty")),
    ("a done cause it cannot know is ignored",
     Facts(exit_code=0, running=True, done=Done(ok=True, cause="memory_limit")),
     Verdict(SUCCESS, Cause.CLEAN)),
    ("the entrypoint raised",
     Facts(exit_code=1, running=True, done=Done(ok=False, error="RuntimeError: boom")),
     Verdict(FAILED, Cause.RAISED, error="RuntimeError: boom")),
    ("the job could not be set up: never running",
     Facts(exit_code=1, done=Done(ok=False, error="cannot set up the job: KeyError: 'x'")),
     Verdict(FAILED, Cause.START_FAILED, error="cannot set up the job: KeyError: 'x'")),
    ("its room was deleted before it joined",
     Facts(exit_code=1, running=True, done=Done(ok=False, error=str(GONE), room_gone=GONE)),
     Verdict(FAILED, Cause.ROOM_GONE, error=str(GONE))),
    ("room gone wins over the termination that followed it",
     Facts((TERMINATE,), 1, True, Done(ok=False, error=str(GONE), room_gone=GONE)),
     Verdict(FAILED, Cause.ROOM_GONE, TERMINATE.reason, str(GONE))),
    ("room gone, but over memory_limit_mb first: lkrun's failure wins",
     Facts((MEMORY,), -15, True, Done(ok=False, error=str(GONE), room_gone=GONE)),
     Verdict(FAILED, Cause.MEMORY_LIMIT, MEMORY.reason, MEMORY.reason)),
    # -- its process ended without a proper report, nobody asked
    ("killed by a signal lkrun did not send", Facts(exit_code=-9, running=True),
     Verdict(FAILED, Cause.SIGNAL, error="job process killed by SIGKILL")),
    ("a segfault while loading is a signal too", Facts(exit_code=-11),
     Verdict(FAILED, Cause.SIGNAL, error="job process killed by SIGSEGV")),
    ("a signal with no name", Facts(exit_code=-77, running=True),
     Verdict(FAILED, Cause.SIGNAL, error="job process killed by signal 77")),
    ("exited non-zero", Facts(exit_code=3, running=True),
     Verdict(FAILED, Cause.EXIT, error="job process exited with code 3")),
    ("exited zero without done", Facts(exit_code=0, running=True),
     Verdict(FAILED, Cause.EXIT, error="job process exited without reporting a result")),
    ("its fork server exited: no exit code", Facts(exit_code=None, running=True),
     Verdict(FAILED, Cause.EXIT, error="job process ended without reporting a result "
             "(its fork server exited)")),
    ("a bare ok=false says nothing",
     Facts(exit_code=2, running=True, done=Done(ok=False), last_log_line="Traceback"),
     Verdict(FAILED, Cause.EXIT, error="job process exited with code 2 (last log line: "
             "Traceback)")),
    ("exited before running", Facts(exit_code=1, last_log_line="ImportError: x"),
     Verdict(FAILED, Cause.START_FAILED, error="job process exited with code 1 "
             "(last log line: ImportError: x)")),
    # -- lkrun could not start it
    ("no process could be launched", Facts((LAUNCH,)),
     Verdict(FAILED, Cause.START_FAILED, LAUNCH.reason, LAUNCH.reason)),
    ("refused: another protocol", Facts((REFUSED,), exit_code=-15),
     Verdict(FAILED, Cause.START_FAILED, REFUSED.reason, REFUSED.reason)),
    ("terminated while launching, then the launch failed", Facts((TERMINATE, LAUNCH)),
     Verdict(FAILED, Cause.TERMINATED, TERMINATE.reason, LAUNCH.reason)),
    # -- the operator
    ("`jobs kill`: it shut down", Facts((JOBS_KILL,), 0, True, OK),
     Verdict(SUCCESS, Cause.KILLED, JOBS_KILL.reason)),
    ("`jobs kill`: it would not stop", Facts((JOBS_KILL, overdue(JOBS_KILL)), -15, True),
     Verdict(FAILED, Cause.KILLED, JOBS_KILL.reason, overdue(JOBS_KILL).reason)),
    ("`jobs kill --force`: SIGKILLed, and that is the operator's, not a signal",
     Facts((FORCE_KILL,), -9, True),
     Verdict(FAILED, Cause.KILLED, FORCE_KILL.reason, FORCE_KILL.reason)),
    ("`jobs kill --force` fails the job whatever it says", Facts((FORCE_KILL,), 0, True, OK),
     Verdict(FAILED, Cause.KILLED, FORCE_KILL.reason, FORCE_KILL.reason)),
    ("`jobs kill`, then the memory limit: a failure, still the operator's end",
     Facts((JOBS_KILL, MEMORY), -15, True, OK),
     Verdict(FAILED, Cause.KILLED, JOBS_KILL.reason, MEMORY.reason)),
    # -- the limits
    ("over memory_limit_mb", Facts((MEMORY,), -15, True),
     Verdict(FAILED, Cause.MEMORY_LIMIT, MEMORY.reason, MEMORY.reason)),
    ("over memory_limit_mb, SIGKILLed after SIGTERM", Facts((MEMORY,), -9, True),
     Verdict(FAILED, Cause.MEMORY_LIMIT, MEMORY.reason, MEMORY.reason)),
    ("job_timeout: it stopped when asked, and still failed", Facts((TIMEOUT,), 0, True, OK),
     Verdict(FAILED, Cause.JOB_TIMEOUT, TIMEOUT.reason, TIMEOUT.reason)),
    ("job_timeout, then killed for not stopping", Facts((TIMEOUT, overdue(TIMEOUT)), -9, True),
     Verdict(FAILED, Cause.JOB_TIMEOUT, TIMEOUT.reason, TIMEOUT.reason)),
    # -- LiveKit
    ("terminated: it shut down", Facts((TERMINATE,), 0, True, OK),
     Verdict(SUCCESS, Cause.TERMINATED, TERMINATE.reason)),
    ("terminated: it would not stop", Facts((TERMINATE, overdue(TERMINATE)), -15, True),
     Verdict(FAILED, Cause.TERMINATED, TERMINATE.reason, overdue(TERMINATE).reason)),
    ("terminated: its shutdown raised",
     Facts((TERMINATE,), 1, True, Done(ok=False, error="ValueError: in a callback")),
     Verdict(FAILED, Cause.TERMINATED, TERMINATE.reason, "ValueError: in a callback")),
    ("terminated: it crashed on the way out", Facts((TERMINATE,), -11, True),
     Verdict(FAILED, Cause.TERMINATED, TERMINATE.reason, "job process killed by SIGSEGV")),
    ("terminated: it exited without done", Facts((TERMINATE,), 0, True),
     Verdict(FAILED, Cause.TERMINATED, TERMINATE.reason,
             "job process exited without reporting a result")),
    ("terminated before its job began: nothing ran", Facts((TERMINATE,), 0),
     Verdict(SUCCESS, Cause.TERMINATED, TERMINATE.reason)),
    ("terminated before its job began, then killed for not stopping",
     Facts((TERMINATE, overdue(TERMINATE))),
     Verdict(FAILED, Cause.TERMINATED, TERMINATE.reason, overdue(TERMINATE).reason)),
    # Nothing ran and the call wanted no agent any more: the stop stands, as for an exit
    # without done (a crash before any ask is a signal, above).
    ("terminated before its job began, then died by a signal", Facts((TERMINATE,), -11),
     Verdict(SUCCESS, Cause.TERMINATED, TERMINATE.reason)),
    # -- the daemon's drain and shutdown
    ("shut down with the daemon", Facts((SHUTDOWN,), 0, True, OK),
     Verdict(SUCCESS, Cause.DRAIN, SHUTDOWN.reason)),
    ("shut down before its job began", Facts((SHUTDOWN,), 1),
     Verdict(SUCCESS, Cause.DRAIN, SHUTDOWN.reason)),
    ("killed at the third signal", Facts((SHUTDOWN, THIRD_SIGNAL), -15, True),
     Verdict(FAILED, Cause.DRAIN, SHUTDOWN.reason, THIRD_SIGNAL.reason)),
    # JobProcess keeps no ask made after the done: this done came after the kill, from a
    # job that ended well on its SIGTERM.
    ("killed at the third signal, and it said done (ok) before it died",
     Facts((THIRD_SIGNAL,), -15, True, OK),
     Verdict(SUCCESS, Cause.DRAIN, THIRD_SIGNAL.reason)),
]  # fmt: skip


@pytest.mark.parametrize(("facts", "verdict"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_conclude(facts: Facts, verdict: Verdict) -> None:
    assert conclude(facts) == verdict


def test_every_cause_but_lost_has_a_path_and_every_verdict_is_whole() -> None:
    verdicts = [conclude(facts) for _, facts, _ in CASES]
    # Lost is the history's to mark: no process reports a daemon's death.
    assert {v.cause for v in verdicts} == set(Cause) - {Cause.LOST}
    for verdict in verdicts:
        assert (verdict.status is SUCCESS) == (verdict.error == ""), verdict


def test_a_signal_is_a_fact_of_the_exit_code() -> None:
    assert Facts(exit_code=-9).signal == 9
    assert Facts(exit_code=9).signal is None and Facts().signal is None


def test_the_done_message_is_read_strictly() -> None:
    done = Done.parse({"type": "done", "ok": "yes", "error": None, "reason": 3})
    assert done == Done(ok=False, error="", reason="3") and not done.said
    huge = Done.parse({"ok": False, "error": "x" * 10_000, "cause": "room_empty"})
    assert len(huge.error) <= jobpipe.MAX_TEXT and huge.said and huge.cause == "room_empty"
    gone = Done.parse({"ok": False, "error": "e", "room_gone": GONE.fields()})
    assert gone.room_gone == GONE
    assert Done.parse({"ok": False, "room_gone": {"room": 1}}).room_gone is None


@pytest.mark.parametrize(
    ("phase", "status"),
    [
        (Phase.RESERVED, JobStatus.STARTING),
        (Phase.STARTING, JobStatus.STARTING),
        (Phase.RUNNING, JobStatus.RUNNING),
        (Phase.STOPPING, JobStatus.STOPPING),
    ],
)
def test_a_live_job_s_status_is_its_phase_s(phase: Phase, status: JobStatus) -> None:
    assert status_of(phase) is status


def test_an_ended_job_s_status_is_its_verdict_s() -> None:
    assert status_of(Phase.ENDED, Verdict(FAILED, Cause.SIGNAL)) is FAILED
    assert status_of(Phase.ENDED, Verdict(SUCCESS, Cause.CLEAN)) is SUCCESS
    with pytest.raises(ValueError):
        status_of(Phase.ENDED)


def test_causes_are_their_values_as_text() -> None:
    assert str(Cause.MEMORY_LIMIT) == "memory_limit" and f"{Cause.KILLED}" == "killed"
