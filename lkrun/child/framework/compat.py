"""The parts of livekit-agents that lkrun relies on, checked once at load time.

lkrun builds the framework's JobContext the way the official job process does
(``livekit/agents/ipc/job_proc_lazy_main.py``), which needs a few private names. They
change between minor versions, so the import check fails with a clear message when one is
missing, and the test suite runs real apps against the pinned version.
"""

from __future__ import annotations

import importlib
from typing import Any

from livekit.agents import version as _version

from lkrun.child.appkind import AppError

TESTED_SERIES = (1, 8)
VERSION = _version.__version__

# (module, attribute path): what lkrun uses that the framework does not document.
PRIVATE = (
    ("livekit.agents.job", "_JobContextVar"),
    ("livekit.agents.job", "RunningJobInfo"),
    ("livekit.agents.job", "JobAcceptArguments"),
    ("livekit.agents.job", "JobExecutorType"),
    ("livekit.agents.job", "JobContext._on_setup"),
    ("livekit.agents.job", "JobContext._on_cleanup"),
    ("livekit.agents.job", "JobContext._on_session_end"),
    ("livekit.agents.utils.http_context", "_new_session_ctx"),
    ("livekit.agents.utils.http_context", "_close_http_ctx"),
    ("livekit.agents.utils.http_context", "_set_default_cert_env"),
    ("livekit.agents.ipc.inference_executor", "InferenceExecutor"),
    ("livekit.agents.worker", "ServerEnvOption"),
    ("livekit.agents.worker", "ServerOptions"),
    ("livekit.agents.worker", "ServerType"),
)
# Also read, each checked where it is used: AgentServer's private attributes
# (server_attribute below; the defaults from its __init__ signature), the JobContext's
# _primary_agent_session, _shutdown_callbacks and _pending_tasks (tests build one), and
# the preload module livekit.agents.ipc._preload (imported by name: an ImportError there
# fails the fork server with the module's name).


def missing() -> list[str]:
    """The private names this livekit-agents lacks."""
    gone = []
    for module_name, path in PRIVATE:
        try:
            value: Any = importlib.import_module(module_name)
            for part in path.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError):
            gone.append(f"{module_name}.{path}")
    return gone


def check() -> None:
    """AppError unless this livekit-agents has what lkrun needs to host its apps."""
    if gone := missing():
        raise AppError(
            f"livekit-agents {VERSION} lacks what lkrun needs to host its apps "
            f"({', '.join(gone)}); lkrun supports livekit-agents "
            f"{TESTED_SERIES[0]}.{TESTED_SERIES[1]}.x"
        )


def untested_warning() -> str | None:
    parts = VERSION.split(".")
    try:
        series = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        series = (0, 0)
    if series == TESTED_SERIES:
        return None
    tested = f"{TESTED_SERIES[0]}.{TESTED_SERIES[1]}.x"
    return f"livekit-agents {VERSION} is not the series lkrun is tested with ({tested})"


def server_attribute(server: Any, name: str) -> Any:
    """A private attribute of an AgentServer; AppError naming the version if it is gone."""
    try:
        return getattr(server, name)
    except AttributeError:
        raise AppError(
            f"livekit-agents {VERSION}: AgentServer has no {name}; lkrun supports "
            f"livekit-agents {TESTED_SERIES[0]}.{TESTED_SERIES[1]}.x"
        ) from None
