"""`make bench`: lkrun against the official LiveKit Agents worker on one livekit-server.

Run it with ``python -m tests.bench --help``; see ``tests/bench/run.py``.
"""
