"""Helpers both sides import: the daemon and the processes it starts (job processes, fork
servers, the import check, the request process).

They live here rather than in either side's package so that the promise each package makes
about its imports holds: ``lkrun.child`` needs nothing of the daemon, and the daemon may use
the pipe protocol (``jobpipe``), process controls (``pdeathsig``), task ownership
(``tasks``) and text helpers (``text``) without reaching into the child side. Modules here
import only the standard library (tests/test_layout.py checks it), so they load under any
interpreter an agent runs on.
"""

# The child side: what the processes the daemon starts import of lkrun, as paths relative
# to the lkrun package directory. It imports nothing of the rest of lkrun (the daemon side)
# nor anything the daemon needs (tests/test_layout.py), so these files alone, put on
# sys.path as an ``lkrun`` package, run jobs under another interpreter.
CHILD_SIDE = ("__init__.py", "context.py", "child", "shared")

# The daemon's own interpreter (sys.executable), in the environment of every process it starts
# for an agent: a process under another one (an agent's ``python``) says what to install with
# that interpreter's pip, not the daemon's (lkrun.child.appkind.pip_install).
DAEMON_PYTHON_ENV = "LKRUN_DAEMON_PYTHON"
