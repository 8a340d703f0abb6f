"""What runs inside the processes the daemon starts: job processes (runner), fork servers
(zygote), the entrypoint import check, and the app kinds they host behind one interface
(appkind): lkrun's own apps (native) and livekit-agents apps (framework), picked by kinds
from what apps loads of the user's code.

Nothing here imports the daemon side: these modules load before user code, in processes
that must start fast and stay small, and possibly under an agent's own interpreter. They
import the standard library, ``livekit`` (rtc, protocol), and livekit-agents in
``framework`` only; of lkrun, only ``lkrun.context`` (the API of lkrun's own agents) and
``lkrun.shared`` (the helpers both sides use). The daemon imports from here, never the
other way round. tests/test_layout.py checks all of it; lkrun.shared.CHILD_SIDE lists the
files this side is made of.
"""
