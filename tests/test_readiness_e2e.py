"""Against the real server: an agent whose module takes long to import is not ready, and
LiveKit sees it FULL, until its fork server has loaded; its first job then starts fast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import unique, wait_for
from tests.helpers import agent_table, dispatch, job_in_room

GATED = "tests.agents.gated_import:entrypoint"
CPU_OFF = '[daemon]\nload_threshold = "off"\n\n'  # a busy shared machine must not refuse jobs


async def test_full_and_not_ready_until_the_fork_server_has_loaded(
    start_daemon: Any, livekit_server: Any, tmp_path: Path
) -> None:
    gate = tmp_path / "import-gate"
    name = unique("gated")
    manifest = CPU_OFF + agent_table(name, GATED, env={"LKRUN_TEST_IMPORT_GATE": str(gate)})
    daemon = await start_daemon(manifest, wait=False)

    async def registered() -> dict[str, Any] | None:
        try:
            status = await daemon.status()
        except Exception:  # the control socket is not up yet
            return None
        [agent] = status["agents"] or [None]
        return status if agent is not None and agent["connected"] else None

    status = await wait_for(registered, 30, what="the agent to register")
    [agent] = status["agents"]
    worker = agent["worker_id"]
    # Registered, its module still importing: FULL for LiveKit, not ready for orchestrators.
    assert not status["ready"] and "fork server is importing" in status["not_ready_reason"]
    assert agent["full"] and agent["full_reason"] == "starting"
    code, body = await daemon.http("/readyz")
    assert code == 503 and body["ready"] is False and name in body["reason"]
    await wait_for(
        lambda: livekit_server.worker_statuses(worker) == ["WS_FULL"],
        10,
        what="the server to see the worker FULL",
    )

    gate.touch()  # the import finishes
    ready = await daemon.wait_registered()
    assert not ready["agents"][0]["full"]
    code, body = await daemon.http("/readyz")
    assert code == 200 and body == {"ready": True}
    await wait_for(
        lambda: livekit_server.worker_statuses(worker) == ["WS_FULL", "WS_AVAILABLE"],
        10,
        what="the server to see the worker AVAILABLE (and never before)",
    )

    room = unique("first")
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room, "success")
    # Forked from a loaded zygote: no import on the way (it took 0.5-3.6 s when there was).
    assert job["started_at"] - job["offered_at"] < 0.4, job


GATE = "tests.lka_apps.gatekeeper:server"  # livekit-agents app with on_request


async def test_an_on_request_app_is_full_until_its_request_process_answers(
    start_daemon: Any, livekit_server: Any
) -> None:
    name = unique("gate")
    daemon = await start_daemon(CPU_OFF + agent_table(name, GATE), wait=False)
    seen: list[tuple[bool, str, bool | None]] = []  # while registered: ready, why full, requests

    async def ready() -> dict[str, Any] | None:
        try:
            status = await daemon.status()
        except Exception:  # the control socket is not up yet
            return None
        for agent in status["agents"]:
            if agent["connected"]:
                seen.append((status["ready"], agent["full_reason"], agent["request_process_ready"]))
        return status if status["ready"] else None

    status = await wait_for(ready, 90, interval=0.05, what="the daemon to be ready")
    [agent] = status["agents"]
    assert agent["request_process_ready"] is True and not agent["full"]
    # Registered before its request process was up, it said so: FULL and not ready.
    assert seen[0][:2] == (False, "starting"), seen
    assert all(not ok and why == "starting" for ok, why, up in seen if not up), seen
    await wait_for(
        lambda: livekit_server.worker_statuses(agent["worker_id"]) == ["WS_FULL", "WS_AVAILABLE"],
        10,
        what="the server to see the worker FULL, then AVAILABLE",
    )
    room = unique("room")  # at once: its offer is answered by on_request, not declined
    await dispatch(livekit_server, room, name)
    job = await job_in_room(daemon, room)
    assert job["agent"] == name
