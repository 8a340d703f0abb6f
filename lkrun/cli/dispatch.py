"""`lkrun dispatch`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from lkrun import credentials
from lkrun.api import control
from lkrun.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    JsonOpt,
    KeyOpt,
    SocketOpt,
    UrlOpt,
    app,
    duration_option,
    err,
    fail,
    run_async,
    say,
)


def client_credentials(url: str | None, api_key: str | None) -> credentials.Credentials:
    try:
        creds = credentials.resolve(url=url, api_key=api_key)
    except credentials.CredentialsError as exc:
        fail(str(exc), EXIT_USAGE)
    if creds is not None:
        return creds
    from lkrun import devserver

    # Like `lk --dev`: with nothing configured, talk to the dev server `lkrun serve` starts.
    return credentials.Credentials(
        "http://127.0.0.1:7880", devserver.DEV_API_KEY, devserver.DEV_API_SECRET
    )


@app.command()
def dispatch(
    room: Annotated[str, typer.Option("--room", help="Room to send the agent to.")],
    agent: Annotated[str, typer.Option("--agent", help="Agent name, as registered.")],
    metadata: Annotated[str, typer.Option(help="Metadata passed to the job.")] = "",
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until a job of the dispatch is running.")
    ] = False,
    timeout: Annotated[str, typer.Option(help="With --wait: how long, e.g. 30s.")] = "30s",
    retries: Annotated[
        int,
        typer.Option(
            min=0,
            help="With --wait: how many times to re-create a dispatch that LiveKit dropped "
            "(no job 8s after it was created: no worker was available).",
        ),
    ] = 2,
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    control_socket: SocketOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask LiveKit to send AGENT to ROOM (creating the room if needed)."""
    from lkrun.dispatch import Dispatch, DispatchError, create_dispatch, dispatch_and_wait

    creds = client_credentials(url, api_key)
    limit = duration_option("--timeout", timeout)

    socket_path = control_socket or control.default_socket_path()

    async def local_jobs() -> list[dict[str, Any]]:
        return list((await control.get(socket_path, "/v1/jobs", {"all": "0"}))["jobs"])

    tries = 0

    def on_retry(dropped: Dispatch, again: Dispatch, seconds: float) -> None:
        nonlocal tries
        tries += 1
        say(
            f"dispatch {dropped.id} got no job after {seconds:.1f}s: LiveKit dropped it (no "
            f"worker for {agent!r} was available); deleted it and created {again.id} "
            f"(retry {tries}/{retries})",
            err,
        )

    async def run() -> tuple[Any, Any]:
        if not wait:
            created = await create_dispatch(creds, room=room, agent=agent, metadata=metadata)
            return created, None
        return await dispatch_and_wait(
            creds,
            room=room,
            agent=agent,
            metadata=metadata,
            timeout=limit,
            local_jobs=local_jobs,
            retries=retries,
            on_retry=on_retry,
        )

    try:
        created, running = run_async(run())
    except DispatchError as exc:
        fail(str(exc))
    result: dict[str, Any] = {
        "dispatch_id": created.id,
        "agent": created.agent,
        "room": created.room,
        "metadata": created.metadata,
    }
    if wait:
        result["retries"] = tries  # dispatches LiveKit dropped, each created again
    if running is not None:
        result.update(
            job_id=running.job_id or None,
            participant_identity=running.participant_identity,
            worker_id=running.worker_id or None,
            seconds=round(running.seconds, 3),
            seen_in=running.seen_in,
            daemon=running.daemon or None,
        )
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    elif running is None:
        say(created.id)
    else:
        job = f"job {running.job_id}" if running.job_id else "a job"
        daemon = f", daemon {running.daemon}" if running.daemon else ""
        say(
            f"{created.id}: {job} running after {running.seconds:.2f}s "
            f"(participant {running.participant_identity}{daemon}, seen in {running.seen_in})"
        )
    if wait and running is None:
        _explain_timeout(agent, room, created.id, limit, control_socket)


def _explain_timeout(
    agent: str, room: str, dispatch_id: str, limit: float, socket_path: Path | None
) -> NoReturn:
    from lkrun.dispatch import diagnose

    local: control.DaemonStatus | None
    try:
        local = control.request(socket_path or control.default_socket_path(), "/v1/status")
    except control.ControlError:
        local = None
    say(f"error: no job of dispatch {dispatch_id} was running after {limit:g}s; most likely:", err)
    for reason in diagnose(agent, room, local):
        say(f"  - {reason}", err)
    raise typer.Exit(EXIT_FAILURE)
