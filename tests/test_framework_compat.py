"""lkrun.child.framework.compat: what lkrun needs of livekit-agents, checked per version.

The real versions run in tests/test_framework_versions.py; here the failure and warning
paths run against fake modules and made-up version strings, and a scan of the shim's
source keeps NEEDED complete (a name the shim starts using must be added to it).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from livekit import rtc
from livekit.agents import AgentServer, JobContext, JobProcess
from livekit.agents.job import JobExecutorType

from lkrun.child import apps, importcheck, kinds
from lkrun.child.appkind import AppError
from lkrun.child.framework import compat, job
from lkrun.child.framework.inference import NoInference
from lkrun.child.framework.job import running_job_info

SHIM = Path(compat.__file__).parent


def fake_modules(**modules: Any) -> Any:
    """An import_module for ``missing``: each keyword (dots as '__') is a fake module."""
    table = {name.replace("__", "."): value for name, value in modules.items()}

    def import_module(name: str) -> ModuleType:
        if name not in table:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return table[name]

    return import_module


def test_the_daemons_livekit_agents_has_everything() -> None:
    assert compat.missing() == []
    compat.check()
    assert compat.untested_warning() is None  # the daemon's env holds a tested series


def test_missing_names_modules_and_attributes_that_are_gone() -> None:
    needs = (
        compat.Need("livekit.agents", "AgentServer"),
        compat.Need("livekit.agents.job", "JobContext._on_setup"),
        compat.Need("livekit.agents.job", "JobContext._on_cleanup"),
        compat.Need("livekit.agents.ipc.gone"),
    )
    job_context = type("JobContext", (), {"_on_cleanup": lambda self: None})
    import_module = fake_modules(
        livekit__agents=SimpleNamespace(),  # no AgentServer, as in 1.2.x
        livekit__agents__job=SimpleNamespace(JobContext=job_context),
    )
    assert compat.missing(needs, import_module) == [
        "livekit.agents.AgentServer",
        "livekit.agents.job.JobContext._on_setup",
        "livekit.agents.ipc.gone",
    ]


def test_check_fails_in_one_line_naming_version_interpreter_and_names() -> None:
    with pytest.raises(AppError) as caught:
        compat.check("1.2.18", ["livekit.agents.AgentServer", "livekit.agents.worker.ServerType"])
    text = str(caught.value)
    assert "\n" not in text
    assert "livekit-agents 1.2.18" in text and sys.executable in text
    assert "livekit.agents.AgentServer, livekit.agents.worker.ServerType" in text
    assert all(version in text for version in compat.TESTED)


def test_the_import_check_reports_missing_names_before_the_shim_imports_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gone = compat.Need("livekit.agents.job", "_GoneInThisVersion")
    monkeypatch.setattr(compat, "NEEDED", (*compat.NEEDED, gone))
    with pytest.raises(
        AppError, match=r"lacks 1 of the names lkrun needs.*job\._GoneInThisVersion"
    ):
        kinds.make_app("x:y", lambda ctx: None, None, "livekit-agents")


@pytest.mark.parametrize(
    ("version", "warned"),
    [
        ("1.8.0", False),
        ("1.8.9", False),
        ("1.8.12", False),  # a patch of a tested series: same names, feature-tested
        ("1.7.1", False),
        ("1.7.0", False),
        ("1.6.10", True),
        ("1.9.0rc1", True),
        ("2.0.0", True),
        ("dev", True),
    ],
)
def test_an_untested_series_is_a_warning(version: str, warned: bool) -> None:
    warning = compat.untested_warning(version)
    assert (warning is not None) == warned
    if warning is not None:
        assert f"livekit-agents {version} is not a version lkrun was tested with" in warning
        assert "1.7.x, 1.8.x" in warning


def test_the_version_is_read_when_called(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "VERSION", "1.6.10")
    warning = compat.untested_warning()
    assert warning is not None and warning.startswith("livekit-agents 1.6.10 is not a version")
    with pytest.raises(AppError, match=r"^livekit-agents 1\.6\.10 \(under "):
        compat.check(gone=["livekit.agents.job.Gone"])


def test_series() -> None:
    assert compat.series("1.8.9") == "1.8"
    assert compat.series("1.10.0.dev3") == "1.10"
    assert compat.series("weird") == "weird"
    assert compat.tested_series() == ["1.7", "1.8"]


class SyncCleanup:  # before 1.8.2
    def __init__(self) -> None:
        self.cleaned = False

    def _on_cleanup(self) -> None:
        self.cleaned = True


class AsyncCleanup(SyncCleanup):  # 1.8.2 and later
    async def _on_cleanup(self) -> None:  # type: ignore[override]
        self.cleaned = True


@pytest.mark.parametrize("cls", [SyncCleanup, AsyncCleanup])
async def test_cleanup_job_either_way(cls: type[SyncCleanup]) -> None:
    ctx = cls()
    await compat.cleanup_job(ctx)
    assert ctx.cleaned


def test_preload_modules_before_and_after_1_8_7() -> None:
    assert compat.preload_modules(SimpleNamespace()) == []
    assert compat.preload_modules(SimpleNamespace(preload_modules=None)) == []
    assert compat.preload_modules(SimpleNamespace(_preload_modules=["a"]), "_") == ["a"]


def test_the_version_specific_steps_find_this_versions_features() -> None:
    # 1.8.9 has each of them; the older versions' paths run in test_framework_versions.
    assert compat.preload_module() == "livekit.agents.ipc._preload"
    assert "received_at" in compat.running_job_info_fields()
    compat.set_default_cert_env()


async def test_instance_attributes_are_there() -> None:
    info = running_job_info({"job": {}, "url": "ws://x", "token": "t", "identity": "i"})
    proc = JobProcess(executor_type=JobExecutorType.PROCESS, user_arguments=None, http_proxy=None)
    ctx = JobContext(
        proc=proc,
        info=info,
        room=rtc.Room(),
        on_connect=lambda: None,
        on_shutdown=lambda reason: None,
        inference_executor=NoInference(),
    )
    server = AgentServer()

    @server.rtc_session()
    async def entrypoint(ctx: JobContext) -> None:
        pass

    try:
        for obj in (ctx, server):
            wanted = compat.INSTANCE_ATTRIBUTES[type(obj).__name__]
            assert [name for name in wanted if not hasattr(obj, name)] == []
    finally:
        ctx._tempdir.cleanup()


APP = """
from livekit.agents import AgentServer, JobContext

server = AgentServer()


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    pass
"""


def test_the_import_check_names_job_context_attributes_a_version_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "app.py").write_text(APP)
    spec = f"{tmp_path / 'app.py'}:server"
    assert job.missing_job_attributes() == []  # this version has them all
    assert importcheck.describe_entrypoint(spec, "auto")["error"] is None
    # A version whose JobContext no longer sets one of them: jobs would fail when they shut
    # down (FrameworkJob._clean_up reads _pending_tasks...).
    wanted = compat.INSTANCE_ATTRIBUTES["JobContext"]
    monkeypatch.setattr(
        compat,
        "INSTANCE_ATTRIBUTES",
        {**compat.INSTANCE_ATTRIBUTES, "JobContext": (*wanted, "_gone_in_this_version")},
    )
    job.missing_job_attributes.cache_clear()
    try:
        result = importcheck.describe_entrypoint(spec, "auto")
    finally:
        job.missing_job_attributes.cache_clear()
    assert result["app"] is None
    error = result["error"]
    assert "\n" not in error
    assert error.startswith(f"livekit-agents {compat.VERSION} (under {sys.executable}) lacks 1 ")
    assert error.endswith(": livekit.agents.job.JobContext._gone_in_this_version")
    # A job process or a fork server builds none before its job (make_app's default).
    target = apps.load_target(spec)
    assert kinds.make_app(spec, target, None, "auto").framework == "livekit-agents"


# -- NEEDED is complete: every livekit.agents name the shim uses is listed --------------------


# Besides the shim, the child-side modules that deal with framework apps before the shim
# is loaded (telling the kind, the install hints, the import check).
FRAMEWORK_AWARE = ("kinds.py", "importcheck.py", "apps.py")


def _scanned() -> list[Path]:
    shim = [path for path in sorted(SHIM.glob("*.py")) if path.name != "compat.py"]
    return shim + [SHIM.parent / name for name in FRAMEWORK_AWARE]


def _shim_uses() -> set[str]:
    """``module.name`` for each ``from livekit.agents... import name`` in the shim, and
    ``module.attr`` for each private attribute read off the http_context module and
    ``JobContext.attr`` for each read off a job context (``ctx``, ``self.ctx``), and
    ``livekit.agents.attr`` for each attribute read off a module named ``agents``."""
    used: set[str] = set()
    for path in _scanned():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "agents"
                and not node.attr.startswith("__")
            ):
                used.add(f"livekit.agents.{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "livekit.agents"
            ):
                used.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_"):
                if node.attr.startswith("__"):
                    continue
                base = node.value
                if isinstance(base, ast.Name) and base.id == "http_context":
                    used.add(f"livekit.agents.utils.http_context.{node.attr}")
                elif (isinstance(base, ast.Name) and base.id == "ctx") or (
                    isinstance(base, ast.Attribute) and base.attr == "ctx"
                ):
                    used.add(f"JobContext.{node.attr}")
    return used


def test_needed_lists_every_name_the_shim_uses() -> None:
    listed = {str(need) for need in compat.NEEDED}
    listed |= {f"{need.module}.{need.path.split('.')[0]}" for need in compat.NEEDED}
    instance = {f"JobContext.{name}" for name in compat.INSTANCE_ATTRIBUTES["JobContext"]}
    on_class = {
        f"JobContext.{need.path.split('.', 1)[1]}"
        for need in compat.NEEDED
        if need.path.startswith("JobContext.")
    }
    uses = _shim_uses()
    assert "livekit.agents.job._JobContextVar" in uses  # the scan sees the shim
    assert {p.name for p in _scanned()} >= {"kinds.py", "job.py", "app.py"}
    unlisted = sorted(u for u in uses if u not in listed | instance | on_class)
    assert unlisted == [], f"add these to compat.NEEDED or INSTANCE_ATTRIBUTES: {unlisted}"


def test_the_scan_sees_names_read_off_the_agents_module() -> None:
    assert "livekit.agents.WorkerOptions" not in _shim_uses()  # kinds.py goes through compat
    assert {str(n) for n in (*compat.APP_TYPES, compat.JOB_CONTEXT)} <= {
        str(n) for n in compat.NEEDED
    }


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("server = AgentServer()", "livekit-agents"),
        ("server = WorkerOptions(entrypoint_fnc=lambda ctx: None)", "livekit-agents"),
        ("async def server(ctx: JobContext) -> None: ...", "livekit-agents"),
        ("import lkrun.context\nasync def server(ctx: lkrun.context.JobContext): ...", "lkrun"),
    ],
)
def test_detect_tells_the_kind_through_compat(tmp_path: Path, source: str, kind: str) -> None:
    app = tmp_path / f"app_{abs(hash(source))}.py"
    app.write_text(f"from livekit.agents import AgentServer, JobContext, WorkerOptions\n{source}\n")
    assert kinds.detect(apps.load_target(f"{app}:server")) == kind


def test_a_long_list_of_missing_names_is_cut_with_a_count() -> None:
    gone = [f"livekit.agents.job.Name{i:02d}" for i in range(30)]
    with pytest.raises(AppError) as caught:
        compat.check("0.12.0", gone)
    text = str(caught.value)
    assert "lacks 30 of the names" in text and "livekit.agents.job.Name00" in text
    assert text.endswith(" more") and len(text) < 500  # the import check keeps 500
