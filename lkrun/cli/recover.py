"""`lkrun recover --state-dir DIR`: a dead daemon's calls get their agents back."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lkrun.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    app,
    fail,
    run_async,
    say,
)


@app.command()
def recover(
    state_dir: Annotated[
        Path,
        typer.Option(
            "--state-dir",
            help="The state directory of a daemon that is gone (its --state-dir or "
            "[daemon] state_dir; the one that holds jobs.db).",
        ),
    ],
    database: Annotated[
        Path | None,
        typer.Option(
            "--database",
            help="The dead daemon's job history, when its [daemon] database put it elsewhere "
            "than DIR/jobs.db.",
        ),
    ] = None,
    max_redispatches: Annotated[
        int | None,
        typer.Option(
            "--max-redispatches",
            min=0,
            help="Redispatch every lost job, whatever the policy recorded with it, while its "
            "call has had fewer than N redispatches (also those the policy left alone on an "
            "earlier run). Default: each job's own policy (on_failure, max_redispatches "
            "when it was accepted).",
        ),
    ] = None,
    other_host: Annotated[
        bool,
        typer.Option(
            "--other-host",
            help="DIR was last held by a daemon on another host: go on all the same. Only "
            "once you know that daemon is gone (its host down or its service stopped): "
            "from here its lock and pid prove nothing, and a live daemon's agents would be "
            "removed from their rooms as ghosts and their jobs dispatched again.",
        ),
    ] = False,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Mark a dead daemon's running jobs lost and redispatch those whose callers are still
    in their rooms, as the daemon itself does when it restarts on DIR.

    Refused while a live daemon holds DIR: that daemon recovers its own jobs; and for a DIR
    last held on another host, unless --other-host. Run again, it
    retries the lost jobs not redispatched yet whose recovery failed (LiveKit refused or
    was not reached) or was never decided, and with --max-redispatches those the policy
    left alone.
    """
    from lkrun.cli.dispatch import client_credentials
    from lkrun.jobs.history import lkrun_daemon_alive
    from lkrun.jobs.statelock import StateDirBusy, StateLock, last_holder, this_host
    from lkrun.jobs.store import JobStore, StoreError
    from lkrun.lost_jobs import lost_jobs, recorded_policy, recover_lost, summary
    from lkrun.recovery import REDISPATCH, FailedJob, Recoverer, RecoveryPolicy

    # Lost jobs of earlier runs (or of a restarted daemon's recovery) tried again: those
    # whose recovery failed or was never decided; with --max-redispatches, also those the
    # recorded policy refused. A final answer (the caller left, the room is gone, an agent
    # is there, redispatched) is not asked again.
    retried = {"error"} | (
        {"policy_off", "max_redispatches"} if max_redispatches is not None else set()
    )

    creds = client_credentials(url, api_key)
    directory = state_dir.absolute()
    if database is None:
        database = directory / "jobs.db"
        if not database.is_file():
            fail(
                f"no job history at {database}: is {directory} an lkrun state directory? "
                "(if its [daemon] database is elsewhere, give it with --database)",
                EXIT_USAGE,
            )
    elif not database.is_file():
        fail(f"no job history at {database}", EXIT_USAGE)
    holder = last_holder(directory)  # before the lock is ours: then it names us
    try:
        lock = StateLock.acquire(directory)
    except StateDirBusy as exc:
        who = f" (pid {exc.holder})" if exc.holder else ""
        fail(
            f"{directory} is held by a live lkrun daemon{who}: it recovers its own jobs; "
            "`lkrun recover` is for a daemon that is gone"
        )
    except OSError as exc:
        fail(f"cannot lock {directory}: {exc}")
    # The lock is proof on the holder's host only (flock may not cross a network file
    # system; the history's pids are checked on this host): the daemon may live elsewhere.
    here = this_host()
    if holder.host not in ("", here) and not other_host:
        lock.release()
        fail(
            f"{directory} was last held by a daemon on host {holder.host!r}, not this one "
            f"({here!r}): its lock and pid prove nothing from here; run `lkrun recover` on "
            f"{holder.host!r}, or pass --other-host once you know that daemon is gone"
        )
    # The Recoverer logs each decision, which this command prints as its report; what
    # else it says (a ghost left in a room, a recovery that failed unexpectedly) goes to
    # stderr.
    recovery_log = logging.getLogger("lkrun.recovery")
    shown = _side_notes()
    recovery_log.addHandler(shown)
    store = JobStore(database)
    try:
        try:
            store.open(daemon_alive=lkrun_daemon_alive)
            ids = list(dict.fromkeys([*store.unrecovered_lost(retried), *store.lost]))
            rows = [row for row in map(store.get, ids) if row is not None]
        except StoreError as exc:
            fail(str(exc))
        policies = {str(row["id"]): recorded_policy(row) for row in rows}
        forced = (
            RecoveryPolicy(REDISPATCH, max_redispatches) if max_redispatches is not None else None
        )

        def policy_for(failed: FailedJob) -> RecoveryPolicy:
            return forced or policies[failed.job_id]

        def note(job_id: str, columns: dict[str, str]) -> None:
            store.upsert({"id": job_id, **columns})

        async def run() -> list[Any]:
            recoverer = Recoverer(creds, note=note)
            try:
                return await recover_lost(lost_jobs(rows), recoverer, policy_for=policy_for)
            finally:
                await recoverer.close()

        outcomes = run_async(run())
    finally:
        store.close()
        lock.release()
        recovery_log.removeHandler(shown)
    _report(directory, outcomes, summary(outcomes), as_json)
    if any(decision.skip == "error" for _, decision in outcomes):
        raise typer.Exit(EXIT_FAILURE)  # LiveKit refused or was not reached: try again


class _NotADecision(logging.Filter):
    """The Recoverer's lines other than its decisions (which the report prints)."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = getattr(record, "fields", None) or {}
        return record.levelno >= logging.WARNING and "decision" not in fields


class _Said(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _side_notes() -> logging.Handler:
    """A stderr handler for the Recoverer's warnings and errors other than decisions."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_NotADecision())
    handler.setFormatter(_Said())
    return handler


def _report(directory: Path, outcomes: list[Any], total: str, as_json: bool) -> None:
    jobs = [
        {
            "id": failed.job_id,
            "agent": failed.agent,
            "room": failed.room,
            "attempt": failed.attempt,
            "redispatched": decision.redispatch,
            "reason": decision.reason,
            "skip": decision.skip or None,
        }
        for failed, decision in outcomes
    ]
    if as_json:
        sys.stdout.write(json.dumps({"state_dir": str(directory), "jobs": jobs}) + "\n")
        return
    if not jobs:
        say(f"{directory}: no running job, nor lost job to retry, in its history: nothing to do")
        return
    for job in jobs:
        done = job["reason"] if job["redispatched"] else f"not redispatched: {job['reason']}"
        say(f"{job['id']} ({job['agent']}, room {job['room']!r}): {done}")
    say(f"{directory}: {total}")
