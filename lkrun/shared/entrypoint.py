"""What the daemon and the child side both know of an agent's entrypoint: how the manifest's
``entrypoint`` splits into a module (or a file) and an attribute, and the names of the APIs
an entrypoint may be written for (the manifest's ``framework``, the import check's answer).

The daemon parses and validates entrypoints (lkrun.manifest) and reads which framework each
agent's app uses (lkrun.daemon); the child side imports what they name (lkrun.child.apps)
and tells the framework (lkrun.child.kinds). Standard library only, like all of
lkrun.shared.
"""

from __future__ import annotations

LKRUN = "lkrun"  # async def entrypoint(ctx: lkrun.context.JobContext)
LIVEKIT_AGENTS = "livekit-agents"  # an AgentServer, ServerOptions or framework entrypoint
AUTO = "auto"  # told by the import check (lkrun.child.kinds.detect)
FRAMEWORKS = (LKRUN, LIVEKIT_AGENTS)


def split_entrypoint(spec: str) -> tuple[str, str]:
    """``(module or file, attribute)`` of an entrypoint; a file's path may contain ':'."""
    source, _, name = spec.rpartition(":")
    return source, name


def is_file_source(source: str) -> bool:
    """Whether an entrypoint's module part names a file rather than a module."""
    return source.endswith(".py") or "/" in source
