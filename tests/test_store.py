"""lkrun.jobs.store: the SQLite job history."""

from __future__ import annotations

import logging
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lkrun.jobs import store as store_module
from lkrun.jobs.book import JobRecord, JobStatus
from lkrun.jobs.store import JOB_COLUMNS, JobQuery, JobStore, StoreError, default_db_path

NOW = 1_800_000_000.0


def job(job_id: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": job_id,
        "agent": "echo",
        "room": "demo",
        "dispatch_id": "AD_1",
        "identity": f"agent-{job_id}",
        "status": "running",
        "accepted_at": NOW,
        "daemon_pid": 4242,
    }
    row.update(fields)
    return row


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "lkrun" / "jobs.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[JobStore]:
    s = JobStore(db_path)
    s.open()
    yield s
    s.close()


def reopen(db_path: Path) -> tuple[JobStore, int]:
    s = JobStore(db_path)
    return s, s.open()


def write(s: JobStore, *rows: dict[str, Any]) -> None:
    for row in rows:
        s.upsert(row)
    assert s.flush()


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in rows]


def test_default_db_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "lkrun" / "jobs.db"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/dir")  # ignored, per the XDG spec
    assert default_db_path() == Path.home() / ".local" / "state" / "lkrun" / "jobs.db"


def test_open_creates_schema_and_private_files(db_path: Path) -> None:
    s = JobStore(db_path)
    assert not db_path.exists()  # the constructor does not touch the disk
    assert s.open() == 0
    s.close()

    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    conn = sqlite3.connect(db_path)
    try:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(jobs)")]
        indexed = {
            conn.execute(f"PRAGMA index_info({name})").fetchone()[2]
            for (name,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'"
                " AND name NOT LIKE 'sqlite_autoindex%'"
            )
        }
        assert conn.execute("PRAGMA user_version").fetchone()[0] == store_module.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()
    # Every field of a JobRecord has its column (a new field needs a migration step).
    assert sorted(columns) == sorted(JOB_COLUMNS)
    assert indexed == {"status", "agent", "room", "accepted_at", "recovered_from"}


def test_roundtrip_from_a_job_record(store: JobStore) -> None:
    record = JobRecord(
        id="AJ_1", agent="echo", room="demo", dispatch_id="AD_1", identity="agent-AJ_1"
    )
    record.status = JobStatus.RUNNING
    record.pid = 123
    record.warm = True
    record.peak_memory_mb = 51.5
    # to_dict has keys the store does not know (age, offer_to_start_ms): ignored.
    write(store, {**record.to_dict(), "daemon_pid": 9, "worker_id": "AW_1"})

    got = store.get("AJ_1")
    assert got is not None
    assert set(got) == set(JOB_COLUMNS)
    assert got["status"] == "running"
    assert got["pid"] == 123
    assert got["warm"] is True
    assert got["peak_memory_mb"] == 51.5
    assert got["accepted_at"] == record.accepted_at
    assert got["started_at"] is None
    assert (got["daemon_pid"], got["worker_id"]) == (9, "AW_1")
    assert store.get("AJ_missing") is None


def test_last_write_wins(store: JobStore) -> None:
    store.upsert(job("AJ_1", status="starting"))
    store.upsert(job("AJ_1", status="running", pid=10))
    store.upsert(job("AJ_1", status="success", ended_at=NOW + 5, exit_code=0))
    assert store.flush()
    got = store.get("AJ_1")
    assert got is not None
    assert (got["status"], got["pid"], got["exit_code"]) == ("success", 10, 0)

    # Across batches too, and a partial row only changes the columns it has.
    write(store, {"id": "AJ_1", "status": "failed", "error": "boom"})
    got = store.get("AJ_1")
    assert got is not None
    assert (got["status"], got["error"], got["pid"], got["agent"]) == ("failed", "boom", 10, "echo")


@pytest.fixture
def populated(store: JobStore) -> JobStore:
    write(
        store,
        job("AJ_1", agent="echo", room="a", status="success", accepted_at=NOW + 1),
        job("AJ_2", agent="greeter", room="a", status="running", accepted_at=NOW + 2),
        job("AJ_3", agent="echo", room="b", status="failed", accepted_at=NOW + 3),
        job("AJ_4", agent="echo", room="ab", status="running", accepted_at=NOW + 4),
        job("AJ_5", agent="greeter", room="b", status="lost", accepted_at=NOW + 5),
    )
    return store


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (JobQuery(), ["AJ_5", "AJ_4", "AJ_3", "AJ_2", "AJ_1"]),  # newest first
        (JobQuery(statuses=("running",)), ["AJ_4", "AJ_2"]),
        (JobQuery(statuses=("success", "failed")), ["AJ_3", "AJ_1"]),
        (JobQuery(agent="greeter"), ["AJ_5", "AJ_2"]),
        (JobQuery(room="a"), ["AJ_2", "AJ_1"]),  # exact: not "ab"
        (JobQuery(since=NOW + 3), ["AJ_5", "AJ_4", "AJ_3"]),
        (JobQuery(limit=2), ["AJ_5", "AJ_4"]),
        (JobQuery(agent="echo", statuses=("running", "failed"), since=NOW + 3.5), ["AJ_4"]),
        (JobQuery(agent="nobody"), []),
    ],
)
def test_query_filters(populated: JobStore, query: JobQuery, expected: list[str]) -> None:
    assert ids(populated.query(query)) == expected


def test_history_survives_close_and_reopen(db_path: Path) -> None:
    first = JobStore(db_path)
    first.open()
    write(first, job("AJ_1", status="success", ended_at=NOW + 9, warm=True))
    first.close()

    second, lost = reopen(db_path)
    try:
        assert lost == 0
        got = second.get("AJ_1")
        assert got is not None
        assert (got["status"], got["ended_at"], got["warm"]) == ("success", NOW + 9, True)
    finally:
        second.close()


def test_reopen_marks_active_jobs_lost(db_path: Path) -> None:
    first = JobStore(db_path)
    first.open()
    write(
        first,
        job("AJ_start", status="starting", daemon_pid=111),
        job("AJ_run", status="running", daemon_pid=111),
        job("AJ_stop", status="stopping", stop_cause="killed", daemon_pid=222),
        job("AJ_done", status="success", ended_at=NOW + 1, error="", daemon_pid=111),
        job("AJ_fail", status="failed", ended_at=NOW + 2, error="exit 1", daemon_pid=111),
    )
    first.close()  # as if the daemon died: a new one opens the same file

    before = time.time()
    second, lost = reopen(db_path)
    try:
        assert lost == 3
        # Their ids, for restart recovery to redispatch (lkrun.lost_jobs).
        assert sorted(second.lost) == ["AJ_run", "AJ_start", "AJ_stop"]
        for job_id, pid in (("AJ_start", 111), ("AJ_run", 111), ("AJ_stop", 222)):
            got = second.get(job_id)
            assert got is not None
            assert (got["status"], got["cause"]) == ("lost", "lost")
            assert got["ended_at"] >= before
            assert got["error"] == f"the daemon stopped while the job was running (pid {pid})"
        # Why it was being stopped stays: restart recovery leaves it alone (lkrun.lost_jobs).
        assert (second.get("AJ_stop") or {})["stop_cause"] == "killed"
        assert (second.get("AJ_run") or {})["stop_cause"] == ""
        done, failed = second.get("AJ_done"), second.get("AJ_fail")
        assert done is not None and failed is not None
        assert (done["status"], done["ended_at"], done["error"]) == ("success", NOW + 1, "")
        assert (failed["status"], failed["error"], failed["cause"]) == ("failed", "exit 1", "")
    finally:
        second.close()

    third, lost = reopen(db_path)
    third.close()
    assert lost == 0 and third.lost == []  # already lost: not counted (nor recovered) again


def test_prune_deletes_only_old_ended_jobs(store: JobStore) -> None:
    write(
        store,
        job("AJ_old_ok", status="success", ended_at=NOW - 100),
        job("AJ_old_failed", status="failed", ended_at=NOW - 50),
        job("AJ_old_lost", status="lost", ended_at=NOW - 50),
        job("AJ_new_ok", status="success", ended_at=NOW + 1),
        job("AJ_running", status="running", accepted_at=NOW - 1000),
    )
    assert store.prune(NOW) == 3
    assert sorted(ids(store.query(JobQuery(limit=0)))) == ["AJ_new_ok", "AJ_running"]
    assert store.prune(NOW) == 0


def test_prune_sees_rows_queued_before_it(store: JobStore) -> None:
    store.upsert(job("AJ_1", status="success", ended_at=NOW - 1))
    assert store.prune(NOW) == 1  # no flush: prune runs after the queued writes


def test_upsert_does_not_block_and_every_row_lands(store: JobStore) -> None:
    start = time.perf_counter()
    for i in range(10_000):
        store.upsert(job(f"AJ_{i}", accepted_at=NOW + i))
    assert time.perf_counter() - start < 2.0
    assert store.flush(timeout=30)
    rows = store.query(JobQuery(limit=0))
    assert len(rows) == 10_000
    assert rows[0]["id"] == "AJ_9999"


def test_upsert_rejects_bad_rows_at_the_call(store: JobStore) -> None:
    with pytest.raises(ValueError, match="id"):
        store.upsert({"agent": "echo"})
    with pytest.raises(ValueError, match="status"):
        store.upsert(job("AJ_1", status="exploded"))
    with pytest.raises(TypeError, match="room"):
        store.upsert(job("AJ_1", room=["a", "b"]))


def test_use_after_close_raises(db_path: Path) -> None:
    s = JobStore(db_path)
    s.open()
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError):
        s.upsert(job("AJ_1"))
    with pytest.raises(StoreError):
        s.query(JobQuery())


def test_close_writes_what_is_queued(db_path: Path) -> None:
    first = JobStore(db_path)
    first.open()
    first.upsert(job("AJ_1", status="success", ended_at=NOW))
    first.close()  # no flush
    second, _ = reopen(db_path)
    try:
        assert second.get("AJ_1") is not None
    finally:
        second.close()


def test_writer_survives_a_failed_batch(
    store: JobStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = store_module._upsert_sql
    calls = 0

    def fail_once(columns: tuple[str, ...]) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(columns)

    monkeypatch.setattr(store_module, "_upsert_sql", fail_once)
    with caplog.at_level(logging.ERROR, logger="lkrun.store"):
        store.upsert(job("AJ_1"))
        assert store.flush()
    assert any("disk I/O error" in r.exc_text for r in caplog.records if r.exc_text)
    assert store.get("AJ_1") is not None  # retried, and the thread still writes
    write(store, job("AJ_2"))
    assert store.get("AJ_2") is not None


def test_unwritable_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # a file where the directory should be (works even as root)
    path = blocker / "lkrun" / "jobs.db"
    with pytest.raises(StoreError) as info:
        JobStore(path).open()
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message


def test_corrupt_database_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    path.write_bytes(b"this is not a sqlite database\n" * 200)
    s = JobStore(path)
    with pytest.raises(StoreError) as info:
        s.open()
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    assert s.flush()  # nothing half-open is left behind


def test_newer_schema_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {store_module.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        JobStore(path).open()


def test_rows_of_a_daemon_still_running_are_not_lost(tmp_path: Path) -> None:
    path = tmp_path / "jobs.db"
    first = JobStore(path)
    first.open()
    first.upsert({"id": "AJ_alive", "agent": "a", "status": "running", "daemon_pid": 111})
    first.upsert({"id": "AJ_dead", "agent": "a", "status": "running", "daemon_pid": 222})
    first.flush()
    first.close()
    second = JobStore(path)
    assert second.open(daemon_alive=lambda pid: pid == 111) == 1
    try:
        assert second.get("AJ_alive")["status"] == "running"
        assert second.get("AJ_dead")["status"] == "lost"
    finally:
        second.close()
