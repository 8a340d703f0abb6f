"""Manifest parsing, validation and the entrypoint import check; no network."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pickle
import platform
import sys
import textwrap
from pathlib import Path

import pytest

from lkrun.entrypoints import check_entrypoints
from lkrun.manifest import (
    AgentSpec,
    AppInfo,
    DaemonSettings,
    FrozenMap,
    LiveKitSettings,
    Manifest,
    ManifestError,
    Permissions,
    load_manifest,
    parse_duration,
    parse_host_port,
    parse_manifest,
)
from tests.conftest import REPO

FILE = "agents.toml"
MINIMAL = '[agents.echo]\nentrypoint = "pkg.mod:main"\n'


def parse(text: str, path: str | Path = FILE) -> Manifest:
    return parse_manifest(textwrap.dedent(text), path)


def rejects(text: str, *, agent: str | None = None, field: str | None = None) -> ManifestError:
    """Parse ``text``, expect a ManifestError on ``agent``/``field``, and check its line."""
    with pytest.raises(ManifestError) as info:
        parse(text)
    err = info.value
    assert (err.agent, err.field) == (agent, field), str(err)
    line = str(err)
    assert "\n" not in line and "\r" not in line
    assert line.startswith(f"{FILE}: ")
    if agent is not None:
        assert f"agent {agent!r}" in line
    if field is not None:
        assert f"field {field!r}" in line
    assert line.endswith(err.message)
    return err


def agent_with(body: str, name: str = "echo") -> str:
    return f'[agents.{name}]\nentrypoint = "pkg.mod:main"\n{textwrap.dedent(body)}\n'


# --- valid manifests ---

FULL = """\
[livekit]
url = "wss://example.livekit.cloud"
api_key = "APIkey"
api_secret = "s3cret-value"

[daemon]
control_socket = "run/lkrun.sock"
drain_timeout = "1h30m"
shutdown_timeout = 2.5
http_addr = "[::1]:9000"
load_threshold = 1


[agents.echo]
entrypoint = "examples.echo:entrypoint"
dispatch = "automatic"
job_type = "publisher"
rooms = ["support-*", "demo"]
max_jobs = 8
identity = "echo-{room}-{participant}-{job_id}"
participant_name = "Echo"
participant_metadata = '{"kind": "bot"}'
participant_attributes = { role = "echo", tier = "free" }
namespace = "prod"
env = { MODEL = "small", _X1 = "" }
memory_limit_mb = 512
job_timeout = "90s"

[agents.echo.permissions]
can_publish = false
can_subscribe = false
can_publish_data = false
can_update_metadata = false
hidden = true

[agents.second]
entrypoint = "pkg.sub.mod:run"
"""


def test_full_manifest_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(FULL)
    manifest = load_manifest(path)
    assert manifest.path == path
    assert manifest.workdir == tmp_path.resolve()
    assert manifest.livekit == LiveKitSettings(
        url="wss://example.livekit.cloud", api_key="APIkey", api_secret="s3cret-value"
    )
    assert manifest.daemon == DaemonSettings(
        control_socket=tmp_path.resolve() / "run/lkrun.sock",
        drain_timeout=5400.0,
        shutdown_timeout=2.5,
        http_addr="[::1]:9000",
        load_threshold=1.0,
    )
    assert isinstance(manifest.daemon.load_threshold, float)
    assert list(manifest.agents) == ["echo", "second"]
    assert manifest.agents["echo"] == AgentSpec(
        name="echo",
        entrypoint="examples.echo:entrypoint",
        dispatch="automatic",
        job_type="publisher",
        rooms=("support-*", "demo"),
        max_jobs=8,
        identity="echo-{room}-{participant}-{job_id}",
        participant_name="Echo",
        participant_metadata='{"kind": "bot"}',
        participant_attributes={"role": "echo", "tier": "free"},
        permissions=Permissions(
            can_publish=False,
            can_subscribe=False,
            can_publish_data=False,
            can_update_metadata=False,
            hidden=True,
        ),
        namespace="prod",
        env={"MODEL": "small", "_X1": ""},
        memory_limit_mb=512,
        job_timeout=90.0,
    )


def test_defaults() -> None:
    manifest = parse(MINIMAL)
    assert manifest.livekit == LiveKitSettings()
    assert manifest.livekit.url is manifest.livekit.api_key is manifest.livekit.api_secret is None
    assert manifest.daemon == DaemonSettings()
    assert manifest.daemon.control_socket is None
    assert manifest.daemon.drain_timeout == 1800.0
    assert manifest.daemon.shutdown_timeout == 10.0
    assert manifest.daemon.http_addr == "127.0.0.1:8081"
    assert manifest.daemon.load_threshold == 0.75
    spec = manifest.agents["echo"]
    assert spec == AgentSpec(name="echo", entrypoint="pkg.mod:main")
    assert spec.dispatch == "explicit"
    assert spec.job_type == "room"
    assert spec.start_method == "forkserver"
    assert spec.framework == "auto" and spec.app is None  # the import check fills it in
    assert spec.pass_credentials is False
    assert spec.request_timeout == 2.0 and spec.shutdown_timeout == 0.0
    assert spec.explicit == {"entrypoint"}  # what the file sets: the app's settings fill the rest
    assert spec.rooms == ()
    assert spec.max_jobs == 16
    assert spec.identity == "{agent}-{job_id}"
    assert spec.participant_name == spec.participant_metadata == spec.namespace == ""
    assert dict(spec.participant_attributes) == {} and dict(spec.env) == {}
    assert spec.permissions == Permissions(True, True, True, True, False)
    assert spec.memory_limit_mb == 0
    assert spec.job_timeout == 0.0


def test_example_manifest_in_repo_is_valid() -> None:
    manifest = load_manifest(REPO / "agents.toml.example")
    assert list(manifest.agents) == [
        "echo", "greeter", "level-meter", "frame-sampler", "relay", "webhook", "recorder"
    ]  # fmt: skip
    # The livekit-agents example has its own file, so a plain install serves this one.
    framework = load_manifest(REPO / "agents-framework.toml.example")
    assert list(framework.agents) == ["assistant"]
    assert framework.agents["assistant"].pass_credentials is True
    assert framework.agents["assistant"].entrypoint == "lkrun.examples.assistant:server"


def test_agent_spec_helpers() -> None:
    spec = parse(agent_with('rooms = ["support-*", "Demo"]\nidentity = "x-{job_id}-{room}"'))
    spec = spec.agents["echo"]
    assert spec.module == "pkg.mod" and spec.function == "main"
    assert spec.registered_name == "echo"
    assert spec.display_name() == "echo"
    assert spec.accepts_room("support-42") and spec.accepts_room("Demo")
    assert not spec.accepts_room("demo")  # case-sensitive
    assert not spec.accepts_room("sales")
    assert spec.format_identity(job_id="AJ_1", room="r1") == "x-AJ_1-r1"
    auto = parse(agent_with('dispatch = "automatic"\nparticipant_name = "Bot"')).agents["echo"]
    assert auto.registered_name == ""
    assert auto.display_name() == "Bot"
    assert auto.accepts_room("anything")
    assert auto.format_identity(job_id="J", room="r", participant="p") == "echo-J"


def test_registration_key() -> None:
    base = parse(MINIMAL).agents["echo"]
    assert base.registration_key() == ("echo", "room", "", Permissions())
    same = parse(agent_with("permissions = {}\nmax_jobs = 3\njob_timeout = 5")).agents["echo"]
    assert same.registration_key() == base.registration_key()  # permissions compare by value
    for body in [
        'dispatch = "automatic"',
        'job_type = "publisher"',
        'namespace = "ns"',
        "permissions = { hidden = true }",
    ]:
        changed = parse(agent_with(body)).agents["echo"]
        assert changed.registration_key() != base.registration_key(), body
    renamed = parse(agent_with("", name="other")).agents["other"]
    assert renamed.registration_key() != base.registration_key()
    # The rest (entrypoint, rooms, max_jobs, identity, limits, ...) is not part of the key.
    unchanged = parse(
        agent_with(
            'rooms = ["a"]\nmax_jobs = 1\nidentity = "x-{job_id}"\nparticipant_name = "N"\n'
            'env = { A = "1" }\nmemory_limit_mb = 64\njob_timeout = "1h"'
        )
    ).agents["echo"]
    assert unchanged.registration_key() == base.registration_key()
    hash(base.registration_key())


def test_identity_template_uses_every_placeholder() -> None:
    spec = parse(agent_with('identity = "{agent}/{room}/{participant}/{job_id}/{{x}}"'))
    identity = spec.agents["echo"].format_identity(job_id="J", room="R", participant="P")
    assert identity == "echo/R/P/J/{x}"


def test_settings_are_immutable_hashable_and_copyable() -> None:
    manifest = parse(FULL)
    spec = manifest.agents["echo"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.max_jobs = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        spec.env["NEW"] = "x"  # type: ignore[index]
    assert isinstance(spec.env, FrozenMap)
    assert hash(manifest) == hash(parse(FULL))
    assert pickle.loads(pickle.dumps(manifest)) == manifest
    assert copy.deepcopy(manifest) == manifest
    assert dataclasses.asdict(spec)["max_jobs"] == 8


def test_api_secret_is_never_shown() -> None:
    manifest = parse(FULL)
    assert "s3cret" not in repr(manifest)
    assert "s3cret" not in repr(manifest.livekit)
    err = rejects("[livekit]\napi_secret = 12345\n" + MINIMAL, field="livekit.api_secret")
    assert "12345" not in str(err)


def test_control_socket_paths(tmp_path: Path) -> None:
    relative = parse('[daemon]\ncontrol_socket = "s.sock"\n' + MINIMAL, tmp_path / "a.toml")
    assert relative.daemon.control_socket == tmp_path.resolve() / "s.sock"
    absolute = parse('[daemon]\ncontrol_socket = "/run/x.sock"\n' + MINIMAL, tmp_path / "a.toml")
    assert absolute.daemon.control_socket == Path("/run/x.sock")


def test_resolving_control_socket_keeps_other_daemon_settings(tmp_path: Path) -> None:
    text = '[daemon]\ncontrol_socket = "s.sock"\ndrain_timeout = "5m"\nhttp_addr = ""\n'
    daemon = parse(text + MINIMAL, tmp_path / "a.toml").daemon
    assert daemon == DaemonSettings(
        control_socket=tmp_path.resolve() / "s.sock", drain_timeout=300.0, http_addr=""
    )


def test_workdir_is_absolute_and_path_kept_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "agents.toml").write_text(MINIMAL)
    monkeypatch.chdir(tmp_path)
    manifest = load_manifest("./sub/agents.toml")
    assert manifest.path == Path("sub/agents.toml")
    assert manifest.workdir == (tmp_path / "sub").resolve()
    monkeypatch.chdir("/")
    assert manifest.workdir == (tmp_path / "sub").resolve()  # fixed at load time


@pytest.mark.parametrize(
    ("livekit_url"), ["ws://127.0.0.1:7880", "wss://x.livekit.cloud", "http://h", "https://h"]
)
def test_livekit_url_schemes_accepted(livekit_url: str) -> None:
    manifest = parse(f'[livekit]\nurl = "{livekit_url}"\n' + MINIMAL)
    assert manifest.livekit.url == livekit_url


@pytest.mark.parametrize("name", ["a", "A1", "a.b_c-d", "9lives", "x" * 64])
def test_agent_names_accepted(name: str) -> None:
    assert list(parse(agent_with("", name=f'"{name}"')).agents) == [name]


@pytest.mark.parametrize("entrypoint", ["m:f", "a.b.c:_f", "_p.m2:Main"])
def test_entrypoints_accepted(entrypoint: str) -> None:
    spec = parse(f'[agents.a]\nentrypoint = "{entrypoint}"\n').agents["a"]
    assert spec.entrypoint == entrypoint


def test_automatic_agents_in_different_pools_are_fine() -> None:
    text = """\
    [agents.a]
    entrypoint = "m:f"
    dispatch = "automatic"
    [agents.b]
    entrypoint = "m:f"
    dispatch = "automatic"
    namespace = "other"
    [agents.c]
    entrypoint = "m:f"
    dispatch = "automatic"
    job_type = "publisher"
    [agents.d]
    entrypoint = "m:f"
    [agents.e]
    entrypoint = "m:f"
    """
    assert list(parse(text).agents) == ["a", "b", "c", "d", "e"]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("0", 0.0),
        ("90", 90.0),
        ("2.5", 2.5),
        ('"0s"', 0.0),
        ('"500ms"', 0.5),
        ('"90s"', 90.0),
        ('"30m"', 1800.0),
        ('"2h"', 7200.0),
        ('"7d"', 604800.0),
        ('"1h30m"', 5400.0),
        ('"1.5h"', 5400.0),
        ('"1m30s250ms"', 90.25),
        ('"1m1ms"', 60.001),
        ('"5ms2m"', 120.005),  # any order, as in Go
        ('"0.5s"', 0.5),
    ],
)
def test_durations_accepted(value: str, seconds: float) -> None:
    manifest = parse(f"[daemon]\ndrain_timeout = {value}\n" + agent_with(f"job_timeout = {value}"))
    assert manifest.daemon.drain_timeout == pytest.approx(seconds)
    assert manifest.agents["echo"].job_timeout == pytest.approx(seconds)
    assert isinstance(manifest.agents["echo"].job_timeout, float)
    as_flag = parse_duration(value.strip('"') if value.startswith('"') else float(value))
    assert as_flag == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ('"soon"', "'soon'"),
        ('""', "''"),
        ('"90"', "'90'"),
        ('"s"', "'s'"),
        ('"1w"', "'1w'"),
        ('"1 h"', "'1 h'"),
        ('" 1h"', "' 1h'"),
        ('"1H"', "'1H'"),
        ('"-5s"', "'-5s'"),
        ('"+5s"', "'+5s'"),
        ('".5h"', "'.5h'"),
        ('"5.h"', "'5.h'"),
        ('"1e3s"', "'1e3s'"),
        ('"1h30"', "'1h30'"),
        ('"1hh"', "'1hh'"),
        ('"1h\\n"', "'1h\\n'"),
        ('"inf s"', "'inf s'"),
        ("-1", "-1"),
        ("-0.5", "-0.5"),
        ("inf", "inf"),
        ("nan", "nan"),
        ("true", "true"),
        ("[1]", "[1]"),
        ("{}", "{}"),
        ("1" + "0" * 400, "1000"),  # too big for a float
        ('"' + "9" * 400 + 's"', "'999"),
    ],
)
def test_bad_durations(value: str, shown: str) -> None:
    prefix = 'must be a duration such as "90s", "30m" or "2h", got '
    err = rejects(agent_with(f"job_timeout = {value}"), agent="echo", field="job_timeout")
    assert err.message.startswith(prefix + shown)
    for name in ["drain_timeout", "shutdown_timeout"]:
        err = rejects(f"[daemon]\n{name} = {value}\n" + MINIMAL, field=f"daemon.{name}")
        assert err.message.startswith(prefix + shown)


@pytest.mark.parametrize("text", ["soon", "", "90", "-1s", "1w", "1h30"])
def test_parse_duration_rejects_bad_flags(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == f'must be a duration such as "90s", "30m" or "2h", got {text!r}'


@pytest.mark.parametrize("limit", [0, 1, 4096])
def test_memory_limit_accepted(limit: int) -> None:
    spec = parse(agent_with(f"memory_limit_mb = {limit}")).agents["echo"]
    assert spec.memory_limit_mb == limit


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "must be an integer >= 0, got -1"),
        ("1.5", "must be an integer >= 0, got 1.5"),
        ("512.0", "must be an integer >= 0, got 512.0"),
        ("true", "must be an integer >= 0, got true"),
        ('"512"', "must be an integer >= 0, got '512'"),
        ('"512MB"', "must be an integer >= 0, got '512MB'"),
    ],
)
def test_bad_memory_limits(value: str, message: str) -> None:
    err = rejects(agent_with(f"memory_limit_mb = {value}"), agent="echo", field="memory_limit_mb")
    assert err.message == message


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0.5", 0.5), ("1", 1.0), ("1.0", 1.0), ("1e-3", 0.001), ('"off"', math.inf)],
)
def test_load_threshold_accepted(value: str, expected: float) -> None:
    daemon = parse(f"[daemon]\nload_threshold = {value}\n" + MINIMAL).daemon
    assert daemon.load_threshold == expected
    assert isinstance(daemon.load_threshold, float)


@pytest.mark.parametrize(
    ("value", "shown"),
    [("0", "0"), ("0.0", "0.0"), ("-0.5", "-0.5"), ("1.01", "1.01"), ("2", "2"), ("75", "75"),
     ("nan", "nan"), ("inf", "inf"), ("true", "true"), ('"0.75"', "'0.75'"), ('"75%"', "'75%'"),
     ('"OFF"', "'OFF'")],
)  # fmt: skip
def test_bad_load_thresholds(value: str, shown: str) -> None:
    text = f"[daemon]\nload_threshold = {value}\n" + MINIMAL
    err = rejects(text, field="daemon.load_threshold")
    assert err.message == f'must be a number > 0 and <= 1, or "off", got {shown}'


@pytest.mark.parametrize(
    ("addr", "host", "port"),
    [
        ("127.0.0.1:8081", "127.0.0.1", 8081),
        ("0.0.0.0:0", "0.0.0.0", 0),
        ("10.1.2.3:65535", "10.1.2.3", 65535),
        ("localhost:9000", "localhost", 9000),
        ("[::1]:8081", "::1", 8081),
        ("[::]:80", "::", 80),
        ("[fe80::1%eth0]:80", "fe80::1%eth0", 80),
        ("[::ffff:127.0.0.1]:1", "::ffff:127.0.0.1", 1),
        ("127.0.0.1:08081", "127.0.0.1", 8081),
    ],
)
def test_http_addr_accepted(addr: str, host: str, port: int) -> None:
    assert parse_host_port(addr) == (host, port)
    assert parse(f'[daemon]\nhttp_addr = "{addr}"\n' + MINIMAL).daemon.http_addr == addr


def test_empty_http_addr_disables_the_server() -> None:
    assert parse('[daemon]\nhttp_addr = ""\n' + MINIMAL).daemon.http_addr == ""
    with pytest.raises(ValueError):
        parse_host_port("")  # the flag parser decides what "" means


_HOST_PORT = 'must be host:port such as "127.0.0.1:8081" or "[::1]:8081", got '
_BAD_HOST = "host must be an IPv4 address, localhost or a bracketed IPv6 address, got "


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ("", _HOST_PORT + "''"),
        ("8081", _HOST_PORT + "'8081'"),
        ("localhost", _HOST_PORT + "'localhost'"),
        ("[::1]", _HOST_PORT + "'[::1]'"),
        ("[::1]8081", _HOST_PORT + "'[::1]8081'"),
        ("::1:8081", "an IPv6 host must be in brackets, as in \"[::1]:8081\", got '::1:8081'"),
        ("[localhost]:80", "'localhost' in brackets is not an IPv6 address"),
        ("[127.0.0.1]:80", "'127.0.0.1' in brackets is not an IPv6 address"),
        ("[]:80", "'' in brackets is not an IPv6 address"),
        (":8081", _BAD_HOST + "''"),
        ("example.com:80", _BAD_HOST + "'example.com'"),
        ("LOCALHOST:80", _BAD_HOST + "'LOCALHOST'"),
        ("256.0.0.1:80", _BAD_HOST + "'256.0.0.1'"),
        ("1.2.3:80", _BAD_HOST + "'1.2.3'"),
        (" 127.0.0.1:80", _BAD_HOST + "' 127.0.0.1'"),
        ("127.0.0.1:", "port must be a number from 0 to 65535, got ''"),
        ("127.0.0.1:65536", "port must be a number from 0 to 65535, got '65536'"),
        ("127.0.0.1:123456", "port must be a number from 0 to 65535, got '123456'"),
        ("127.0.0.1:-1", "port must be a number from 0 to 65535, got '-1'"),
        ("127.0.0.1:+80", "port must be a number from 0 to 65535, got '+80'"),
        ("127.0.0.1: 80", "port must be a number from 0 to 65535, got ' 80'"),
        ("127.0.0.1:80 ", "port must be a number from 0 to 65535, got '80 '"),
        ("127.0.0.1:http", "port must be a number from 0 to 65535, got 'http'"),
        ("127.0.0.1:\u0668\u0660", "port must be a number from 0 to 65535, got '\u0668\u0660'"),
        ("[::1]:99999", "port must be a number from 0 to 65535, got '99999'"),
    ],
)
def test_bad_http_addrs(addr: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_host_port(addr)
    assert str(info.value) == message
    if addr:  # "" is valid in the manifest: it disables the server
        text = f"[daemon]\nhttp_addr = {json.dumps(addr)}\n" + MINIMAL
        assert rejects(text, field="daemon.http_addr").message == message


@pytest.mark.parametrize("value", ["8081", "true", "[]", '{ host = "x" }'])
def test_http_addr_must_be_a_string(value: str) -> None:
    err = rejects(f"[daemon]\nhttp_addr = {value}\n" + MINIMAL, field="daemon.http_addr")
    assert err.message.startswith(
        'must be host:port such as "127.0.0.1:8081" or "[::1]:8081", or "" to disable, got '
    )


# --- rejections ---


def test_error_line_format() -> None:
    err = ManifestError("./agents.toml", "must be an integer >= 1, got 0", agent="echo", field="x")
    assert str(err) == "./agents.toml: agent 'echo': field 'x': must be an integer >= 1, got 0"
    assert err.file == Path("agents.toml")
    assert str(ManifestError(FILE, "oops")) == "agents.toml: oops"
    assert str(ManifestError(FILE, "a\nb", field="f")) == "agents.toml: field 'f': a b"
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.agent, again.field) == (str(err), "echo", "x")


def test_newlines_in_values_do_not_leak() -> None:
    err = rejects(agent_with('dispatch = "a\\nb"'), agent="echo", field="dispatch")
    assert "'a\\nb'" in str(err)
    rejects('[agents."a\\nb"]\nentrypoint = "m:f"\n', agent="a\nb")
    rejects(agent_with('"bad\\nkey" = 1'), agent="echo", field="bad\nkey")


@pytest.mark.parametrize(
    ("text", "field", "hint"),
    [
        ("[agnets.echo]\nx = 1\n" + MINIMAL, "agnets", "did you mean 'agents'?"),
        ("zzz = 1\n" + MINIMAL, "zzz", "allowed: livekit, daemon, agents"),
        ('[livekit]\nulr = "ws://x"\n' + MINIMAL, "livekit.ulr", "did you mean 'url'?"),
        ('[livekit]\napi_secert = "x"\n' + MINIMAL, "livekit.api_secert", "'api_secret'"),
        ('[daemon]\ncontrol_sock = "x"\n' + MINIMAL, "daemon.control_sock", "'control_socket'"),
        ("[daemon]\ndrain_timout = 1\n" + MINIMAL, "daemon.drain_timout", "'drain_timeout'"),
        ("[daemon]\nhttp_address = ''\n" + MINIMAL, "daemon.http_address", "'http_addr'"),
        ("[daemon]\nload_treshold = 1\n" + MINIMAL, "daemon.load_treshold", "'load_threshold'"),
    ],
)
def test_unknown_keys_outside_agents(text: str, field: str, hint: str) -> None:
    err = rejects(text, field=field)
    assert err.message.startswith("unknown key; ")
    assert hint in err.message


@pytest.mark.parametrize(
    ("body", "field", "hint"),
    [
        ("max_job = 1", "max_job", "did you mean 'max_jobs'?"),
        ("memory_limit = 1", "memory_limit", "did you mean 'memory_limit_mb'?"),
        ("job_timout = 1", "job_timout", "did you mean 'job_timeout'?"),
        ("room = []", "room", "did you mean 'rooms'?"),
        ("xyzzy = 1", "xyzzy", "allowed: entrypoint, command, dispatch,"),
        ("name = 'x'", "name", "did you mean"),  # the name is the table key, not a setting
        ("permissions = { can_publsh = true }", "permissions.can_publsh", "'can_publish'"),
        ("[agents.echo.permissions]\nhiden = true", "permissions.hiden", "'hidden'"),
    ],
)
def test_unknown_keys_in_agents(body: str, field: str, hint: str) -> None:
    err = rejects(agent_with(body), agent="echo", field=field)
    assert err.message.startswith("unknown key; ")
    assert hint in err.message


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ("max_jobs = 0", "max_jobs", "must be an integer >= 1, got 0"),
        ("max_jobs = -3", "max_jobs", "must be an integer >= 1, got -3"),
        ("max_jobs = true", "max_jobs", "must be an integer >= 1, got true"),
        ("max_jobs = 2.0", "max_jobs", "must be an integer >= 1, got 2.0"),
        ('max_jobs = "8"', "max_jobs", "must be an integer >= 1, got '8'"),
        ("dispatch = 1", "dispatch", "must be one of 'explicit', 'automatic', got 1"),
        ('dispatch = "auto"', "dispatch", "must be one of 'explicit', 'automatic', got 'auto'"),
        ('job_type = "ROOM"', "job_type", "must be one of 'room', 'publisher', 'participant'"),
        ('start_method = "fork"', "start_method", "must be one of 'forkserver', 'spawn'"),
        ('framework = "agents"', "framework", "must be one of 'auto', 'lkrun', 'livekit-agents'"),
        ('pass_credentials = "yes"', "pass_credentials", "must be true or false, got 'yes'"),
        ('request_timeout = "soon"', "request_timeout", "must be a duration such as"),
        ("shutdown_timeout = -1", "shutdown_timeout", "must be a duration such as"),
        ("request_timeout = 0", "request_timeout", "must be a duration above 0, got 0"),
        # Issue 17 item 9: values every job would fail with.
        ("prewarm_timeout = 0", "prewarm_timeout", "must be a duration above 0, got 0"),
        ('prewarm_timeout = "0s"', "prewarm_timeout", "must be a duration above 0, got '0s'"),
        (
            'env = { LKRUN_JOB_LOG_LEVEL = "verbose" }',
            "env.LKRUN_JOB_LOG_LEVEL",
            "must be a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL), got 'verbose'",
        ),
        ('env = { LKRUN_JOB_LOG_LEVEL = "10" }', "env.LKRUN_JOB_LOG_LEVEL", "got '10'"),
        ('env = { LKRUN_JOB_LOG_LEVEL = "" }', "env.LKRUN_JOB_LOG_LEVEL", "got ''"),
        ('rooms = "support-*"', "rooms", "must be an array of strings, got 'support-*'"),
        ('rooms = ["a", ""]', "rooms", "must contain only non-empty strings, got ''"),
        ('rooms = ["a", 1]', "rooms", "must contain only non-empty strings, got 1"),
        ("participant_name = 1", "participant_name", "must be a string, got 1"),
        ("participant_metadata = {}", "participant_metadata", "must be a string, got {}"),
        ("namespace = false", "namespace", "must be a string, got false"),
        ("identity = 5", "identity", "must be a string, got 5"),
        ("participant_attributes = 'x'", "participant_attributes", "must be a table of strings"),
        ("participant_attributes = { a = 1 }", "participant_attributes", "value of 'a' must be"),
        ("env = ['A']", "env", "must be a table of strings, got ['A']"),
        ("env = { A = 1 }", "env", "value of 'A' must be a string, got 1"),
        ("env = { A = true }", "env", "value of 'A' must be a string, got true"),
        ('env = { 1A = "x" }', "env", "key '1A' must match"),
        ('env = { "A-B" = "x" }', "env", "key 'A-B' must match"),
        ('env = { "" = "x" }', "env", "key '' must match"),
        ('env = { A = "x\\u0000y" }', "env", "value of 'A' must not contain a NUL character"),
        ("permissions = true", "permissions", "must be a table, got true"),
        ("permissions = { hidden = 1 }", "permissions.hidden", "must be true or false, got 1"),
        ("permissions = { can_publish = 'no' }", "permissions.can_publish", "got 'no'"),
    ],
)
def test_bad_agent_values(body: str, field: str, message: str) -> None:
    err = rejects(agent_with(body), agent="echo", field=field)
    assert message in err.message


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "error", "CRITICAL", "WARN"])
def test_job_log_levels_accepted(level: str) -> None:
    spec = parse(agent_with(f'env = {{ LKRUN_JOB_LOG_LEVEL = "{level}", OTHER = "verbose" }}'))
    assert dict(spec.agents["echo"].env) == {"LKRUN_JOB_LOG_LEVEL": level, "OTHER": "verbose"}


def test_entrypoint_is_required() -> None:
    err = rejects("[agents.echo]\nmax_jobs = 2\n", agent="echo", field="entrypoint")
    assert err.message == (
        'is required (or command = ["program", ...] for an agent in another language)'
    )


@pytest.mark.parametrize(
    "entrypoint",
    ["", "mod", "mod:", ":fn", "a..b:f", ".a:f", "a.:f", "1mod:f", "m:f:g", "m:f()", "m:class",
     "my-pkg:f", "m :f", "m.f", "agents/x.py", "agents/x.py:", "x.py:f-g", "x.py:class"],
)  # fmt: skip
def test_bad_entrypoints(entrypoint: str) -> None:
    text = f'[agents.echo]\nentrypoint = "{entrypoint}"\n'
    err = rejects(text, agent="echo", field="entrypoint")
    expected = "must look like 'package.module:function' or 'path/to/file.py:function', got "
    assert err.message.startswith(expected)


@pytest.mark.parametrize("entrypoint", ["agents/run:main", "agents/x.txt:main", "a/.py:main"])
def test_a_file_entrypoint_names_a_py_file(entrypoint: str) -> None:
    err = rejects(f'[agents.echo]\nentrypoint = "{entrypoint}"\n', agent="echo", field="entrypoint")
    assert err.message == f"a file entrypoint must name a .py file, got {entrypoint!r}"


def test_entrypoint_must_be_a_string() -> None:
    err = rejects("[agents.echo]\nentrypoint = 3\n", agent="echo", field="entrypoint")
    assert err.message == "must be a string, got 3"


@pytest.mark.parametrize(
    ("identity", "message"),
    [
        ("{agent}", "must contain {job_id} so each job gets a unique identity"),
        ("fixed", "must contain {job_id} so each job gets a unique identity"),
        ("{{job_id}}", "must contain {job_id} so each job gets a unique identity"),
        ("{job}-{job_id}", "unknown placeholder 'job' in"),
        ("{}-{job_id}", "unknown placeholder '' in"),
        ("{0}-{job_id}", "unknown placeholder '0' in"),
        ("{job_id.x}", "unknown placeholder 'job_id.x' in"),
        ("{job_id[0]}", "unknown placeholder 'job_id[0]' in"),
        ("{job_id:>8}", "placeholders take no format spec or conversion"),
        ("{job_id!r}", "placeholders take no format spec or conversion"),
        ("{job_id", "bad braces in template '{job_id'"),
        ("}{job_id}", "bad braces in template"),
        ("{job_id}}", "bad braces in template"),
    ],
)
def test_bad_identity_templates(identity: str, message: str) -> None:
    err = rejects(agent_with(f'identity = "{identity}"'), agent="echo", field="identity")
    assert message in err.message


@pytest.mark.parametrize("name", ["-a", ".a", "a b", "a/b", "é", "x" * 65, ""])
def test_bad_agent_names(name: str) -> None:
    err = rejects(f'[agents."{name}"]\nentrypoint = "m:f"\n', agent=name)
    assert err.message.startswith("invalid name")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no agents defined; add an [agents.NAME] table"),
        ("[livekit]\n", "no agents defined; add an [agents.NAME] table"),
        ("[agents]\n", "no agents defined; add an [agents.NAME] table"),
        ("agents = []\n", "must be a table of agents, got []"),
        ("agents = 3\n", "must be a table of agents, got 3"),
        ('agents = ["a"]\n', "must be a table of agents, got ['a']"),
    ],
)
def test_agents_must_be_a_non_empty_table(text: str, message: str) -> None:
    assert rejects(text, field="agents").message == message


def test_agent_must_be_a_table() -> None:
    err = rejects('[agents]\necho = "m:f"\n', agent="echo")
    assert err.message == "must be a table, got 'm:f'"


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('livekit = "ws://x"\n', "livekit", "must be a table, got 'ws://x'"),
        ("daemon = 1\n", "daemon", "must be a table, got 1"),
        (
            '[livekit]\nurl = "ftp://x"\n',
            "livekit.url",
            "must start with ws://, wss://, http:// or https://, got 'ftp://x'",
        ),
        ("[livekit]\nurl = 1\n", "livekit.url", "must start with ws://"),
        ('[livekit]\napi_key = ""\n', "livekit.api_key", "must be a non-empty string, got ''"),
        ("[livekit]\napi_key = 1\n", "livekit.api_key", "must be a non-empty string, got 1"),
        ('[livekit]\napi_secret = ""\n', "livekit.api_secret", "must be a non-empty string"),
        (
            "[livekit]\napi_secret = 7\n",
            "livekit.api_secret",
            "must be a non-empty string, got an integer (value not shown)",
        ),
        ('[daemon]\ncontrol_socket = ""\n', "daemon.control_socket", "must be a non-empty str"),
        ("[daemon]\ncontrol_socket = 1\n", "daemon.control_socket", "must be a non-empty str"),
    ],
)
def test_bad_livekit_and_daemon_values(text: str, field: str, message: str) -> None:
    err = rejects(text + MINIMAL, field=field)
    assert message in err.message


def test_two_automatic_agents_in_one_pool() -> None:
    text = """\
    [agents.a]
    entrypoint = "m:f"
    dispatch = "automatic"
    [agents.mid]
    entrypoint = "m:f"
    [agents.b]
    entrypoint = "m:g"
    dispatch = "automatic"
    """
    err = rejects(text, agent="b", field="dispatch")
    assert err.message == (
        "automatic agents 'a' and 'b' have the same namespace '' and job_type 'room'; "
        "LiveKit would treat them as one worker pool"
    )


def test_two_automatic_agents_in_one_named_pool() -> None:
    text = """\
    [agents.a]
    entrypoint = "m:f"
    dispatch = "automatic"
    namespace = "ns"
    job_type = "participant"
    [agents.b]
    entrypoint = "m:f"
    dispatch = "automatic"
    namespace = "ns"
    job_type = "participant"
    """
    err = rejects(text, agent="b", field="dispatch")
    assert "namespace 'ns' and job_type 'participant'" in err.message


def test_first_error_in_file_order_wins() -> None:
    text = agent_with("max_jobs = 0", name="first") + agent_with("max_jobs = -1", name="second")
    rejects(text, agent="first", field="max_jobs")


# --- reading files ---


def test_load_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError) as info:
        load_manifest("agents.toml")
    assert str(info.value) == "agents.toml: cannot read file: No such file or directory"
    assert info.value.agent is None and info.value.field is None


def test_load_directory(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="cannot read file: Is a directory"):
        load_manifest(tmp_path)


def test_load_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_bytes(b'[agents.a]\nentrypoint = "m:f"\n# \xff\n')
    with pytest.raises(ManifestError, match="cannot read file: not UTF-8 text"):
        load_manifest(path)


def test_load_invalid_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("agents.toml").write_text('[agents.echo]\nentrypoint = "m:f"\nmax_jobs\n')
    with pytest.raises(ManifestError) as info:
        load_manifest("agents.toml")
    line = str(info.value)
    assert line.startswith("agents.toml: invalid TOML: ")
    assert "(at line 3, column 9)" in line
    assert "\n" not in line


def test_parse_invalid_toml_duplicate_agent() -> None:
    text = '[agents.a]\nentrypoint = "m:f"\n[agents.a]\nentrypoint = "m:g"\n'
    with pytest.raises(ManifestError, match=r"^agents\.toml: invalid TOML: "):
        parse(text)


# --- the entrypoint import check ---


def write_project(root: Path, modules: dict[str, str], agents: dict[str, str]) -> Manifest:
    """Write modules (dotted name -> source) and a manifest naming ``agents`` under ``root``."""
    for dotted, source in modules.items():
        parts = dotted.split(".")
        for depth in range(1, len(parts)):
            package = root.joinpath(*parts[:depth])
            package.mkdir(exist_ok=True)
            (package / "__init__.py").touch()
        root.joinpath(*parts[:-1], parts[-1] + ".py").write_text(textwrap.dedent(source))
    lines = [f'[agents.{name}]\nentrypoint = "{ep}"\n' for name, ep in agents.items()]
    (root / "agents.toml").write_text("".join(lines))
    return load_manifest(root / "agents.toml")


GOOD = "def entrypoint(ctx):\n    pass\n"


def check_fails(manifest: Manifest, agent: str) -> str:
    with pytest.raises(ManifestError) as info:
        check_entrypoints(manifest)
    err = info.value
    assert (err.agent, err.field) == (agent, "entrypoint")
    line = str(err)
    assert "\n" not in line
    assert line.startswith(f"{manifest.path}: agent {agent!r}: field 'entrypoint': ")
    return err.message


@pytest.mark.e2e
def test_check_entrypoints_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = write_project(
        tmp_path,
        {"proj.agents.echo": GOOD, "solo": "class Agent:\n    pass\n"},
        {"echo": "proj.agents.echo:entrypoint", "again": "proj.agents.echo:entrypoint",
         "cls": "solo:Agent"},
    )  # fmt: skip
    monkeypatch.chdir("/")  # imports are relative to the manifest, not to the cwd
    checked = check_entrypoints(manifest)
    assert "proj" not in sys.modules and "solo" not in sys.modules  # never imported here
    assert list(checked.agents) == ["echo", "again", "cls"]
    for spec in checked.agents.values():
        assert spec.app == _lkrun_function()
        assert spec == dataclasses.replace(manifest.agents[spec.name], app=spec.app)


@pytest.mark.e2e
def test_check_entrypoints_keeps_existing_pythonpath(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "helper.py").write_text("VALUE = 1\n")
    app = tmp_path / "app"
    app.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(lib), os.environ.get("PYTHONPATH", "")]))
    manifest = write_project(app, {"uses": "import helper\n" + GOOD}, {"a": "uses:entrypoint"})
    # Without lib on the check's PYTHONPATH, "import helper" would fail the check.
    [spec] = check_entrypoints(manifest).agents.values()
    assert spec.app == _lkrun_function()


@pytest.mark.e2e
def test_check_entrypoints_missing_module(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, {"examples.echo": GOOD}, {"echo": "examples.ech:main"})
    message = check_fails(manifest, "echo")
    assert message == "cannot import module 'examples.ech': No module named 'examples.ech'"


@pytest.mark.e2e
def test_check_entrypoints_missing_attribute(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, {"x.y": GOOD}, {"a": "x.y:main"})
    assert check_fails(manifest, "a") == "module 'x.y' has no attribute 'main'"


@pytest.mark.e2e
def test_check_entrypoints_not_callable(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, {"x.y": "thing = 42\n"}, {"a": "x.y:thing"})
    assert check_fails(manifest, "a") == "'x.y:thing' is not callable (type int)"


@pytest.mark.e2e
def test_check_entrypoints_module_raises(tmp_path: Path) -> None:
    source = "raise RuntimeError('boom\\nsecond line')\n"
    manifest = write_project(tmp_path, {"bad": source}, {"a": "bad:main"})
    assert (
        check_fails(manifest, "a") == "cannot import module 'bad': RuntimeError: boom second line"
    )


@pytest.mark.e2e
def test_check_entrypoints_module_exits(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, {"quits": "import sys\nsys.exit(3)\n"}, {"a": "quits:f"})
    assert check_fails(manifest, "a") == "cannot import module 'quits': SystemExit: 3"


@pytest.mark.e2e
def test_check_entrypoints_syntax_error(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, {"broken": "def f(:\n"}, {"a": "broken:f"})
    assert check_fails(manifest, "a").startswith("cannot import module 'broken': SyntaxError: ")


@pytest.mark.e2e
def test_check_entrypoints_module_prints_to_stdout(tmp_path: Path) -> None:
    source = """\
    import os, sys
    print('{"not": "json"}')
    sys.stdout.write("partial line")
    os.write(1, b"raw fd write\\n")
    def entrypoint(ctx):
        pass
    """
    manifest = write_project(tmp_path, {"noisy": source}, {"a": "noisy:entrypoint"})
    # The result still parses: what the module printed went to stderr, not into it.
    [spec] = check_entrypoints(manifest).agents.values()
    assert spec.app == _lkrun_function()


@pytest.mark.e2e
def test_check_entrypoints_reports_first_failure_in_file_order(tmp_path: Path) -> None:
    manifest = write_project(
        tmp_path,
        {"ok": GOOD, "bad": "raise ValueError('x')\n"},
        {"first": "ok:entrypoint", "second": "ok:missing", "third": "bad:entrypoint"},
    )
    assert check_fails(manifest, "second") == "module 'ok' has no attribute 'missing'"


@pytest.mark.e2e
def test_check_entrypoints_background_thread_does_not_block(tmp_path: Path) -> None:
    source = "import threading, time\nthreading.Thread(target=time.sleep, args=(600,)).start()\n"
    manifest = write_project(tmp_path, {"threads": source + GOOD}, {"a": "threads:entrypoint"})
    # A check still waiting for the thread would be killed at the timeout and raise.
    [spec] = check_entrypoints(manifest, timeout=30).agents.values()
    assert spec.app == _lkrun_function()


@pytest.mark.e2e
def test_check_entrypoints_timeout(tmp_path: Path) -> None:
    manifest = write_project(tmp_path, {"slow": "import time\ntime.sleep(600)\n"}, {"a": "slow:f"})
    with pytest.raises(ManifestError) as info:
        check_entrypoints(manifest, timeout=1)
    assert "took longer than 1s" in str(info.value)
    assert str(info.value).startswith(f"{manifest.path}: ")


@pytest.mark.parametrize(
    ("value", "expected"), [('"10s"', 10.0), ("5", 5.0), ('"off"', math.inf), ("0", 0.0)]
)
def test_overload_after_accepted(value: str, expected: float) -> None:
    daemon = parse(f"[daemon]\noverload_after = {value}\n" + MINIMAL).daemon
    assert daemon.overload_after == expected
    assert parse(MINIMAL).daemon.overload_after == 30.0


def test_bad_overload_after() -> None:
    err = rejects(f'[daemon]\noverload_after = "soon"\n{MINIMAL}', field="daemon.overload_after")
    assert err.message == 'must be a duration such as "30s" or "2m", or "off", got \'soon\''


def test_daemon_name_and_state_dir(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text('[daemon]\nname = "host-a"\nstate_dir = "state"\n' + MINIMAL)
    daemon = load_manifest(path).daemon
    assert daemon.name == "host-a"
    assert daemon.state_dir == tmp_path / "state"  # relative to the manifest
    assert parse(MINIMAL).daemon.name == "" and parse(MINIMAL).daemon.state_dir is None


def _lkrun_function() -> AppInfo:
    """What the import check says of an lkrun function on the daemon's own interpreter."""
    from livekit import rtc

    return AppInfo(
        framework="lkrun",
        kind="function",
        python_version=platform.python_version(),
        livekit_version=rtc.__version__,
    )
