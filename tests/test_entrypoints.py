"""What the entrypoint check finds out about an app, and how its settings apply; no network."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from lkrun.entrypoints import apply_app, check_entrypoints
from lkrun.manifest import AgentSpec, Manifest, ManifestError, Permissions, load_manifest

pytestmark = pytest.mark.e2e  # import check subprocesses


SERVER_APP = """\
from livekit.agents import AgentServer, JobContext, JobProcess, JobRequest, WorkerPermissions

def setup(proc: JobProcess) -> None:
    proc.userdata["x"] = 1

server = AgentServer(
    setup_fnc=setup,
    num_idle_processes=2,
    job_memory_limit_mb=300.5,
    initialize_process_timeout=20,
    shutdown_process_timeout=7,
    permissions=WorkerPermissions(can_publish=False),
    load_threshold=0.5,
)

async def on_request(req: JobRequest) -> None:
    await req.accept()

@server.rtc_session(agent_name="named-in-app", on_request=on_request)
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
"""

PLAIN_SERVER = """\
from livekit.agents import AgentServer, JobContext

server = AgentServer()

@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    pass
"""

OPTIONS_APP = """\
from livekit.agents import JobContext, WorkerOptions, WorkerType

async def entrypoint(ctx: JobContext) -> None:
    pass

opts = WorkerOptions(entrypoint_fnc=entrypoint, agent_name="opts", worker_type=WorkerType.PUBLISHER)
"""


def project(root: Path, modules: dict[str, str], manifest: str) -> Manifest:
    for name, source in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(source))
    (root / "agents.toml").write_text(textwrap.dedent(manifest))
    return load_manifest(root / "agents.toml")


def test_agent_server_settings_fill_in_what_the_manifest_leaves_unset(tmp_path: Path) -> None:
    manifest = project(
        tmp_path,
        {"app": SERVER_APP},
        """\
        [agents.named-in-app]
        entrypoint = "app:server"

        [agents.overridden]
        entrypoint = "app:server"
        idle_processes = 0
        permissions = { can_publish = true }
        """,
    )
    agents = check_entrypoints(manifest).agents
    spec = agents["named-in-app"]
    assert spec.app is not None and spec.app.framework == "livekit-agents"
    assert spec.app.kind == "AgentServer" and spec.app.version.startswith("1.8.")
    assert spec.app.setup and spec.app.on_request and not spec.app.on_session_end
    assert spec.dispatch == "explicit" and spec.job_type == "room"
    assert spec.idle_processes == 2
    assert spec.memory_limit_mb == 301  # rounded up: never a lower limit than asked
    assert spec.prewarm_timeout == 20.0 and spec.shutdown_timeout == 7.0
    assert spec.permissions == Permissions(can_publish=False)
    assert spec.app.applied == (
        "permissions",
        "idle_processes",
        "memory_limit_mb",
        "prewarm_timeout",
        "shutdown_timeout",
    )
    assert any("load_threshold" in w for w in spec.app.warnings)  # reported, not used

    # What the manifest sets wins.
    other = agents["overridden"]
    assert other.idle_processes == 0 and other.permissions == Permissions(can_publish=True)
    assert other.memory_limit_mb == 301
    assert "idle_processes" not in other.app.applied  # type: ignore[union-attr]
    # The table key names the agent; a different name in the app is a warning.
    assert any("'named-in-app' is not used" in w for w in other.app.warnings)  # type: ignore[union-attr]
    assert not any("is not used: lkrun registers" in w for w in spec.app.warnings)


def test_server_without_agent_name_means_automatic_dispatch(tmp_path: Path) -> None:
    manifest = project(
        tmp_path,
        {"plain": PLAIN_SERVER},
        """\
        [agents.auto]
        entrypoint = "plain:server"

        [agents.pinned]
        entrypoint = "plain:server"
        dispatch = "explicit"
        namespace = "other"
        """,
    )
    agents = check_entrypoints(manifest).agents
    assert agents["auto"].dispatch == "automatic" and agents["auto"].registered_name == ""
    assert agents["auto"].app.applied == ("dispatch",)  # type: ignore[union-attr]
    assert agents["auto"].app.warnings == ()  # type: ignore[union-attr]  # nothing to report
    assert agents["pinned"].dispatch == "explicit"
    # Nothing else differs from the framework's defaults: lkrun's own defaults stay.
    assert agents["auto"].idle_processes == 0 and agents["auto"].prewarm_timeout == 60.0


def test_two_automatic_apps_in_one_pool_are_refused(tmp_path: Path) -> None:
    manifest = project(
        tmp_path,
        {"plain": PLAIN_SERVER},
        '[agents.a]\nentrypoint = "plain:server"\n[agents.b]\nentrypoint = "plain:server"\n',
    )
    with pytest.raises(ManifestError, match="LiveKit would treat them as one worker pool"):
        check_entrypoints(manifest)


def test_worker_options_and_the_function_an_agent_server_registered(tmp_path: Path) -> None:
    manifest = project(
        tmp_path,
        {"opts": OPTIONS_APP, "app": SERVER_APP},
        """\
        [agents.opts]
        entrypoint = "opts:opts"

        [agents.by-function]
        entrypoint = "app:entrypoint"
        """,
    )
    agents = check_entrypoints(manifest).agents
    assert agents["opts"].app.kind == "ServerOptions"  # type: ignore[union-attr]
    assert agents["opts"].job_type == "publisher"
    # Naming the decorated function still finds its server, and with it on_request.
    by_function = agents["by-function"].app
    assert by_function is not None and by_function.kind == "AgentServer"
    assert by_function.on_request and by_function.setup


@pytest.mark.parametrize(
    ("source", "framework"),
    [
        ("from livekit.agents import JobContext\nasync def entry(ctx: JobContext): pass\n",
         "livekit-agents"),
        ("from lkrun.context import JobContext\nasync def entry(ctx: JobContext): pass\n",
         "lkrun"),
        ("from livekit import agents\nasync def entry(ctx): pass\n", "livekit-agents"),
        ("async def entry(ctx): pass\n", "lkrun"),
        ("from __future__ import annotations\nfrom livekit.agents import JobContext\n"
         "from lkrun.context import JobContext as Mine\nasync def entry(ctx: Mine): pass\n",
         "lkrun"),
    ],
)  # fmt: skip
def test_detects_which_api_a_function_is_written_for(
    tmp_path: Path, source: str, framework: str
) -> None:
    manifest = project(tmp_path, {"mod": source}, '[agents.a]\nentrypoint = "mod:entry"\n')
    [spec] = check_entrypoints(manifest).agents.values()
    assert spec.app is not None and spec.app.framework == framework


def test_framework_field_overrides_detection(tmp_path: Path) -> None:
    manifest = project(
        tmp_path,
        {"mod": "async def entry(ctx): pass\n", "app": PLAIN_SERVER},
        """\
        [agents.forced]
        entrypoint = "mod:entry"
        framework = "livekit-agents"

        [agents.wrong]
        entrypoint = "app:server"
        framework = "lkrun"
        namespace = "x"
        """,
    )
    with pytest.raises(ManifestError) as info:
        check_entrypoints(manifest)
    assert info.value.agent == "wrong" and info.value.field == "entrypoint"
    assert "'app:server' is not callable (type AgentServer)" in str(info.value)


def test_an_agent_server_without_a_session_is_refused(tmp_path: Path) -> None:
    source = "from livekit.agents import AgentServer\nserver = AgentServer()\n"
    manifest = project(tmp_path, {"empty": source}, '[agents.a]\nentrypoint = "empty:server"\n')
    with pytest.raises(ManifestError, match="has no session entrypoint; register one with"):
        check_entrypoints(manifest)


BLOCK_AGENTS = """\
import sys

class _NoAgents:
    def find_spec(self, name, path=None, target=None):
        if name == "livekit.agents" or name.startswith("livekit.agents."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoAgents())
"""


def test_without_livekit_agents_the_check_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A sitecustomize that hides livekit-agents, as on a machine without the extra.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCK_AGENTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(blocker), os.environ["PYTHONPATH"]])
                       if os.environ.get("PYTHONPATH") else str(blocker))  # fmt: skip
    app = tmp_path / "proj"
    app.mkdir()
    manifest = project(
        app,
        {"voice": PLAIN_SERVER, "native": "async def entrypoint(ctx): pass\n"},
        '[agents.native]\nentrypoint = "native:entrypoint"\n'
        '[agents.voice]\nentrypoint = "voice:server"\n',
    )
    with pytest.raises(ManifestError) as info:
        check_entrypoints(manifest)
    line = str(info.value)
    assert info.value.agent == "voice" and "\n" not in line
    assert "No module named 'livekit.agents'" in line
    assert "pip install 'lkrun[agents]'" in line
    # lkrun's own agents keep working without it.
    (app / "agents.toml").write_text('[agents.native]\nentrypoint = "native:entrypoint"\n')
    check_entrypoints(load_manifest(app / "agents.toml"))


def test_apply_app_keeps_an_lkrun_function_as_it_is() -> None:
    spec = AgentSpec(name="echo", entrypoint="m:f", explicit=frozenset({"entrypoint"}))
    resolved = apply_app(Path("agents.toml"), spec, {"framework": "lkrun", "kind": "function"})
    assert resolved.app is not None and resolved.app.summary() == "lkrun function"
    assert resolved.dispatch == "explicit" and resolved.app.applied == ()


ENV_APP = """\
import os

from livekit.agents import AgentServer, JobContext

if "LIVEKIT_API_SECRET" in os.environ:
    raise RuntimeError("the API secret reached the import check")
if "LKRUN_DASHBOARD_TOKEN" in os.environ:
    raise RuntimeError("the dashboard token reached the import check")

server = AgentServer(num_idle_processes=int(os.environ.get("IDLE", "0")))


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    pass
"""


def test_the_check_imports_with_each_agents_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIVEKIT_API_KEY", "key")
    monkeypatch.setenv("LIVEKIT_API_SECRET", "secret-value")
    monkeypatch.setenv("LKRUN_DASHBOARD_TOKEN", "dashboard-token-value")  # never passed on
    manifest = project(
        tmp_path,
        {"envapp": ENV_APP},
        """\
        [agents.one]
        entrypoint = "envapp:server"
        dispatch = "explicit"
        env = { IDLE = "1" }

        [agents.two]
        entrypoint = "envapp:server"
        dispatch = "explicit"
        env = { IDLE = "2" }
        """,
    )
    agents = check_entrypoints(manifest).agents
    assert agents["one"].idle_processes == 1 and agents["two"].idle_processes == 2
    # An agent that asks for the credentials gets them, in the check as in its jobs.
    (tmp_path / "agents.toml").write_text(
        '[agents.one]\nentrypoint = "envapp:server"\ndispatch = "explicit"\n'
        "pass_credentials = true\n"
    )
    with pytest.raises(ManifestError, match="the API secret reached the import check"):
        check_entrypoints(load_manifest(tmp_path / "agents.toml"))


def test_an_unusable_app_setting_is_refused_like_a_manifest_value(tmp_path: Path) -> None:
    source = PLAIN_SERVER.replace("AgentServer()", "AgentServer(num_idle_processes=-1)")
    manifest = project(tmp_path, {"bad": source}, '[agents.a]\nentrypoint = "bad:server"\n')
    with pytest.raises(ManifestError) as info:
        check_entrypoints(manifest)
    assert (info.value.agent, info.value.field) == ("a", "idle_processes")
    assert info.value.message == (
        "the app's num_idle_processes is unusable: must be an integer >= 0, got -1"
    )


def test_an_app_initialize_process_timeout_of_zero_is_refused(tmp_path: Path) -> None:
    # Issue 17 item 9: every start of such an agent would time out at once.
    source = PLAIN_SERVER.replace("AgentServer()", "AgentServer(initialize_process_timeout=0)")
    manifest = project(tmp_path, {"zero": source}, '[agents.a]\nentrypoint = "zero:server"\n')
    with pytest.raises(ManifestError) as info:
        check_entrypoints(manifest)
    err = info.value
    assert (err.file, err.agent, err.field) == (manifest.path, "a", "prewarm_timeout")
    assert err.message == (
        "the app's initialize_process_timeout is unusable: must be a duration above 0, got 0.0"
    )
    assert "\n" not in str(err)
    # The manifest's own value wins over the app's, so setting it is the way out.
    (tmp_path / "agents.toml").write_text(
        '[agents.a]\nentrypoint = "zero:server"\nprewarm_timeout = "5s"\n'
    )
    [spec] = check_entrypoints(load_manifest(tmp_path / "agents.toml")).agents.values()
    assert spec.prewarm_timeout == 5.0


def test_a_bad_job_log_level_in_the_daemons_environment_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Jobs inherit the daemon's environment: a level there fails every job as one in env does.
    monkeypatch.setenv("LKRUN_JOB_LOG_LEVEL", "verbose")
    manifest = project(
        tmp_path, {"plain": PLAIN_SERVER}, '[agents.a]\nentrypoint = "plain:server"\n'
    )
    with pytest.raises(ManifestError) as info:
        check_entrypoints(manifest)
    assert (info.value.agent, info.value.field) == ("a", "env")
    assert (
        "LKRUN_JOB_LOG_LEVEL in the daemon's environment must be a log level" in info.value.message
    )
    # The agent's own env overrides the daemon's.
    (tmp_path / "agents.toml").write_text(
        '[agents.a]\nentrypoint = "plain:server"\nenv = { LKRUN_JOB_LOG_LEVEL = "debug" }\n'
    )
    [spec] = check_entrypoints(load_manifest(tmp_path / "agents.toml")).agents.values()
    assert spec.env["LKRUN_JOB_LOG_LEVEL"] == "debug"


def test_pool_clash_from_apps_says_where_the_dispatch_came_from(tmp_path: Path) -> None:
    manifest = project(
        tmp_path,
        {"plain": PLAIN_SERVER},
        '[agents.a]\nentrypoint = "plain:server"\n[agents.b]\nentrypoint = "plain:server"\n',
    )
    with pytest.raises(ManifestError, match='its app names no agent: set dispatch = "explicit"'):
        check_entrypoints(manifest)


def test_a_slow_request_timeout_is_a_warning(tmp_path: Path) -> None:
    manifest = project(
        tmp_path,
        {"app": SERVER_APP},
        '[agents.named-in-app]\nentrypoint = "app:server"\nrequest_timeout = "5s"\n',
    )
    [spec] = check_entrypoints(manifest).agents.values()
    assert any("LiveKit waits about 3s for an answer" in w for w in spec.app.warnings)  # type: ignore[union-attr]
