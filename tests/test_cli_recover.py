"""`lkrun recover --state-dir` without a server: its refusals, the jobs it leaves alone by
policy or because they were being stopped, decided before LiveKit is asked anything, and
what a second run retries (LiveKit is unreachable here: each redispatch is an error). The
redispatches themselves are tested against the real livekit-server in
tests/test_restart_recovery.py."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from lkrun.cli import app
from lkrun.jobs.statelock import LOCK_NAME, StateLock
from lkrun.jobs.store import JobStore

ENV = {"LIVEKIT_URL": "ws://127.0.0.1:9", "LIVEKIT_API_KEY": "k", "LIVEKIT_API_SECRET": "s"}


def recover(*args: str) -> Result:
    return CliRunner().invoke(app, ["recover", *args], env=ENV)


def running(job_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": job_id,
        "agent": "echo",
        "agent_name": "echo",
        "room": f"room-{job_id}",
        "identity": f"echo-{job_id}",
        "status": "running",
        "accepted_at": 1.0,
        "daemon_pid": 999_999_999,  # no such process: its daemon is gone
        **fields,
    }


@pytest.fixture
def state(tmp_path: Path) -> Path:
    store = JobStore(tmp_path / "jobs.db")
    store.open()
    store.upsert(running("AJ_off"))  # the default policy, recorded: none
    store.upsert(running("AJ_spent", on_failure="redispatch", max_redispatches=1, attempt=1))
    store.upsert({**running("AJ_done"), "status": "success", "ended_at": 2.0})
    store.close()
    return tmp_path


@pytest.mark.parametrize("forced", [(), ("--max-redispatches", "3")])  # not even when forced
def test_a_job_being_stopped_on_purpose_is_not_redispatched(
    tmp_path: Path, forced: tuple[str, ...]
) -> None:
    store = JobStore(tmp_path / "jobs.db")
    store.open()
    on = {"on_failure": "redispatch", "max_redispatches": 2}
    store.upsert(running("AJ_killed", status="stopping", stop_cause="killed", **on))
    store.close()
    result = recover("--state-dir", str(tmp_path), "--json", *forced)
    assert result.exit_code == 0, result.output
    [job] = json.loads(result.stdout)["jobs"]
    assert (job["id"], job["redispatched"], job["skip"]) == ("AJ_killed", False, "stopped")


def test_a_directory_without_a_history_is_a_usage_error(tmp_path: Path) -> None:
    result = recover("--state-dir", str(tmp_path))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"error: no job history at {tmp_path / 'jobs.db'}: is {tmp_path} an lkrun state "
        "directory? (if its [daemon] database is elsewhere, give it with --database)"
    ]
    missing = recover("--state-dir", str(tmp_path), "--database", str(tmp_path / "no.db"))
    assert (missing.exit_code, missing.stderr.strip()) == (
        2,
        f"error: no job history at {tmp_path / 'no.db'}",
    )


def test_a_history_elsewhere_is_given_with_database(tmp_path: Path) -> None:
    """[daemon] database outside the state directory: the lock is the directory's."""
    state, history = tmp_path / "state", tmp_path / "elsewhere" / "history.db"
    store = JobStore(history)
    store.open()
    store.upsert(running("AJ_off"))
    store.close()
    state.mkdir()
    result = recover("--state-dir", str(state), "--database", str(history), "--json")
    assert result.exit_code == 0, result.output
    assert [j["id"] for j in json.loads(result.stdout)["jobs"]] == ["AJ_off"]
    lock = StateLock.acquire(state)  # the daemon's lock is on the directory, as always
    try:
        busy = recover("--state-dir", str(state), "--database", str(history))
    finally:
        lock.release()
    assert busy.exit_code == 1 and "held by a live lkrun daemon" in busy.stderr


def test_refused_in_one_line_while_a_daemon_holds_the_directory(state: Path) -> None:
    lock = StateLock.acquire(state)  # as a live daemon does for its life
    try:
        result = recover("--state-dir", str(state))
    finally:
        lock.release()
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {state} is held by a live lkrun daemon (pid ")
    # Nothing was touched: the jobs still run as far as the history knows.
    store = JobStore(state / "jobs.db")
    store.open(daemon_alive=lambda pid: True)
    try:
        assert store.get("AJ_off")["status"] == "running"
    finally:
        store.close()


def test_the_recorded_policy_decides_and_its_refusals_stand_on_a_second_run(
    state: Path,
) -> None:
    result = recover("--state-dir", str(state), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["state_dir"] == str(state)
    decided = {j["id"]: (j["redispatched"], j["skip"]) for j in report["jobs"]}
    assert decided == {
        "AJ_off": (False, "policy_off"),
        "AJ_spent": (False, "max_redispatches"),  # the call had its redispatch
    }
    store = JobStore(state / "jobs.db")
    store.open()
    try:
        off = store.get("AJ_off")
        assert (
            off["status"] == "lost" and off["recovery"] == 'not redispatched: on_failure is "none"'
        )
        assert store.get("AJ_done")["status"] == "success"
    finally:
        store.close()
    # The policy's refusals are final unless --max-redispatches overrides it.
    again = recover("--state-dir", str(state))
    assert again.exit_code == 0
    assert again.stdout.strip() == (
        f"{state}: no running job, nor lost job to retry, in its history: nothing to do"
    )


def test_max_redispatches_overrides_the_recorded_policy(state: Path) -> None:
    result = recover("--state-dir", str(state), "--max-redispatches", "1", "--json")
    decided = {
        j["id"]: j["skip"] for j in json.loads(result.stdout)["jobs"] if not j["redispatched"]
    }
    # AJ_off would be redispatched (LiveKit here is unreachable: error); AJ_spent's call
    # already had one redispatch.
    assert decided == {"AJ_off": "error", "AJ_spent": "max_redispatches"}
    assert result.exit_code == 1  # LiveKit could not be asked: worth running again


def test_a_run_that_could_not_reach_livekit_can_be_run_again(state: Path) -> None:
    """Each run retries what LiveKit was not asked about; --max-redispatches applies again
    to what the policy refused; a final answer is not asked again."""

    def decided(*args: str) -> tuple[int, dict[str, str | None]]:
        result = recover("--state-dir", str(state), "--json", *args)
        return result.exit_code, {j["id"]: j["skip"] for j in json.loads(result.stdout)["jobs"]}

    assert decided("--max-redispatches", "1") == (
        1,
        {"AJ_off": "error", "AJ_spent": "max_redispatches"},
    )
    # Again, forced: the error is retried, and the refusal too (the call had its one).
    assert decided("--max-redispatches", "1") == (
        1,
        {"AJ_off": "error", "AJ_spent": "max_redispatches"},
    )
    # Forced further: both are tried (LiveKit still unreachable).
    assert decided("--max-redispatches", "2") == (1, {"AJ_off": "error", "AJ_spent": "error"})
    # By the recorded policy now: the errors are retried and the policy refuses them.
    assert decided() == (0, {"AJ_off": "policy_off", "AJ_spent": "max_redispatches"})
    assert decided() == (0, {})


def test_only_lost_jobs_without_a_final_answer_are_retried(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.db")
    store.open()
    on = {"on_failure": "redispatch", "max_redispatches": 2, "status": "lost", "ended_at": 2.0}
    store.upsert(running("AJ_error", recovery="not redispatched: x", recovery_skip="error", **on))
    store.upsert(running("AJ_undecided", **on))  # its daemon died before deciding
    store.upsert(
        running("AJ_left", recovery="not redispatched: y", recovery_skip="no_caller", **on)
    )
    store.upsert(running("AJ_done", recovery="redispatched as attempt 1 (dispatch AD_1)", **on))
    # Decided as an error, but replaced all the same (its daemon's own restart did it).
    store.upsert(
        running("AJ_replaced", recovery="not redispatched: z", recovery_skip="error", **on)
    )
    store.upsert(running("AJ_next", recovered_from="AJ_replaced", attempt=1, status="success"))
    store.close()
    result = recover("--state-dir", str(tmp_path), "--json")
    assert result.exit_code == 1  # LiveKit is not reachable here
    assert sorted(j["id"] for j in json.loads(result.stdout)["jobs"]) == [
        "AJ_error",
        "AJ_undecided",
    ]
    store = JobStore(tmp_path / "jobs.db")
    store.open()
    try:
        row = store.get("AJ_undecided") or {}
        assert (row["recovery_skip"], row["status"]) == ("error", "lost")
    finally:
        store.close()


def test_a_directory_last_held_on_another_host_is_refused_unless_told(state: Path) -> None:
    """From here the dead daemon's lock and pid prove nothing: it may live on its host."""
    (state / LOCK_NAME).write_text("4242\nhost-7\n")
    result = recover("--state-dir", str(state), "--json")
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {state} was last held by a daemon on host 'host-7', not")
    store = JobStore(state / "jobs.db")
    store.open(daemon_alive=lambda pid: True)
    try:
        assert store.get("AJ_off")["status"] == "running"  # untouched
    finally:
        store.close()
    told = recover("--state-dir", str(state), "--json", "--other-host")
    assert told.exit_code == 0, told.output
    assert {j["id"] for j in json.loads(told.stdout)["jobs"]} == {"AJ_off", "AJ_spent"}
    # An older lkrun's lock file names no host: as before.
    (state / LOCK_NAME).write_text("4242\n")
    assert recover("--state-dir", str(state)).exit_code == 0


def test_what_the_recoverer_says_besides_its_decisions_is_shown() -> None:
    """A ghost left in a room, a recovery that failed unexpectedly: on stderr. The
    decisions are the report's, not printed twice."""
    from lkrun.cli.recover import _side_notes

    handler = _side_notes()

    def record(level: int, msg: str, **fields: Any) -> logging.LogRecord:
        made = logging.LogRecord("lkrun.recovery", level, __file__, 1, msg, None, None)
        made.fields = fields
        return made

    ghost = record(logging.WARNING, "could not remove 'x'", ghosts=["x"], error="e")
    decision = record(logging.WARNING, "job AJ_1 ... not redispatched", decision="none")
    assert handler.filter(ghost) and not handler.filter(decision)
    assert not handler.filter(record(logging.DEBUG, "no recovery"))
    assert handler.format(ghost) == "warning: could not remove 'x'"
