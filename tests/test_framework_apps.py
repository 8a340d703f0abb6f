"""lkrun hosts unmodified livekit-agents apps (tests/lka_apps, none of which imports lkrun).

End to end against a real livekit-server: an AgentSession agent answering text, a
programmatic participant reading an observer's audio, a setup function's userdata, a
failing entrypoint, an AgentServer's own settings and request function, drain and
`jobs kill`, and the framework's shutdown order.
"""

from __future__ import annotations

import asyncio
import json
import math
import signal
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from livekit import rtc

from tests.conftest import observer, unique, wait_for, wait_for_participant
from tests.helpers import agent_table, dispatch, job_in_room, status_is

# Importing livekit-agents in a fork server, a warm process and a request process keeps
# two cores busy for a moment: with the CPU in the load, LiveKit would drop the test's
# dispatch to an agent reporting itself full (see issue 13). These tests are about hosting.
CPU_OFF = '[daemon]\nload_threshold = "off"\n'
VOICE = "tests.lka_apps.voice:server"
LISTENER = "tests.lka_apps.listener:entrypoint"
GATE = "tests.lka_apps.gatekeeper:server"


def events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def first(found: list[dict[str, Any]], name: str) -> int:
    return next(i for i, e in enumerate(found) if e["event"] == name)


class Transcripts:
    """Collects the text streams an agent sends on lk.transcription."""

    def __init__(self, room: rtc.Room) -> None:
        self.texts: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()
        room.register_text_stream_handler("lk.transcription", self._on_stream)

    def _on_stream(self, reader: rtc.TextStreamReader, identity: str) -> None:
        async def read() -> None:
            self.texts.append(await reader.read_all())

        task = asyncio.ensure_future(read())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def has(self, text: str) -> bool:
        return any(text in t for t in self.texts)


async def settled(daemon: Any, idle: int = 0) -> None:
    """Until the agent's helper processes are up (its request process, warm processes)."""

    async def ready() -> bool:
        return all(
            agent["request_process_ready"] in (None, True)
            and agent["idle_processes"] >= idle
            and not agent["full"]
            and (agent["fork_server_pid"] is not None or agent["start_method"] != "forkserver")
            for agent in (await daemon.status())["agents"]
        )

    await wait_for(ready, 60, what="the agent's processes to settle")


async def test_agent_session_app_answers_on_the_transcription_topic(
    start_daemon: Any, livekit_server: Any, tmp_path: Path
) -> None:
    name, room_name = unique("lka-voice"), unique("voice")
    log = tmp_path / "events.jsonl"
    daemon = await start_daemon(CPU_OFF + agent_table(name, VOICE, env={"LKA_EVENTS": str(log)}))
    [agent_status] = (await daemon.status())["agents"]
    assert agent_status["framework"] == "livekit-agents"
    assert agent_status["app"].startswith("livekit-agents 1.8.")
    assert "AgentServer (setup_fnc; on_session_end)" in agent_status["app"]
    # The app's agent_name ("lka-voice") differs from the manifest key: the key wins.
    assert agent_status["registered_name"] == name
    async with observer(livekit_server, room_name) as room:
        transcripts = Transcripts(room)
        await dispatch(livekit_server, room_name, name)
        agent = await wait_for_participant(room, "agent-")
        assert agent.attributes.get("lk.agent.name") == name  # as the official worker sets it
        await wait_for(
            lambda: "lk.agent.state" in agent.attributes, 30, what="the AgentSession to start"
        )
        await room.local_participant.send_text("hello lkrun", topic="lk.chat")
        await wait_for(lambda: transcripts.has("echo: hello lkrun"), 30, what="the agent's reply")
        job = await job_in_room(daemon, room_name, "running")
        # The official worker's identity and (empty) name: the manifest sets neither.
        assert (agent.identity, agent.name) == (f"agent-{job['id']}", "")
        assert job["identity"] == agent.identity

        # `lkrun jobs kill` asks the job to shut down: the framework's order follows.
        killed = daemon.cli("jobs", "kill", job["id"])
        assert killed.returncode == 0, killed.stderr
        await wait_for(lambda: status_is(daemon, job["id"], "success"), 30, what="a success")

    found = events(log)
    [entry] = [e for e in found if e["event"] == "entrypoint"]
    assert entry["job_id"] == job["id"] and entry["room"] == room_name
    assert entry["agent_name"] == name
    assert entry["prefix"] == "echo"  # the setup function's proc.userdata reached the job
    assert entry["job_context_ok"] is True and entry["http_session"] is True
    disconnected = min(
        first(found, e)
        for e in ("room_disconnected", "room_state_disconnected")
        if any(x["event"] == e for x in found)
    )
    assert first(found, "session_closed") < first(found, "session_end") < disconnected
    assert disconnected < first(found, "shutdown_callback")
    [callback] = [e for e in found if e["event"] == "shutdown_callback"]
    assert callback["reason"] == "stopped by `lkrun jobs kill`"
    assert any(e["event"] == "shutdown_callback_noarg" for e in found)
    ended = await daemon.job(job["id"])
    assert ended is not None and ended["stop_reason"] == "stopped by `lkrun jobs kill`"


async def publish_tone(room: rtc.Room, stop: asyncio.Event) -> None:
    """A 440 Hz microphone track until ``stop``."""
    source = rtc.AudioSource(48000, 1)
    track = rtc.LocalAudioTrack.create_audio_track("tone", source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    await room.local_participant.publish_track(track, options)
    samples = 480  # 10 ms
    n = 0
    while not stop.is_set():
        t = (np.arange(samples) + n) / 48000
        pcm = (np.sin(2 * math.pi * 440 * t) * 8000).astype(np.int16)
        frame = rtc.AudioFrame(pcm.tobytes(), 48000, 1, samples)
        await source.capture_frame(frame)
        n += samples


async def test_programmatic_participant_hears_the_observer(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("listener"), unique("audio")
    prewarm = "tests.lka_apps.listener:prewarm"
    daemon = await start_daemon(
        CPU_OFF + agent_table(name, LISTENER, prewarm=prewarm, idle_processes=1)
    )
    [agent_status] = (await daemon.status())["agents"]
    assert agent_status["app"].endswith("function (setup_fnc)")

    await settled(daemon, idle=1)
    reports: list[dict[str, Any]] = []
    stop = asyncio.Event()
    async with observer(livekit_server, room_name) as room:

        def on_data(packet: rtc.DataPacket) -> None:
            if packet.topic == "lka.report":
                reports.append(json.loads(packet.data))

        room.on("data_received", on_data)
        tone = asyncio.create_task(publish_tone(room, stop))
        try:
            await dispatch(livekit_server, room_name, name)
            await wait_for(lambda: reports, 30, what="the listener's audio report")
        finally:
            stop.set()
            await tone
    [report] = reports
    assert report["participant"] == room.local_participant.identity
    assert report["frames"] > 0 and report["rms"] > 0
    assert report["warm"] is True and report["job_context_ok"] is True
    job = await job_in_room(daemon, room_name)
    assert job["warm"] is True


async def test_failing_entrypoint_fails_the_job_with_its_text(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("raises"), unique("boom")
    daemon = await start_daemon(CPU_OFF + agent_table(name, "tests.lka_apps.raises:entrypoint"))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name)
    await wait_for(lambda: status_is(daemon, job["id"], "failed"), 30, what="a failure")
    listing = daemon.cli("jobs", "ls", "--all", "--json")
    [listed] = [j for j in json.loads(listing.stdout) if j["id"] == job["id"]]
    assert listed["error"] == f"RuntimeError: boom from {room_name}"

    def server_says_failed() -> bool:
        log = livekit_server.log_path.read_text(errors="replace")
        return any(
            "job ended" in line
            and job["id"] in line
            and '"status": "JS_FAILED"' in line
            and f'"error": "{listed["error"]}"' in line
            for line in log.splitlines()
        )

    await wait_for(server_says_failed, 30, what="the server's job status")


async def test_agent_server_settings_and_on_request(start_daemon: Any, livekit_server: Any) -> None:
    name = unique("gate")
    daemon = await start_daemon(CPU_OFF + agent_table(name, GATE, max_jobs=4))
    [agent_status] = (await daemon.status())["agents"]
    assert "on_request" in agent_status["app"]
    for field in ("permissions", "idle_processes", "memory_limit_mb", "shutdown_timeout"):
        assert field in agent_status["app"]
    checked = daemon.cli("check", str(daemon.manifest_path))
    assert checked.returncode == 0, checked.stderr
    assert "on_request" in checked.stdout
    assert "agent_name 'lka-gate' is not used" in checked.stderr
    await settled(daemon, idle=1)  # num_idle_processes=1 in the app

    denied, allowed = unique("deny-"), unique("room")
    await dispatch(livekit_server, denied, name)
    hellos: list[dict[str, Any]] = []
    async with observer(livekit_server, allowed) as room:
        room.on(
            "data_received",
            lambda p: hellos.append(json.loads(p.data)) if p.topic == "lka.hello" else None,
        )
        await dispatch(livekit_server, allowed, name)
        agent = await wait_for_participant(room, f"gate-{allowed}")
        await wait_for(lambda: hellos, 20, what="the agent's hello")
        assert agent.name == "Gatekeeper"
        assert agent.attributes.get("lka.gate") == "yes"
        # The app's permissions were registered: it may not publish tracks.
        assert agent.permissions.can_publish is False
    assert hellos[0]["identity"] == f"gate-{allowed}"
    await wait_for(
        lambda: "rejected by on_request" in daemon.log() and denied in daemon.log(),
        20,
        what="the rejection in the log",
    )
    assert not [j for j in await daemon.jobs() if j["room"] == denied]


async def test_drain_marks_the_agent_then_shuts_the_job_down(
    start_daemon: Any, livekit_server: Any, tmp_path: Path
) -> None:
    name, room_name = unique("lka-drain"), unique("drain")
    log = tmp_path / "events.jsonl"
    manifest = (
        CPU_OFF + 'drain_timeout = "3s"\n' + agent_table(name, VOICE, env={"LKA_EVENTS": str(log)})
    )
    daemon = await start_daemon(manifest)
    async with observer(livekit_server, room_name) as room:
        await dispatch(livekit_server, room_name, name)
        agent = await wait_for_participant(room, "agent-")
        job = await job_in_room(daemon, room_name, "running")
        daemon.signal(signal.SIGTERM)
        await wait_for(
            lambda: agent.attributes.get("lkrun.draining") == "true",
            20,
            what="the lkrun.draining attribute",
        )
        assert await daemon.wait_exit(30) == 0
    found = events(log)
    [callback] = [e for e in found if e["event"] == "shutdown_callback"]
    assert callback["reason"] == "daemon shutting down"
    assert first(found, "session_closed") < first(found, "session_end")
    assert job["id"] in daemon.log()


async def test_fork_server_preloads_the_framework_and_jobs_share_it(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, native, room_name = unique("lka-mem"), unique("echo"), unique("mem")
    daemon = await start_daemon(
        CPU_OFF + agent_table(name, VOICE, idle_processes=1) + agent_table(native, idle_processes=1)
    )
    await settled(daemon, idle=1)  # a warm process each: the fork servers have loaded
    zygotes = {a["agent"]: a["fork_server_pid"] for a in (await daemon.status())["agents"]}
    zygote = psutil.Process(zygotes[name])
    # The framework's own warm-up ran there: its local inference library is mapped...
    maps = [m.path for m in zygote.memory_maps()]
    assert any("livekit/local_inference/_native" in path for path in maps)
    # ...and started no thread: as many as the fork server of an lkrun function.
    assert zygote.num_threads() == psutil.Process(zygotes[native]).num_threads()
    async with observer(livekit_server, room_name):
        await dispatch(livekit_server, room_name, name)
        job = await job_in_room(daemon, room_name, "running")
        own = psutil.Process(job["pid"]).memory_full_info().uss
        # Most of what the job uses is the fork server's pages, shared, not its own.
        assert own < zygote.memory_info().rss / 3, (own, zygote.memory_info().rss)


APP_WITH_IDLE = """\
from livekit.agents import AgentServer, JobContext

server = AgentServer(num_idle_processes={idle})


@server.rtc_session()
async def entrypoint(ctx: JobContext) -> None:
    await ctx.connect()
"""


async def test_settings_in_the_app_follow_code_changes(
    start_daemon: Any, livekit_server: Any
) -> None:
    name = unique("lka-reload")
    daemon = await start_daemon(
        CPU_OFF + agent_table(name, "reloadable:server", dispatch="explicit"),
        files={"reloadable.py": APP_WITH_IDLE.format(idle=0)},
    )
    [agent] = (await daemon.status())["agents"]
    assert agent["idle_processes"] == 0
    (daemon.dir / "reloadable.py").write_text(APP_WITH_IDLE.format(idle=1))

    async def one_idle() -> bool:
        return (await daemon.status())["agents"][0]["idle_processes"] == 1

    await wait_for(one_idle, 60, what="the app's new num_idle_processes to apply")
    assert "changes applied in place: idle_processes" in daemon.log()
