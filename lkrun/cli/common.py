"""What every `lkrun` command shares: the app, consoles, option types, small helpers."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from lkrun import __version__
from lkrun.api import control
from lkrun.shared.text import printable

app = typer.Typer(
    help="Host many LiveKit agents from one manifest, one subprocess per job.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Help texts are plain: "[default: ...]" must not be read as Rich markup and vanish.
    rich_markup_mode=None,
)
jobs_app = typer.Typer(
    help="Inspect the jobs of the running daemon.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(jobs_app, name="jobs")

# No emoji either: ":warning:" in a room name is text, not a picture.
err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)
# Piped output is read by scripts and grep: don't wrap it at 80 columns.
out = Console(highlight=False, emoji=False, width=None if sys.stdout.isatty() else 400)


def cell(value: object) -> Text:
    """A table cell shown as it is: room names, errors and identities come from clients and
    jobs, and Rich would read "[link=...]" or "[/x]" in them as markup; their control
    characters are shown escaped (``printable``), never sent to the terminal."""
    return Text(printable(value))


def say(text: object, console: Console | None = None) -> None:
    """Print one line that may carry text from outside (rooms, jobs, the server): as data,
    neither Rich markup nor terminal control sequences."""
    (console or out).print(printable(text), markup=False, emoji=False)


EXIT_USAGE = 2  # bad manifest or bad configuration
EXIT_FAILURE = 1

UrlOpt = Annotated[
    str | None, typer.Option("--url", envvar="LIVEKIT_URL", show_envvar=True, help="LiveKit URL.")
]
KeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="LIVEKIT_API_KEY", show_envvar=True, help="LiveKit API key."),
]
SocketOpt = Annotated[
    Path | None,
    typer.Option(
        "--control-socket",
        envvar=control.ENV_SOCKET,
        show_envvar=True,
        help="The daemon's control socket [default: $XDG_RUNTIME_DIR/lkrun/control.sock].",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    say(f"error: {message}", err)  # errors quote agent names, rooms and the server's replies
    raise typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        out.print(f"lkrun {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    pass


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def duration_value(text: str) -> float:
    from lkrun.manifest import parse_duration

    try:
        return parse_duration(float(text))  # a bare number means seconds
    except ValueError:
        return parse_duration(text)


def duration_option(flag: str, text: str) -> float:
    try:
        return duration_value(text)
    except ValueError as exc:
        fail(f"{flag}: {exc}", EXIT_USAGE)


def ask_daemon(
    socket_path: Path | None,
    route: str,
    params: dict[str, str] | None = None,
    *,
    method: str = "GET",
) -> Any:
    try:
        return control.request(
            socket_path or control.default_socket_path(), route, params, method=method
        )
    except control.ControlError as exc:
        fail(str(exc))


def age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
