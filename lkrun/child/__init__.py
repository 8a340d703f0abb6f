"""What runs inside the processes the daemon starts: job processes (runner), fork servers
(zygote), the entrypoint import check, and the livekit-agents hosting they load (apps,
framework), with the pipe protocol and the process controls they share with the daemon.

Nothing here imports the daemon side: these modules load before user code, in processes
that must start fast and stay small (tests/test_layout.py checks it). The daemon imports
from here, never the other way round. ``lkrun.context``, the API of lkrun's own agents,
is the one module outside this package that job processes load.
"""
