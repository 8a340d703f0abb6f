"""`lkrun protocol-test`: the job protocol's conformance kit (lkrun.conformance)."""

from __future__ import annotations

import contextlib
import sys
import urllib.request
from collections.abc import Iterator
from typing import Annotated

import click
import typer
from typer.core import TyperCommand

from lkrun import credentials
from lkrun.cli.common import (
    EXIT_FAILURE,
    EXIT_USAGE,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    app,
    duration_option,
    err,
    fail,
    run_async,
    say,
)
from lkrun.shared import jobpipe

DEV_URL = "http://127.0.0.1:7880"


class _CommandAfterDashes(TyperCommand):
    """Its usage line as the command is typed (Typer would show a required list argument as
    ``{CMD}...``)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [self.options_metavar or "[OPTIONS]", "--", "CMD", "[ARGS]..."]


@app.command(
    "protocol-test",
    cls=_CommandAfterDashes,
    context_settings={"allow_interspersed_args": False},
)
def protocol_test(
    command: Annotated[
        list[str],
        typer.Argument(metavar="CMD", help="The program to test and its arguments, after --."),
    ],
    url: UrlOpt = None,
    api_key: KeyOpt = None,
    ready_timeout: Annotated[
        str, typer.Option(help="How long it may take to say ready (an agent's prewarm_timeout).")
    ] = "60s",
    shutdown_timeout: Annotated[
        str, typer.Option(help="How long it may take to exit after a shutdown.")
    ] = "10s",
    join_timeout: Annotated[
        str, typer.Option(help="How long from start to running, and to its joining the room.")
    ] = "20s",
    pass_credentials: Annotated[
        bool,
        typer.Option(
            "--pass-credentials",
            help="Give it LIVEKIT_API_KEY and LIVEKIT_API_SECRET (an agent's pass_credentials).",
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show the program's log on stderr.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a program through every message and fault of the job protocol (docs/protocol.md)
    as the daemon would, against a real LiveKit server; one line per check. Exit status 0
    if every check passed, 1 if one failed, 2 if the test could not run."""
    from lkrun import conformance

    timeouts = {
        "ready_timeout": duration_option("--ready-timeout", ready_timeout),
        "shutdown_timeout": duration_option("--shutdown-timeout", shutdown_timeout),
        "join_timeout": duration_option("--join-timeout", join_timeout),
    }

    def show(check: conformance.Check) -> None:
        say(f"{check.status:<7} {check.name}: {check.detail}")

    def show_log(scenario: str, line: str) -> None:
        say(f"  [{scenario}] {line}", err)

    with livekit(url, api_key) as creds:
        settings = conformance.Settings(
            command=command, credentials=creds, pass_credentials=pass_credentials, **timeouts
        )
        if not as_json:
            say(f"job protocol {jobpipe.PROTOCOL}: {' '.join(command)} ({creds.url})")
        try:
            report = run_async(
                conformance.run_kit(
                    settings,
                    on_check=None if as_json else show,
                    on_log=show_log if verbose else None,
                )
            )
        except conformance.KitError as exc:
            fail(str(exc), EXIT_USAGE)
    if as_json:
        sys.stdout.write(report.to_json() + "\n")
    else:
        passed, failed = report.count(conformance.PASSED), report.count(conformance.FAILED)
        say(f"{passed} passed, {failed} failed, {report.count(conformance.SKIPPED)} skipped")
    if not report.ok:
        raise typer.Exit(EXIT_FAILURE)


@contextlib.contextmanager
def livekit(url: str | None, api_key: str | None) -> Iterator[credentials.Credentials]:
    """The LiveKit server to test against: the one configured, else the dev server `lkrun
    serve` runs when it is up, else a dev server of the test's own (stopped afterwards)."""
    try:
        creds = credentials.resolve(url=url, api_key=api_key)
    except credentials.CredentialsError as exc:
        fail(str(exc), EXIT_USAGE)
    if creds is not None:
        yield creds
        return
    from lkrun import devserver

    if _answers(DEV_URL):
        yield credentials.Credentials(DEV_URL, devserver.DEV_API_KEY, devserver.DEV_API_SECRET)
        return
    try:
        binary = devserver.ensure_server_binary(on_build=lambda msg: say(msg, err))
        server = devserver.DevServer.on_free_ports(binary)
        say(f"no LiveKit URL configured: starting livekit-server in dev mode at {server.url}", err)
        server.start()
    except devserver.DevServerError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        yield credentials.Credentials(server.url, server.api_key, server.api_secret)
    finally:
        server.stop()


def _answers(url: str) -> bool:
    """Whether a server answers GET / with 200 (livekit-server does once it is ready)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except OSError:
        return False
