"""The official LiveKit Agents worker under benchmark (run with the bench venv's python).

    BENCH_EVENTS=events.jsonl BENCH_AGENT_NAME=bench-official BENCH_IDLE=4 \\
    BENCH_HTTP_PORT=8089 BENCH_WORKLOAD=join LIVEKIT_URL=... python official_worker.py start

It uses only livekit-agents itself (no plugins, no inference). ``BENCH_WORKLOAD`` picks
the agent:

- ``join`` (default, and the ``recovery`` workload's): the entrypoint below joins the
  room and returns, so the job lasts while the room is connected, like lkrun's
  ``tests/bench/agents.py``.
- ``agents``: the ``AgentServer`` of ``tests/bench/lka_agent.py`` (an AgentSession with an
  in-process LLM), the same module lkrun runs, with the settings below applied to it.
- ``media``: the ``AgentServer`` of ``tests/bench/lka_meter.py`` (the level meter of
  ``lkrun/examples/level_meter.py`` written against livekit-agents), likewise.

Timestamps come from the worker itself, written as JSON lines to $BENCH_EVENTS:

- ``prewarm``: a job process finished initialising (``prewarm_fnc``), with its pid;
  every job process (idle or on-demand) goes through it once.
- ``entrypoint``: the entrypoint was called; ``entrypoint_at`` is ``time.time()`` in
  the job process and ``received_at`` is the worker's own wall-clock receipt of the
  AvailabilityRequest (``RunningJobInfo.received_at``, stamped in the worker's
  ``_handle_availability`` and passed to the job process), so
  ``entrypoint_at - received_at`` is offer -> entrypoint.
- ``registered``: the worker registered with LiveKit (``worker_registered`` event).

Limits: ``load_threshold = inf`` (never reports itself full) and, unless
``BENCH_LOAD=default``, a load function shaped like lkrun's (see ``lkrun_like_load``).
In the ``agents`` and ``media`` workloads ``lka_agent.py`` / ``lka_meter.py`` write the
``prewarm`` and ``entrypoint`` events themselves (the same fields).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from livekit import agents
from livekit.agents import AgentServer, JobContext, JobProcess, WorkerOptions, cli
from livekit.agents.worker import _DefaultLoadCalc

EVENTS = os.environ.get("BENCH_EVENTS", "")
# lkrun's max_jobs in the bench manifest (200, or the ramp's ceiling when it goes further).
MAX_JOBS = int(os.environ.get("BENCH_MAX_JOBS", "200"))


def emit(event: str, **fields: Any) -> None:
    if not EVENTS:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}) + "\n"
    # One O_APPEND write per line: lines from many processes never interleave.
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def prewarm(proc: JobProcess) -> None:
    emit("prewarm")


async def entrypoint(ctx: JobContext) -> None:
    entrypoint_at = time.time()
    info = ctx._info  # RunningJobInfo: the worker's dispatch timeline for this job
    emit(
        "entrypoint",
        job_id=ctx.job.id,
        room=ctx.job.room.name,
        entrypoint_at=entrypoint_at,
        received_at=info.received_at or None,
        accepted_at=info.accepted_at or None,
        assigned_at=info.assigned_at or None,
        launched_at=info.launched_at or None,
    )
    await ctx.connect()
    # Returning keeps the job alive until the room disconnects (the framework's
    # shutdown future), which is also how the lkrun bench agent behaves.


def lkrun_like_load(server: AgentServer) -> float:
    """A load shaped like lkrun's (max_jobs = BENCH_MAX_JOBS), kept below 0.7: never full.

    The default load_fnc reports the machine's CPU use; livekit-server sends a worker no
    job while its load is at or above its target load (0.7), so on a busy 2-core machine
    the default worker stops getting jobs long before load_threshold matters. lkrun
    reports max(jobs / max_jobs, CPU / load_threshold) scaled below 0.7 instead.
    """
    jobs = len(server.active_jobs) / MAX_JOBS
    cpu = _DefaultLoadCalc.get_load(server)
    return min(0.69, round(0.7 * max(jobs, cpu), 2))


def options() -> WorkerOptions:
    load = os.environ.get("BENCH_LOAD", "lkrun")
    return WorkerOptions(
        entrypoint_fnc=entrypoint,
        prewarm_fnc=prewarm,
        **({"load_fnc": lkrun_like_load} if load == "lkrun" else {}),
        agent_name=os.environ.get("BENCH_AGENT_NAME", "bench-official"),
        num_idle_processes=int(os.environ.get("BENCH_IDLE", "0")),
        # No CPU-based refusal: lkrun gets load_threshold = "off" and max_jobs = 200.
        load_threshold=math.inf,
        # The same patience as lkrun's (120 s) for a slow process start under load.
        initialize_process_timeout=float(os.environ.get("BENCH_INIT_TIMEOUT", "120")),
        drain_timeout=int(os.environ.get("BENCH_DRAIN_TIMEOUT", "5")),
        host="127.0.0.1",
        port=int(os.environ.get("BENCH_HTTP_PORT", "0")),
    )


def configure(server: AgentServer) -> AgentServer:
    """Give an app's own AgentServer the settings ``options()`` gives the join worker.

    AgentServer takes them only in its constructor, so they are set on the attributes the
    constructor fills (livekit-agents 1.8); a missing one fails loudly.
    """
    opts = options()
    values = {
        "_num_idle_processes": opts.num_idle_processes,
        "_load_threshold": opts.load_threshold,
        "_initialize_process_timeout": opts.initialize_process_timeout,
        "_drain_timeout": opts.drain_timeout,
        "_host": opts.host,
        "_port": opts.port,
    }
    for name, value in values.items():
        if not hasattr(server, name):
            raise RuntimeError(f"AgentServer has no {name}: not livekit-agents 1.8?")
        setattr(server, name, value)
    if os.environ.get("BENCH_LOAD", "lkrun") == "lkrun":
        server.load_fnc = lkrun_like_load
    return server


def make_server() -> AgentServer:
    workload = os.environ.get("BENCH_WORKLOAD", "join")
    # This script's folder is sys.path[0]; job processes import them by these names too.
    if workload == "agents":
        import lka_agent

        return configure(lka_agent.server)
    if workload == "media":
        import lka_meter

        return configure(lka_meter.server)
    return AgentServer.from_server_options(options())


def main() -> None:
    server = make_server()
    server.on(
        "worker_registered",
        lambda worker_id, *_: emit("registered", worker_id=worker_id, version=agents.__version__),
    )
    cli.run_app(server)


if __name__ == "__main__":
    main()
