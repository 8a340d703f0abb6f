"""The service examples: the webhook bridge (lkrun/examples/webhook_bridge.py), end to end
against a local HTTP endpoint, and its posting logic alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any
from unittest import mock

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from livekit import rtc

from lkrun.examples import webhook_bridge as wb
from tests.conftest import observer, unique, wait_for, wait_for_participant
from tests.helpers import agent_table, dispatch, job_in_room

BRIDGE = "lkrun.examples.webhook_bridge:entrypoint"
CPU_OFF = '[daemon]\nload_threshold = "off"\n\n'  # a busy shared machine must not refuse jobs
TOKEN = "tok-3f9a-never-logged"


class Endpoint:
    """A webhook receiver: records every request, fails the first ``fail_first`` with 500,
    and answers with ``reply(event)`` (a JSON value, or None for an empty 200)."""

    def __init__(
        self,
        fail_first: int = 0,
        reply: Callable[[dict[str, Any]], Any] | None = None,
        fail_status: int = 500,
    ) -> None:
        self.fail_first, self.fail_status = fail_first, fail_status
        self.reply = reply or (lambda event: None)
        self.requests: list[tuple[int, dict[str, str], dict[str, Any]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        event = await request.json()
        status = self.fail_status if len(self.requests) < self.fail_first else 200
        self.requests.append((status, dict(request.headers), event))
        if status != 200:
            return web.Response(status=status, text="not yet")
        answer = self.reply(event)
        return web.Response() if answer is None else web.json_response(answer)

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """What was delivered (answered 200), in order."""
        return [e for s, _, e in self.requests if s == 200 and kind in (None, e["event"])]


@contextlib.asynccontextmanager
async def serving(endpoint: Endpoint) -> AsyncIterator[Endpoint]:
    app = web.Application()
    app.router.add_post("/hook", endpoint.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)  # a free port
    await site.start()
    host, port = runner.addresses[0][:2]
    endpoint.url = f"http://{host}:{port}/hook"
    try:
        yield endpoint
    finally:
        await runner.cleanup()


async def publish_tone(
    room: rtc.Room, stop: asyncio.Event
) -> tuple[rtc.LocalAudioTrack, asyncio.Task[None]]:
    """A microphone track, fed a 440 Hz tone by the returned task until ``stop``."""
    source = rtc.AudioSource(48000, 1)
    track = rtc.LocalAudioTrack.create_audio_track("tone", source)
    options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
    await room.local_participant.publish_track(track, options)

    async def feed() -> None:
        n, samples = 0, 480  # 10 ms frames; capture_frame paces them
        while not stop.is_set():
            t = (np.arange(samples) + n) / 48000
            pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
            await source.capture_frame(rtc.AudioFrame(pcm.tobytes(), 48000, 1, samples))
            n += samples

    return track, asyncio.create_task(feed())


def pong(event: dict[str, Any]) -> Any:
    data = event.get("data") or {}
    if data.get("payload") == "ping":
        who = event["participant"]["identity"]
        return {"reply": {"topic": "webhook.reply", "payload": f"pong {event['seq']}", "to": [who]}}
    return {"ok": True}  # an answer without a reply: nothing is published


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
async def test_bridge_posts_room_events_retries_and_replies(
    start_daemon: Any, livekit_server: Any, start_method: str
) -> None:
    name, room_name = unique("webhook"), unique("room")
    async with serving(Endpoint(fail_first=3, reply=pong)) as hook:
        env = {"WEBHOOK_URL": hook.url, "WEBHOOK_TOKEN": TOKEN, "WEBHOOK_BACKOFF": "0.2"}
        daemon = await start_daemon(
            CPU_OFF + agent_table(name, BRIDGE, start_method=start_method, env=env)
        )
        async with observer(livekit_server, room_name) as a:
            replies: list[tuple[str, str, bytes]] = []
            a.on(
                "data_received",
                lambda p: replies.append(
                    (p.participant.identity if p.participant else "", p.topic, p.data)
                ),
            )
            await dispatch(livekit_server, room_name, name)
            bridge = await wait_for_participant(a, f"{name}-", timeout=30)
            job = await job_in_room(daemon, room_name, "running")
            me = a.local_participant.identity

            # The first event failed three times (500) and was posted again until it arrived.
            await wait_for(lambda: hook.events("participant_joined"), 30, what="the join")
            first = hook.requests[0][2]
            assert [s for s, _, e in hook.requests if e["id"] == first["id"]] == [500] * 3 + [200]
            assert first["event"] == "bridge_started" and first["seq"] == 1
            [joined] = hook.events("participant_joined")
            assert joined["participant"]["identity"] == me and joined["initial"] is True
            assert joined["participant"]["kind"] == "standard"
            assert (joined["room"], joined["job_id"]) == (room_name, job["id"])
            assert joined["bridge"] == bridge.identity and joined["agent"] == name
            assert joined["room_sid"].startswith("RM_")

            # A track published (audio, microphone), then data on the bridge's topic only.
            stop = asyncio.Event()
            track, feeding = await publish_tone(a, stop)
            try:
                await wait_for(lambda: hook.events("track_published"), 30, what="the track")
                [published] = hook.events("track_published")
                assert published["participant"]["identity"] == me
                assert published["initial"] is False
                assert published["track"]["sid"] == track.sid
                assert published["track"]["kind"] == "audio"
                assert published["track"]["source"] == "microphone"
                assert published["track"]["name"] == "tone"
                sent = a.local_participant
                await sent.publish_data(b"not for the endpoint", topic="other")
                await sent.publish_data(b"\xff\x00binary", topic="webhook")
                await sent.publish_data("ping", topic="webhook")
                await wait_for(lambda: len(hook.events("data_received")) == 2, 30, what="the data")
                binary, ping = (e["data"] for e in hook.events("data_received"))
                assert binary == {
                    "topic": "webhook",
                    "size": 8,
                    "encoding": "base64",
                    "payload": "/wBiaW5hcnk=",
                }
                assert ping == {
                    "topic": "webhook",
                    "size": 4,
                    "encoding": "text",
                    "payload": "ping",
                }

                # The endpoint's answer to the ping came back into the room, to the sender.
                await wait_for(lambda: replies, 30, what="the endpoint's reply in the room")
                [ping_event] = [e for e in hook.events("data_received") if e["data"] == ping]
                assert replies == [
                    (bridge.identity, "webhook.reply", f"pong {ping_event['seq']}".encode())
                ]
            finally:
                stop.set()
                await feeding
            await a.local_participant.unpublish_track(track.sid)
            await wait_for(lambda: hook.events("track_unpublished"), 30, what="the unpublish")
            assert hook.events("track_unpublished")[0]["track"]["sid"] == track.sid

            async with observer(livekit_server, room_name) as b:
                late = b.local_participant.identity
                await wait_for(
                    lambda: any(
                        e["participant"]["identity"] == late
                        for e in hook.events("participant_joined")
                    ),
                    30,
                    what="the second observer's join",
                )
            await wait_for(lambda: hook.events("participant_left"), 30, what="the leave")
            [left] = hook.events("participant_left")
            assert left["participant"]["identity"] == late

        # Shutdown: the stop event is posted before the job ends.
        killed = daemon.cli("jobs", "kill", job["id"])
        assert killed.returncode == 0, killed.stderr
        await wait_for(lambda: hook.events("bridge_stopped"), 30, what="the stop event")

    delivered = hook.events()
    assert [e["seq"] for e in delivered] == list(range(1, len(delivered) + 1))  # in order
    assert len({e["id"] for e in delivered}) == len(delivered)
    assert all(e["dropped"] == 0 for e in delivered)
    assert all(e["data"]["topic"] == "webhook" for e in hook.events("data_received"))
    for event in delivered:
        datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
    for _, headers, _ in hook.requests:
        assert headers["Authorization"] == f"Bearer {TOKEN}"
        assert headers["Content-Type"] == "application/json"
    log = daemon.log()
    assert TOKEN not in log
    assert "HTTP 500, attempt 3" in log or "(HTTP 500)" in log
    print(f"webhook: {len(hook.requests)} requests, {len(delivered)} events delivered")


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({}, "ValueError: WEBHOOK_URL is not set: the bridge needs the endpoint to post to"),
        (
            {"WEBHOOK_URL": "ftp://user:pw@files.example/x?k=1"},
            "ValueError: WEBHOOK_URL must be an http:// or https:// URL, "
            "not 'ftp://files.example/x'",
        ),
    ],
)
async def test_bridge_without_a_usable_url_fails_the_job_saying_why(
    start_daemon: Any, livekit_server: Any, env: dict[str, str], error: str
) -> None:
    name, room_name = unique("webhook"), unique("room")
    daemon = await start_daemon(CPU_OFF + agent_table(name, BRIDGE, env=env))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "failed")
    assert job["error"] == error


# The posting logic alone, against a local endpoint (fast tier).


def poster(url: str, sent: list[Any] | None = None, **settings: Any) -> wb.Poster:
    def send(payload: bytes, to: list[str] | None, topic: str) -> None:
        assert sent is not None
        sent.append((payload, to, topic))

    return wb.Poster(wb.Settings(url=url, **settings), send=send, logger=logging.getLogger("t"))


def event(seq: int) -> dict[str, Any]:
    return {"id": f"e{seq}", "seq": seq, "event": "data_received"}


async def test_a_full_queue_drops_the_oldest_and_counts() -> None:
    async with serving(Endpoint()) as hook:
        p = poster(hook.url, queue_size=3)
        for seq in range(1, 8):  # nothing posts yet: the queue keeps the newest three
            p.put(event(seq))
        assert p.queue.dropped == 4
        running = asyncio.create_task(p.run())
        try:
            assert await p.flush(10)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    assert [(e["seq"], e["dropped"]) for e in hook.events()] == [(5, 2), (6, 3), (7, 4)]
    assert p.delivered == 3


async def test_retries_back_off_up_to_the_cap_then_give_up() -> None:
    async with serving(Endpoint(fail_first=100)) as hook:
        p = poster(hook.url, attempts=4, backoff=0.05, backoff_max=0.1)
        p.put(event(1))
        p.put(event(2))
        running = asyncio.create_task(p.run())
        start = time.monotonic()
        try:
            assert await p.flush(10)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
        elapsed = time.monotonic() - start
    # Each event: 4 posts, 3 pauses of (0.05, 0.1, 0.1) x jitter in [0.75, 1].
    assert [e["id"] for _, _, e in hook.requests] == ["e1"] * 4 + ["e2"] * 4
    assert p.failed == 2 and p.delivered == 0
    assert 2 * 0.25 * 0.75 <= elapsed < 5
    assert [p.delay(n) <= 0.1 for n in range(1, 30)] == [True] * 29
    assert p.delay(1, retry_after=60) <= 0.1  # the cap holds against Retry-After too


async def test_a_refusal_is_not_retried_and_a_dead_endpoint_is() -> None:
    async with serving(Endpoint(fail_first=100, fail_status=400)) as hook:
        p = poster(hook.url, backoff=0.01)
        p.put(event(1))
        running = asyncio.create_task(p.run())
        assert await p.flush(10)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    refused = hook.requests
    assert len(refused) == 1 and p.failed == 1
    # The port is closed now: connection errors are retried, then given up.
    p = poster(hook.url, attempts=3, backoff=0.01, timeout=2)
    p.put(event(1))
    running = asyncio.create_task(p.run())
    assert await p.flush(10)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert p.failed == 1


async def test_replies_are_published_and_bad_ones_ignored() -> None:
    answers = iter(
        [
            {"reply": [{"payload": "hi"}, {"topic": "t", "payload": {"n": 1}, "to": ["x"]}]},
            {"reply": {"payload": "x", "to": []}},  # everybody or nobody? refused
            {"reply": {"topic": "b", "payload_base64": "/w=="}},
            "<html>not json</html>",
        ]
    )
    sent: list[Any] = []
    async with serving(Endpoint(reply=lambda e: next(answers))) as hook:
        p = poster(hook.url, sent, reply_topic="r")
        for seq in range(1, 5):
            p.put(event(seq))
        running = asyncio.create_task(p.run())
        try:
            assert await p.flush(10)
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
    assert sent == [(b"hi", None, "r"), (b'{"n":1}', ["x"], "t"), (b"\xff", None, "b")]
    assert p.delivered == 4
    assert p.ignored == {"bad_reply": 1}


class SegmentedEndpoint:
    """Answers each post with the next of ``answers`` (bytes), chunked, in ``segments``
    writes spaced apart: a reader that takes one read for the body gets the first only."""

    def __init__(self, answers: list[bytes], segments: int = 4) -> None:
        self.answers = iter(answers)
        self.segments = segments
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        body = next(self.answers)
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        step = max(1, -(-len(body) // self.segments))
        for start in range(0, len(body), step):
            if start:
                # Not a wait for a condition: spaces the segments so that the client sees
                # them apart (the bridge reads them whole either way).
                await asyncio.sleep(0.05)
            await resp.write(body[start : start + step])
        await resp.write_eof()
        return resp


async def post_all(p: wb.Poster, count: int) -> None:
    for seq in range(1, count + 1):
        p.put(event(seq))
    running = asyncio.create_task(p.run())
    try:
        assert await p.flush(20)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_a_reply_in_several_segments_is_read_whole() -> None:
    """Issue 17 item 6: the first read of a chunked answer is its first chunk only."""
    payload = "x" * 12000
    answer = json.dumps({"reply": {"topic": "t", "payload": payload, "to": ["alice"]}})
    sent: list[Any] = []
    async with serving(SegmentedEndpoint([answer.encode()])) as hook:  # type: ignore[arg-type]
        p = poster(hook.url, sent)
        await post_all(p, 1)
    assert sent == [(payload.encode(), ["alice"], "t")]
    assert p.delivered == 1 and p.ignored == {}


async def test_an_answer_too_large_or_not_json_is_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    big = json.dumps({"reply": {"payload": "y"}, "pad": "z" * wb.RESPONSE_MAX_BYTES}).encode()
    answers = [big, b"<html>ok</html>", b'{"reply": {"payload": "fine"}}', b""]
    sent: list[Any] = []
    caplog.set_level(logging.WARNING, logger="t")
    async with serving(SegmentedEndpoint(answers)) as hook:  # type: ignore[arg-type]
        p = poster(hook.url, sent, reply_topic="r")
        await post_all(p, 4)
    assert sent == [(b"fine", None, "r")]
    assert p.delivered == 4 and p.failed == 0
    assert p.ignored == {"too_large": 1, "not_json": 1}
    logged = [
        (r.webhook_answer, r.event_id, r.seq)  # type: ignore[attr-defined]
        for r in caplog.records
        if hasattr(r, "webhook_answer")
    ]
    assert logged == [("too_large", "e1", 1), ("not_json", "e2", 2)]
    assert [r.levelno for r in caplog.records if hasattr(r, "webhook_answer")] == [30, 30]


async def test_read_body_reads_to_the_end_and_refuses_past_the_limit() -> None:
    """The same without a server: parts fed one at a time, each read alone."""

    async def body(parts: list[bytes], limit: int) -> bytes | None:
        protocol = mock.Mock(_reading_paused=False, connected=True)
        stream = aiohttp.StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
        reading = asyncio.create_task(wb.read_body(stream, limit))
        for part in parts:
            stream.feed_data(part)
            await asyncio.sleep(0)  # let the reader take this part alone
        stream.feed_eof()
        return await reading

    assert await body([b"ab", b"cd", b"ef"], 6) == b"abcdef"
    assert await body([b"ab", b"cd", b"efg"], 6) is None
    assert await body([], 6) == b""


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"WEBHOOK_URL": "http://"}, "WEBHOOK_URL must be an http:// or https:// URL"),
        ({"WEBHOOK_URL": "http://h", "WEBHOOK_QUEUE": "0"}, "WEBHOOK_QUEUE must be at least 1"),
        ({"WEBHOOK_URL": "http://h", "WEBHOOK_BACKOFF": "x"}, "WEBHOOK_BACKOFF must be a number"),
        ({"WEBHOOK_URL": "http://h", "WEBHOOK_TOPICS": " , "}, "WEBHOOK_TOPICS must name"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        wb.Settings.from_env(env)


def test_settings_and_redaction() -> None:
    s = wb.Settings.from_env(
        {"WEBHOOK_URL": "https://u:p@h:8443/x?sig=1", "WEBHOOK_TOKEN": TOKEN, "WEBHOOK_TOPICS": "*"}
    )
    assert s.topics is None and TOKEN not in repr(s)
    assert wb.redact(s.url) == "https://h:8443/x"
    assert wb.Settings.from_env({"WEBHOOK_URL": "http://h"}).topics == frozenset({"webhook"})
