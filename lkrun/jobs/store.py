"""The local job history: every job the daemon accepted, in SQLite, across restarts.

Writes go through `JobStore.upsert`, which only enqueues: one background thread owns the
write connection and commits whatever is queued as one transaction, so the event loop
never waits on the disk. Reads (`query`, `get`) block and are meant for `asyncio.to_thread`;
they use their own connection, which WAL mode lets proceed while the writer commits.
Rows upserted but not yet written are not visible to reads until `flush`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from lkrun import paths
from lkrun.jobs.book import JobRecord
from lkrun.jobs.fields import ACTIVE_STATUSES, ENDED_STATUSES, STATUSES, JobStatus
from lkrun.shared.text import one_line

logger = logging.getLogger("lkrun.store")

_T = TypeVar("_T")

# A job's row: the fields of the daemon's record, and which daemon holds it. _SCHEMA must
# have them all (tests/test_store.py checks it): a new field needs a migration step.
JOB_COLUMNS = (*(f.name for f in dataclasses.fields(JobRecord)), "daemon_pid")

SCHEMA_VERSION = 1  # kept in PRAGMA user_version; bump it and add a step in _migrate
# Columns added since version 1 came out: _migrate adds those an older file lacks. Each is
# NOT NULL with a default (so old rows read as the record's default) or nullable: an older
# lkrun still reads and writes such a file, which is why they need no new version.
_ADDED_COLUMNS = (
    ("agent_name", "TEXT NOT NULL DEFAULT ''"),
    ("job_type", "TEXT NOT NULL DEFAULT 'room'"),
    ("participant", "TEXT NOT NULL DEFAULT ''"),
    ("metadata", "TEXT NOT NULL DEFAULT ''"),
    ("recovered_from", "TEXT NOT NULL DEFAULT ''"),
    ("attempt", "INTEGER NOT NULL DEFAULT 0"),
    ("recovery", "TEXT NOT NULL DEFAULT ''"),
    ("on_failure", "TEXT NOT NULL DEFAULT 'none'"),
    ("max_redispatches", "INTEGER NOT NULL DEFAULT 0"),
    ("cause", "TEXT NOT NULL DEFAULT ''"),
    ("stop_cause", "TEXT NOT NULL DEFAULT ''"),
    ("recovery_skip", "TEXT NOT NULL DEFAULT ''"),
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY NOT NULL,
    agent           TEXT,
    room            TEXT,
    dispatch_id     TEXT,
    identity        TEXT,
    status          TEXT NOT NULL DEFAULT 'starting',
    pid             INTEGER,
    offered_at      REAL,
    accepted_at     REAL,
    started_at      REAL,
    ended_at        REAL,
    error           TEXT,
    exit_code       INTEGER,
    stop_reason     TEXT,
    memory_mb       REAL,
    peak_memory_mb  REAL,
    cpu_percent     REAL,
    warm            INTEGER NOT NULL DEFAULT 0,
    daemon_pid      INTEGER,
    worker_id       TEXT,
    {added}
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_agent ON jobs (agent);
CREATE INDEX IF NOT EXISTS jobs_room ON jobs (room);
CREATE INDEX IF NOT EXISTS jobs_accepted_at ON jobs (accepted_at);
""".replace("{added}", ",\n    ".join(f"{name:<15} {kind}" for name, kind in _ADDED_COLUMNS))
# After the added columns exist (an index on one would fail on an old file before).
_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_recovered_from ON jobs (recovered_from);
"""

BUSY_TIMEOUT_MS = 5000  # another process (e.g. `lkrun jobs ls`) holding the lock briefly
_RETRY_DELAYS = (0.1, 0.5, 2.0)  # between attempts at a batch that failed to commit
_Row = dict[str, Any]
_Task = tuple[Callable[[sqlite3.Connection], Any], "Future[Any]"]  # run on the writer


class StoreError(Exception):
    """The job history could not be opened or read; the message is one line."""


def default_db_path() -> Path:
    """$XDG_STATE_HOME/lkrun/jobs.db, else ~/.local/state/lkrun/jobs.db."""
    return paths.state_dir() / "jobs.db"


@dataclass(frozen=True)
class JobQuery:
    statuses: tuple[str, ...] = ()  # empty: any
    agent: str | None = None
    room: str | None = None  # exact match
    since: float | None = None  # accepted_at >= since
    limit: int = 100  # newest first (accepted_at DESC); 0 or less: no limit


def _column_value(column: str, value: Any) -> Any:
    """What sqlite stores for a value; raises TypeError now rather than in the writer."""
    if column == "warm":
        return int(bool(value))
    if isinstance(value, Enum):  # JobStatus
        value = value.value
    if value is None or isinstance(value, (int, float, str)):
        return value
    raise TypeError(f"job column {column!r}: unsupported type {type(value).__name__}")


def _job_row(job: Mapping[str, Any]) -> _Row:
    """The row to store; bad values raise here, in the caller, not later in the writer."""
    row = {c: _column_value(c, job[c]) for c in JOB_COLUMNS if c in job}
    if not isinstance(row.get("id"), str) or not row["id"]:
        raise ValueError("a job needs a non-empty string 'id'")
    if "status" in row and row["status"] not in STATUSES:
        raise ValueError(f"unknown job status {row['status']!r}")
    return row


@lru_cache(maxsize=64)
def _upsert_sql(columns: tuple[str, ...]) -> str:
    """INSERT that, for an existing id, updates only the given columns."""
    names = ", ".join(columns)
    marks = ", ".join("?" * len(columns))
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "id")
    action = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
    return f"INSERT INTO jobs ({names}) VALUES ({marks}) ON CONFLICT (id) {action}"


def _from_db(row: sqlite3.Row) -> _Row:
    job = {c: row[c] for c in JOB_COLUMNS}
    job["warm"] = bool(job["warm"])
    return job


def _query_sql(q: JobQuery) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if q.statuses:
        where.append(f"status IN ({', '.join('?' * len(q.statuses))})")
        params.extend(q.statuses)
    for column, value in (("agent", q.agent), ("room", q.room)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if q.since is not None:
        where.append("accepted_at >= ?")
        params.append(q.since)
    sql = f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    # rowid breaks ties between jobs accepted in the same instant: later insert first.
    sql += " ORDER BY accepted_at DESC, rowid DESC LIMIT ?"
    params.append(q.limit if q.limit > 0 else -1)
    return sql, params


def _connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL: a commit survives a process crash; only power loss may drop the last.
        conn.execute("PRAGMA synchronous = NORMAL")
        if read_only:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"job history {path} has schema version {version}, newer than this lkrun"
            f" understands ({SCHEMA_VERSION})"
        )
    # Version 1 is the whole schema (IF NOT EXISTS); later versions add steps keyed on `version`.
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in filter(str.strip, _SCHEMA.split(";")):
            conn.execute(statement)
        have = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        for name, kind in _ADDED_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
        for statement in filter(str.strip, _INDEXES.split(";")):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _mark_lost(
    conn: sqlite3.Connection, now: float, daemon_alive: Callable[[int], bool]
) -> list[str]:
    """Jobs a previous daemon left active: it died (or was killed) before recording an end.
    Marks them lost, in one transaction; returns their ids (restart recovery redispatches
    them, lkrun.lost_jobs).

    Rows of a daemon that still runs (another daemon sharing the file) are left alone.
    """
    marks = ", ".join("?" * len(ACTIVE_STATUSES))
    conn.execute("BEGIN IMMEDIATE")
    try:
        pids = conn.execute(
            f"SELECT DISTINCT daemon_pid FROM jobs WHERE status IN ({marks})", ACTIVE_STATUSES
        ).fetchall()
        dead = [pid for (pid,) in pids if pid is None or not daemon_alive(pid)]
        lost: list[str] = []
        for pid in dead:
            where = f"WHERE status IN ({marks}) AND daemon_pid IS ?"
            ids = conn.execute(f"SELECT id FROM jobs {where}", (*ACTIVE_STATUSES, pid))
            lost += [job_id for (job_id,) in ids.fetchall()]
            conn.execute(
                f"UPDATE jobs SET status = '{JobStatus.LOST.value}', ended_at = ?,"
                " cause = 'lost', error = 'the daemon stopped while the job was running (pid '"
                f" || IFNULL(daemon_pid, 'unknown') || ')' {where}",
                (now, *ACTIVE_STATUSES, pid),
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return lost


def _prepare_file(path: Path) -> None:
    """Parent dir 0700 and the file 0600 if we create them: job rows name rooms and users."""
    if not path.parent.is_dir():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)


class JobStore:
    """The job history in one SQLite file; see the module docstring for the threading."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._write_conn: sqlite3.Connection | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._cond = threading.Condition()
        self._pending: dict[str, _Row] = {}  # by id; merged so the last write wins
        self._tasks: list[_Task] = []
        self._seq = 0  # upserts accepted
        self._written = 0  # upserts committed (or given up on at close)
        self._closing = False
        self._thread: threading.Thread | None = None
        self.lost: list[str] = []  # the ids open() marked lost

    # -- lifecycle

    def open(self, *, daemon_alive: Callable[[int], bool] = lambda pid: False) -> int:
        """Open (creating if needed); returns how many jobs a previous daemon left behind.

        ``daemon_alive(pid)`` tells whether the daemon that wrote a row still runs.
        """
        if self._thread is not None:
            raise StoreError(f"job history {self.path} is already open")
        try:
            lost = self._open_connections(daemon_alive)
        except (sqlite3.Error, OSError) as exc:
            self._close_connections()
            raise StoreError(f"cannot open job history {self.path}: {one_line(exc)}") from exc
        except StoreError:
            self._close_connections()
            raise
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="lkrun-store-writer", daemon=True)
        self._thread.start()
        return lost

    def _open_connections(self, daemon_alive: Callable[[int], bool]) -> int:
        _prepare_file(self.path)
        self._write_conn = _connect(self.path, read_only=False)
        _migrate(self._write_conn, self.path)
        self.lost = _mark_lost(self._write_conn, time.time(), daemon_alive)  # committed now
        self._read_conn = _connect(self.path, read_only=True)
        self._read_conn.row_factory = sqlite3.Row
        return len(self.lost)

    def _close_connections(self) -> None:
        for conn in (self._read_conn, self._write_conn):
            if conn is not None:
                conn.close()
        self._read_conn = self._write_conn = None

    def close(self) -> None:
        """Write what is queued, stop the writer and close. Idempotent."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        thread.join()
        self._thread = None
        with self._read_lock:
            self._close_connections()

    # -- writes

    def upsert(self, job: Mapping[str, Any]) -> None:
        """Queue a job's row (JOB_COLUMNS keys only; others ignored). Never touches the disk.

        Columns missing from `job` keep their stored value, so partial updates work.
        """
        row = _job_row(job)
        with self._cond:
            if self._thread is None or self._closing:
                raise StoreError(f"job history {self.path} is not open")
            queued = self._pending.get(row["id"])
            if queued is None:
                self._pending[row["id"]] = row
            else:
                queued.update(row)
            self._seq += 1
            self._cond.notify_all()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every upsert so far is committed; False on timeout."""
        with self._cond:
            target = self._seq
            return self._cond.wait_for(lambda: self._written >= target, timeout)

    def prune(self, older_than: float) -> int:
        """Delete ended jobs whose ended_at < older_than; returns how many. Blocks.

        Runs on the writer thread, after the rows queued before it, so it sees them.
        """
        marks = ", ".join("?" * len(ENDED_STATUSES))
        sql = f"DELETE FROM jobs WHERE status IN ({marks}) AND ended_at < ?"

        def delete(conn: sqlite3.Connection) -> int:
            return conn.execute(sql, (*ENDED_STATUSES, older_than)).rowcount

        return self._on_writer(delete)

    def _on_writer(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        future: Future[_T] = Future()
        with self._cond:
            if self._thread is None or self._closing:
                raise StoreError(f"job history {self.path} is not open")
            self._tasks.append((fn, future))
            self._cond.notify_all()
        try:
            return future.result()
        except sqlite3.Error as exc:
            raise StoreError(f"job history {self.path}: {one_line(exc)}") from exc

    # -- the writer thread

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._tasks or self._closing)
                if not (self._pending or self._tasks):
                    return  # closing, and nothing left
                rows, self._pending = self._pending, {}
                tasks, self._tasks = self._tasks, []
                seq, closing = self._seq, self._closing
            ok = self._write_batch(rows, first_failure=failures == 0)
            self._run_tasks(tasks)
            failures = 0 if ok else failures + 1
            self._after_batch(rows, seq, ok, closing, failures)

    def _after_batch(
        self, rows: dict[str, _Row], seq: int, ok: bool, closing: bool, failures: int
    ) -> None:
        with self._cond:
            if not ok and not closing:
                self._requeue(rows)
                delay = _RETRY_DELAYS[min(failures, len(_RETRY_DELAYS)) - 1]
                self._cond.wait_for(lambda: self._closing, delay)  # close cuts the wait short
                return
            if not ok:
                logger.error("job history %s: dropped %d job rows at close", self.path, len(rows))
            self._written = seq
            self._cond.notify_all()

    def _requeue(self, rows: dict[str, _Row]) -> None:
        """Put a failed batch back under whatever was queued since: the newer values win."""
        for job_id, newer in self._pending.items():
            rows[job_id] = {**rows.get(job_id, {}), **newer}
        self._pending = rows

    def _write_batch(self, rows: dict[str, _Row], *, first_failure: bool) -> bool:
        """One transaction for the batch; False (to retry it) if it could not commit."""
        if not rows:
            return True
        conn = self._write_conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            for row in rows.values():
                self._write_row(conn, row)
            conn.execute("COMMIT")
        except Exception as exc:  # disk full, locked too long, I/O: worth another try
            self._rollback(conn)
            if first_failure:
                logger.exception("job history %s: writing %d rows failed", self.path, len(rows))
            else:
                logger.warning("job history %s: still failing: %s", self.path, one_line(exc))
            return False
        return True

    def _write_row(self, conn: sqlite3.Connection, row: _Row) -> None:
        try:
            conn.execute(_upsert_sql(tuple(row)), tuple(row.values()))
        except sqlite3.OperationalError:
            raise  # about the database, not this row: fail the batch
        except sqlite3.Error:
            # A row sqlite refuses would fail every retry; drop it alone (the failed
            # statement is undone, the transaction goes on).
            logger.exception("job history %s: dropped job row %s", self.path, row["id"])

    def _run_tasks(self, tasks: list[_Task]) -> None:
        conn = self._write_conn
        assert conn is not None
        for fn, future in tasks:
            try:
                future.set_result(fn(conn))
            except Exception as exc:  # handed to the caller, who raises it
                self._rollback(conn)
                future.set_exception(exc)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("job history %s: rollback failed", self.path)

    # -- reads

    def query(self, q: JobQuery) -> list[dict[str, Any]]:
        """Matching jobs, newest first. Blocks: call it with asyncio.to_thread."""
        sql, params = _query_sql(q)
        return [_from_db(r) for r in self._read(sql, params)]

    def get(self, job_id: str) -> dict[str, Any] | None:
        rows = self._read(f"SELECT {', '.join(JOB_COLUMNS)} FROM jobs WHERE id = ?", [job_id])
        return _from_db(rows[0]) if rows else None

    def unrecovered_lost(self, skips: Collection[str]) -> list[str]:
        """Ids of lost jobs, oldest first, that no job of this history replaces (none has
        it as ``recovered_from``) and whose recovery was never decided or was skipped for
        one of ``skips`` (lkrun.recovery.SKIP_REASONS): what `lkrun recover` tries again.
        Blocks."""
        marks = ", ".join("?" * len(skips)) or "NULL"
        sql = f"""
            SELECT id FROM jobs AS j
            WHERE status = ? AND (recovery = '' OR recovery_skip IN ({marks}))
            AND NOT EXISTS (SELECT 1 FROM jobs AS r WHERE r.recovered_from = j.id)
            ORDER BY accepted_at, id
        """
        return [row[0] for row in self._read(sql, [JobStatus.LOST.value, *skips])]

    def chain(self, job_id: str) -> list[dict[str, Any]]:
        """The job's recovery chain: the jobs it replaces (recovered_from, back to the call's
        first) and those that replace it, itself included, first attempt first. Blocks."""
        sql = f"""
            WITH RECURSIVE
            back(id, recovered_from) AS (
                SELECT id, recovered_from FROM jobs WHERE id = ?
                UNION SELECT j.id, j.recovered_from FROM jobs j
                JOIN back ON j.id = back.recovered_from
            ),
            forth(id) AS (
                SELECT id FROM jobs WHERE id = ?
                UNION SELECT j.id FROM jobs j JOIN forth ON j.recovered_from = forth.id
            )
            SELECT {", ".join(JOB_COLUMNS)} FROM jobs
            WHERE id IN (SELECT id FROM back UNION SELECT id FROM forth)
            ORDER BY attempt, accepted_at, rowid
        """
        return [_from_db(r) for r in self._read(sql, [job_id, job_id])]

    def _read(self, sql: str, params: list[Any]) -> list[sqlite3.Row]:
        with self._read_lock:
            if self._read_conn is None:
                raise StoreError(f"job history {self.path} is not open")
            try:
                return self._read_conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"job history {self.path}: {one_line(exc)}") from exc
