"""An entrypoint that names a file (issue 17 item 22): ``"bots/echo-bot.py:entrypoint"``.

Parsed relative to the manifest, checked to exist, and imported the way ``python file.py
start`` runs it: the file's directory first on sys.path, under a name of its own
(``__lkrun_entry__<stem>``) rather than ``__main__``, so its ``if __name__ == "__main__"``
block stays out. Hyphens in the file name are fine.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lkrun.child import apps
from lkrun.entrypoints import check_entrypoints
from lkrun.manifest import ManifestError, load_manifest, parse_manifest
from tests.conftest import REPO, observer, unique, wait_for, wait_for_participant
from tests.helpers import agent_table, dispatch, echo_roundtrip, job_in_room

BOT = """\
from __future__ import annotations

import dataclasses

import bot_helper  # beside this file: its directory is first on sys.path

from lkrun.context import JobContext
from lkrun.examples.echo import entrypoint as echo


@dataclasses.dataclass
class Seen:  # a dataclass needs its module in sys.modules while the module runs
    module: str


def prewarm() -> Seen:
    return Seen(__name__)


async def entrypoint(ctx: JobContext) -> None:
    await echo(ctx)  # connects and echoes data messages
    attributes = {"bot.module": __name__, "bot.helper": bot_helper.VALUE}
    if ctx.userdata is not None:
        attributes["bot.prewarm"] = ctx.userdata.module
    await ctx.room.local_participant.set_attributes(attributes)


if __name__ == "__main__":
    raise SystemExit("imported as __main__")
"""

HELPER = 'VALUE = "beside"\n'


def write_bots(root: Path) -> Path:
    bots = root / "bots"
    bots.mkdir(parents=True, exist_ok=True)
    (bots / "echo-bot.py").write_text(BOT)
    (bots / "bot_helper.py").write_text(HELPER)
    return bots


def manifest_at(root: Path, text: str) -> Path:
    path = root / "agents.toml"
    path.write_text(textwrap.dedent(text))
    return path


# --- parsing and validation ---


def test_a_relative_file_is_relative_to_the_manifest(tmp_path: Path) -> None:
    bots = write_bots(tmp_path)
    path = manifest_at(
        tmp_path,
        """\
        [agents.bot]
        entrypoint = "bots/echo-bot.py:entrypoint"
        prewarm = "bots/echo-bot.py:prewarm"
        """,
    )
    [spec] = load_manifest(path).agents.values()
    assert spec.entrypoint == f"{bots / 'echo-bot.py'}:entrypoint"
    assert spec.prewarm == f"{bots / 'echo-bot.py'}:prewarm"
    assert (spec.module, spec.function) == (str(bots / "echo-bot.py"), "entrypoint")


def test_an_absolute_file_is_kept(tmp_path: Path) -> None:
    bots = write_bots(tmp_path / "elsewhere")
    entrypoint = f"{bots / 'echo-bot.py'}:entrypoint"
    manifest = parse_manifest(f'[agents.bot]\nentrypoint = "{entrypoint}"\n', tmp_path / "a.toml")
    assert manifest.agents["bot"].entrypoint == entrypoint


@pytest.mark.parametrize("field", ["entrypoint", "prewarm"])
def test_a_missing_file_names_the_file_the_agent_and_the_field(field: str, tmp_path: Path) -> None:
    write_bots(tmp_path)
    table = {"entrypoint": "bots/echo-bot.py:entrypoint", field: "bots/no-such.py:entrypoint"}
    lines = "".join(f'{key} = "{value}"\n' for key, value in table.items())
    path = manifest_at(tmp_path, f"[agents.bot]\n{lines}")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    err = info.value
    assert (err.file, err.agent, err.field) == (path, "bot", field)
    expected = tmp_path / "bots" / "no-such.py"
    assert err.message == f"no such file: bots/no-such.py (looked for {expected})"
    assert str(err) == f"{path}: agent 'bot': field {field!r}: {err.message}"


def test_a_missing_absolute_file_is_named_once(tmp_path: Path) -> None:
    missing = tmp_path / "gone.py"
    with pytest.raises(ManifestError) as info:
        parse_manifest(f'[agents.bot]\nentrypoint = "{missing}:main"\n', tmp_path / "a.toml")
    assert info.value.message == f"no such file: {missing}"


def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "pkg.py").mkdir()
    with pytest.raises(ManifestError) as info:
        parse_manifest('[agents.bot]\nentrypoint = "pkg.py:main"\n', tmp_path / "a.toml")
    assert (info.value.agent, info.value.field) == ("bot", "entrypoint")
    assert info.value.message == f"not a file: pkg.py (looked for {tmp_path / 'pkg.py'})"


def test_module_entrypoints_are_not_files(tmp_path: Path) -> None:
    spec = parse_manifest('[agents.a]\nentrypoint = "pkg.mod:main"\n', tmp_path / "a.toml")
    assert spec.agents["a"].entrypoint == "pkg.mod:main"  # not checked on disk, not rewritten


# --- importing a file, in this process ---


@pytest.fixture
def clean_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Whatever a test imports from a file leaves sys.path and sys.modules as they were."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(apps, "_file_modules", {})
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


@pytest.mark.usefixtures("clean_imports")
def test_import_file_runs_it_as_the_official_cli_would(tmp_path: Path) -> None:
    bots = write_bots(tmp_path)
    module = apps.import_file(bots / "echo-bot.py")
    assert module.__name__ == "__lkrun_entry__echo_bot"
    assert sys.modules["__lkrun_entry__echo_bot"] is module
    assert sys.path[0] == str(bots)
    assert module.bot_helper.VALUE == "beside"
    assert module.prewarm() == module.Seen("__lkrun_entry__echo_bot")
    # Once per file: the entrypoint and the prewarm of one file share the module.
    assert apps.import_file(tmp_path / "bots" / ".." / "bots" / "echo-bot.py") is module
    assert apps.load_target(f"{bots / 'echo-bot.py'}:prewarm") is module.prewarm


@pytest.mark.usefixtures("clean_imports")
def test_files_with_the_same_name_are_different_modules(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bot.py").write_text(f"WHO = {name!r}\n")
    first = apps.import_file(tmp_path / "a" / "bot.py")
    second = apps.import_file(tmp_path / "b" / "bot.py")
    assert (first.WHO, second.WHO) == ("a", "b")
    assert (first.__name__, second.__name__) == ("__lkrun_entry__bot", "__lkrun_entry__bot_2")


@pytest.mark.usefixtures("clean_imports")
def test_a_file_that_fails_to_import_leaves_no_module(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        apps.import_file(tmp_path / "bad.py")
    assert "__lkrun_entry__bad" not in sys.modules
    with pytest.raises(FileNotFoundError):
        apps.import_file(tmp_path / "gone.py")


# --- the import check ---


@pytest.mark.e2e
def test_the_import_check_imports_a_hyphenated_file(tmp_path: Path) -> None:
    write_bots(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "echo-bot.py").write_text("def other_entry(ctx):\n    pass\n")
    path = manifest_at(
        tmp_path,
        """\
        [agents.bot]
        entrypoint = "bots/echo-bot.py:entrypoint"
        prewarm = "bots/echo-bot.py:prewarm"

        [agents.same-stem]
        entrypoint = "other/echo-bot.py:other_entry"
        """,
    )
    agents = check_entrypoints(load_manifest(path)).agents
    assert [(s.app.framework, s.app.kind) for s in agents.values() if s.app] == [
        ("lkrun", "function"),
        ("lkrun", "function"),
    ]


@pytest.mark.e2e
def test_the_import_check_reports_a_file_that_raises(tmp_path: Path) -> None:
    (tmp_path / "my-bot.py").write_text("raise RuntimeError('boom')\n")
    path = manifest_at(tmp_path, '[agents.a]\nentrypoint = "my-bot.py:main"\n')
    with pytest.raises(ManifestError) as info:
        check_entrypoints(load_manifest(path))
    assert (info.value.agent, info.value.field) == ("a", "entrypoint")
    file = tmp_path / "my-bot.py"
    assert info.value.message == f"cannot import file {str(file)!r}: RuntimeError: boom"
    (tmp_path / "my-bot.py").write_text("x = 1\n")
    with pytest.raises(ManifestError) as info:
        check_entrypoints(load_manifest(path))
    assert info.value.message == f"file {str(file)!r} has no attribute 'main'"


@pytest.mark.e2e
def test_the_import_check_reads_a_livekit_agents_app_from_a_file(tmp_path: Path) -> None:
    shutil.copy(REPO / "tests" / "lka_apps" / "gatekeeper.py", tmp_path / "gate-keeper.py")
    path = manifest_at(
        tmp_path,
        """\
        [agents.server]
        entrypoint = "gate-keeper.py:server"

        [agents.function]
        entrypoint = "gate-keeper.py:entrypoint"
        """,
    )
    agents = check_entrypoints(load_manifest(path)).agents
    for spec in agents.values():
        assert spec.app is not None
        assert (spec.app.framework, spec.app.kind, spec.app.on_request) == (
            "livekit-agents",
            "AgentServer",
            True,
        )
        assert spec.idle_processes == 1  # the app's setting, read from the file's server


# --- served: jobs from a file, in a forked, a spawned and a request process ---


async def test_a_hyphenated_file_entrypoint_serves_jobs(
    start_daemon: Any, livekit_server: Any, tmp_path: Path
) -> None:
    bots = write_bots(tmp_path / "bots-home")  # away from the manifest: only the path finds it
    shutil.copy(REPO / "tests" / "lka_apps" / "gatekeeper.py", bots / "gate-keeper.py")
    forked, spawned, gate = unique("file-fork"), unique("file-spawn"), unique("file-gate")
    bot = f"{bots / 'echo-bot.py'}"
    daemon = await start_daemon(
        agent_table(forked, f"{bot}:entrypoint", prewarm=f"{bot}:prewarm", idle_processes=1)
        + agent_table(spawned, f"{bot}:entrypoint", start_method="spawn")
        + agent_table(gate, f"{bots / 'gate-keeper.py'}:server")
    )
    for agent, prewarmed in ((forked, True), (spawned, False)):
        room_name = unique("file-room")
        async with observer(livekit_server, room_name) as room:
            await dispatch(livekit_server, room_name, agent)
            participant = await wait_for_participant(room, f"{agent}-")
            assert await echo_roundtrip(room, participant.identity, b"ping") == b"ping"
            await wait_for(
                lambda p=participant: "bot.module" in p.attributes, 15, what="bot attributes"
            )
            expected = {"bot.module": "__lkrun_entry__echo_bot", "bot.helper": "beside"}
            if prewarmed:
                expected["bot.prewarm"] = "__lkrun_entry__echo_bot"
            assert {k: participant.attributes.get(k) for k in expected} == expected
            assert ("bot.prewarm" in participant.attributes) is prewarmed
            job = await job_in_room(daemon, room_name, "running")
            assert job["agent"] == agent

    # A livekit-agents app with on_request: its request process loads the file too and
    # gives the identity; the job runs the app's entrypoint.
    async def request_process_ready() -> bool:
        agents = {a["agent"]: a for a in (await daemon.status())["agents"]}
        return agents[gate]["request_process_ready"] is True

    await wait_for(request_process_ready, 60, what="the gate's request process")
    room_name = unique("file-room")
    async with observer(livekit_server, room_name) as room:
        await dispatch(livekit_server, room_name, gate)
        participant = await wait_for_participant(room, f"gate-{room_name}")
        assert participant.attributes.get("lka.gate") == "yes"
        job = await job_in_room(daemon, room_name, "running")
        assert job["agent"] == gate and job["identity"] == f"gate-{room_name}"
