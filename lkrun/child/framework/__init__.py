"""Hosting apps written with the official framework, livekit-agents, unchanged.

``app`` turns what an entrypoint names (an ``AgentServer``, a ``ServerOptions`` or a bare
``async def entrypoint(ctx: JobContext)``) into its functions and settings; ``job`` runs one
job with the framework's own ``JobContext``; ``requests`` answers job requests with the app's
``on_request``; ``compat`` holds what lkrun needs from the framework's private parts.

Everything here imports livekit.agents, an optional dependency (``pip install
'lkrun[agents]'``): only job processes of such apps, and the import check, load it.
"""
