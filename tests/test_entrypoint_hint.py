"""Without livekit-agents (issue 17 item 2): every way an app imports it gets the install
hint, and the example manifest needs nothing but lkrun.

The venv has livekit-agents; the import check runs with a ``sitecustomize`` on its
PYTHONPATH that hides ``livekit.agents`` and ``livekit.plugins`` as an install without the
extra would (the import system's own "No module named ..." errors).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lkrun.child.apps import INSTALL_HINT
from lkrun.entrypoints import check_entrypoints
from lkrun.manifest import ManifestError, load_manifest
from tests.conftest import REPO

pytestmark = pytest.mark.e2e  # import check subprocesses

HIDE = """\
import sys

class _Hide:
    # Hidden as if not installed: the import system raises what it raises for a package
    # that is not there.
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("livekit.agents", "livekit.plugins")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Hide())
"""


@pytest.fixture
def without_agents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A PYTHONPATH entry that hides livekit-agents from every Python started with it."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(HIDE)
    monkeypatch.setenv("PYTHONPATH", str(shim))
    return shim


def test_the_shim_hides_livekit_agents(without_agents: Path) -> None:
    probe = (
        "import livekit.rtc\ntry:\n import livekit.agents\nexcept ImportError:\n print('hidden')"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "hidden", result.stderr


IMPORT_FORMS = {
    "from_livekit_import_agents": "from livekit import agents",
    "from_livekit_agents_import": "from livekit.agents import AgentServer",
    "import_livekit_agents": "import livekit.agents",
    "import_livekit_agents_submodule": "import livekit.agents.voice",
    "from_livekit_plugins_import": "from livekit.plugins import silero",
    "import_plugin": "import livekit.plugins.silero",
}


@pytest.mark.parametrize("form", list(IMPORT_FORMS))
def test_every_import_form_gets_the_install_hint(
    form: str, tmp_path: Path, without_agents: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / f"{form}.py").write_text(f"{IMPORT_FORMS[form]}\n\nserver = None\n")
    (app / "agents.toml").write_text(f'[agents.a]\nentrypoint = "{form}:server"\n')
    with pytest.raises(ManifestError) as info:
        check_entrypoints(load_manifest(app / "agents.toml"))
    err = info.value
    assert (err.agent, err.field) == ("a", "entrypoint")
    assert err.message.startswith(f"cannot import module {form!r}: ")
    assert err.message.endswith(f"the module is a livekit-agents app; {INSTALL_HINT}")
    assert "\n" not in str(err)


def test_the_example_manifest_needs_no_extra(without_agents: Path) -> None:
    manifest = check_entrypoints(load_manifest(REPO / "agents.toml.example"))
    assert len(manifest.agents) == 7
    assert {spec.app.framework for spec in manifest.agents.values() if spec.app} == {"lkrun"}


def test_the_framework_example_manifest_says_what_to_install(without_agents: Path) -> None:
    with pytest.raises(ManifestError) as info:
        check_entrypoints(load_manifest(REPO / "agents-framework.toml.example"))
    err = info.value
    assert (err.agent, err.field) == ("assistant", "entrypoint")
    assert err.message == (
        "cannot import module 'lkrun.examples.assistant': cannot import name 'agents' from "
        f"'livekit' (unknown location): the module is a livekit-agents app; {INSTALL_HINT}"
    )


def test_the_framework_example_manifest_checks_with_the_extra() -> None:
    manifest = check_entrypoints(load_manifest(REPO / "agents-framework.toml.example"))
    [spec] = manifest.agents.values()
    assert spec.name == "assistant" and spec.pass_credentials is True
    assert spec.app is not None and (spec.app.framework, spec.app.kind) == (
        "livekit-agents",
        "AgentServer",
    )


@pytest.mark.parametrize(
    ("statement", "package"),
    [
        # Another plugin installed: the missing one is named.
        ("import livekit.plugins.silero_x", "livekit-plugins-silero-x"),
        # No plugin at all: livekit.plugins itself is missing.
        ("import livekit.plugins.silero_x", "livekit-plugins-<name>"),
    ],
    ids=["other-plugin-installed", "no-plugin-installed"],
)
def test_a_missing_plugin_beside_livekit_agents_says_what_to_install(
    statement: str, package: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if package != "livekit-plugins-<name>":
        namespace = tmp_path / "site" / "livekit" / "plugins" / "other"
        namespace.mkdir(parents=True)
        (namespace / "__init__.py").touch()
        monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    app = tmp_path / "app"
    app.mkdir()
    source = f"from livekit.agents import AgentServer\n{statement}\n\nserver = AgentServer()\n"
    (app / "plugged.py").write_text(source)
    (app / "agents.toml").write_text('[agents.a]\nentrypoint = "plugged:server"\n')
    with pytest.raises(ManifestError) as info:
        check_entrypoints(load_manifest(app / "agents.toml"))
    assert info.value.message.endswith(
        f"a livekit-agents plugin is missing; install it with: pip install {package}"
    )
