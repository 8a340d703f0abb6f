"""Webhook bridge: posts what happens in the room to an HTTP endpoint, and sends its replies back.

Each event (a participant joined or left, a track published or unpublished, a data message on
one of ``WEBHOOK_TOPICS``) becomes one JSON object POSTed to ``WEBHOOK_URL``. Event handlers
only put the event in a bounded queue (the oldest is dropped, and counted, when it is full);
one task posts them in order, retrying a failed post with capped exponential backoff, so a
slow or dead endpoint never holds up the room. An endpoint that answers
``{"reply": {"topic": ..., "payload": ..., "to": [...]}}`` has that published in the room.
The answer is read whole, in however many chunks it comes, up to ``RESPONSE_MAX_BYTES``; one
over that, not JSON, or with a malformed reply publishes nothing and is logged (a warning
with the field ``webhook_answer``: ``too_large``, ``not_json`` or ``bad_reply``).

The schema, one object per POST (``Content-Type: application/json``)::

    {"id": "9f1c...",             unique per event, the same on every retry of it
     "seq": 7,                    1, 2, ... per job, in the order events happened
     "event": "participant_joined" | "participant_left" | "track_published"
              | "track_unpublished" | "data_received" | "bridge_started" | "bridge_stopped",
     "timestamp": "2025-01-31T12:00:00.123Z",      when the bridge saw it (UTC)
     "room": "demo", "room_sid": "RM_...", "job_id": "AJ_...", "agent": "webhook",
     "bridge": "webhook-AJ_...",  the bridge's own identity
     "dropped": 0,                events dropped so far because the queue was full
     "participant": {"identity", "sid", "name", "kind"},        participant_*, track_*, data_*
     "initial": true,             participant_joined/track_published: there before the bridge
     "track": {"sid", "name", "kind": "audio"|"video", "source": "microphone"|"camera"|...,
               "mime_type", "muted", "simulcasted", "width", "height"},            track_*
     "data": {"topic", "size", "encoding": "text"|"base64", "payload"},      data_received
     "reason": "..."}             bridge_stopped

A data payload that is valid UTF-8 is sent as text, anything else as base64; either way it is
what a participant sent: the endpoint must treat it as untrusted data.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from livekit import rtc

from lkrun.context import JobContext

REPLY_MAX_BYTES = 15_000  # a LiveKit data packet holds ~15 KiB
RESPONSE_MAX_BYTES = 64 * 1024  # a longer answer is not read for replies


@dataclass(frozen=True)
class Settings:
    url: str
    token: str = field(default="", repr=False)  # never printed, never logged
    topics: frozenset[str] | None = frozenset({"webhook"})  # None: every topic
    reply_topic: str = "webhook.reply"  # for a reply that names none
    queue_size: int = 1000
    attempts: int = 6  # posts of one event before it is given up
    backoff: float = 0.5  # seconds before the first retry, doubled each time...
    backoff_max: float = 30.0  # ...up to this
    timeout: float = 10.0  # one post, answer included
    flush: float = 3.0  # at shutdown, how long queued events may still be posted

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        url = env.get("WEBHOOK_URL", "").strip()
        if not url:
            raise ValueError("WEBHOOK_URL is not set: the bridge needs the endpoint to post to")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"WEBHOOK_URL must be an http:// or https:// URL, not {redact(url)!r}")
        raw_topics = env.get("WEBHOOK_TOPICS", "webhook")
        topics = frozenset(t.strip() for t in raw_topics.split(",") if t.strip())
        if not topics:
            raise ValueError("WEBHOOK_TOPICS must name at least one topic (or be *)")
        backoff = _number(env, "WEBHOOK_BACKOFF", cls.backoff, float, 0.001)
        return cls(
            url=url,
            token=env.get("WEBHOOK_TOKEN", "").strip(),
            topics=None if "*" in topics else topics,
            reply_topic=env.get("WEBHOOK_REPLY_TOPIC", "").strip() or cls.reply_topic,
            queue_size=_number(env, "WEBHOOK_QUEUE", cls.queue_size, int, 1),
            attempts=_number(env, "WEBHOOK_ATTEMPTS", cls.attempts, int, 1),
            backoff=backoff,
            backoff_max=_number(env, "WEBHOOK_BACKOFF_MAX", cls.backoff_max, float, backoff),
            timeout=_number(env, "WEBHOOK_TIMEOUT", cls.timeout, float, 0.1),
            flush=_number(env, "WEBHOOK_FLUSH", cls.flush, float, 0),
        )


def _number(env: Mapping[str, str], name: str, default: Any, kind: type, minimum: float) -> Any:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be at least {minimum:g}, not {raw!r}")
    return value


def redact(url: str) -> str:
    """The URL without what may be a secret in it (user:password@, the query)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if host else "<not a URL>"


class EventQueue:
    """A bounded FIFO that never blocks the producer: when full, the oldest event goes."""

    def __init__(self, size: int) -> None:
        self._items: deque[dict[str, Any]] = deque()
        self._size = size
        self._ready = asyncio.Event()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: dict[str, Any]) -> None:
        if len(self._items) >= self._size:
            self._items.popleft()
            self.dropped += 1
        self._items.append(item)
        self._ready.set()

    async def get(self) -> dict[str, Any]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()


class NotJSON(ValueError):
    """An endpoint's answer that is not JSON (so it carries no reply)."""


async def read_body(content: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole body, however many chunks it comes in; None if it is over ``limit`` bytes
    (what came of it is not kept)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        # read(n) returns what has arrived (one chunk or segment), not n bytes: loop to EOF.
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return None


@dataclass(frozen=True)
class Reply:
    topic: str
    payload: bytes
    to: list[str] | None  # None: everybody in the room


def parse_replies(body: bytes, default_topic: str) -> list[Reply]:
    """The replies in an endpoint's answer: none unless it is a JSON object with "reply".

    ``reply`` is one object or a list of them: ``topic`` (a string; default
    ``default_topic``), ``payload`` (a string is sent as UTF-8, any other JSON value as its
    JSON text) or ``payload_base64`` (bytes), ``to`` (identities; left out: everybody).
    Raises NotJSON for a body that is not JSON, ValueError, saying why, for a reply that is
    not that.
    """
    if not body.strip():
        return []
    try:
        answer = json.loads(body)
    except (ValueError, RecursionError):  # deep nesting raises RecursionError
        raise NotJSON("the answer is not JSON") from None
    if not isinstance(answer, dict) or answer.get("reply") is None:
        return []
    items = answer["reply"] if isinstance(answer["reply"], list) else [answer["reply"]]
    return [_reply(item, default_topic) for item in items]


def _reply(item: Any, default_topic: str) -> Reply:
    if not isinstance(item, dict):
        raise ValueError("a reply must be a JSON object")
    topic = item.get("topic", default_topic)
    if not isinstance(topic, str) or not topic:
        raise ValueError('a reply\'s "topic" must be a non-empty string')
    if "payload_base64" in item:
        try:
            payload = base64.b64decode(str(item["payload_base64"]), validate=True)
        except ValueError:
            raise ValueError('a reply\'s "payload_base64" is not base64') from None
    elif isinstance(item.get("payload"), str):
        payload = item["payload"].encode("utf-8")
    elif "payload" in item:
        payload = json.dumps(item["payload"], separators=(",", ":")).encode("utf-8")
    else:
        raise ValueError('a reply needs a "payload" or "payload_base64"')
    if len(payload) > REPLY_MAX_BYTES:
        raise ValueError(f"a reply's payload is {len(payload)} bytes, over {REPLY_MAX_BYTES}")
    to = item.get("to")
    # An empty list would mean everybody to LiveKit: refused rather than guessed.
    if to is not None and (
        not isinstance(to, list) or not to or not all(isinstance(t, str) and t for t in to)
    ):
        raise ValueError('a reply\'s "to" must be a non-empty list of identities')
    return Reply(topic, payload, to)


# How replies reach the room: send(payload, identities or None for everybody, topic).
Send = Callable[[bytes, list[str] | None, str], None]


class Poster:
    """Posts queued events to the endpoint, one at a time, in order, with retries."""

    def __init__(self, settings: Settings, *, send: Send, logger: Any) -> None:
        self.settings = settings
        self.queue = EventQueue(settings.queue_size)
        self.delivered = 0
        self.failed = 0  # given up after the last attempt, or refused by the endpoint
        # Answers whose replies were not published, by why: too_large, not_json, bad_reply.
        self.ignored: dict[str, int] = {}
        self._send = send
        self._logger = logger
        self._idle = asyncio.Event()
        self._idle.set()
        self._where = redact(settings.url)  # what the log may say about the endpoint
        self._headers = {"Content-Type": "application/json", "User-Agent": "lkrun-webhook"}
        if settings.token:
            self._headers["Authorization"] = f"Bearer {settings.token}"

    def put(self, event: dict[str, Any]) -> None:
        self.queue.put(event)
        event["dropped"] = self.queue.dropped  # this put's own drop included
        self._idle.clear()

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1, 2, ...): doubling, capped, with
        jitter so that many bridges do not come back at the same instant."""
        base = min(self.settings.backoff_max, self.settings.backoff * 2 ** (attempt - 1))
        if retry_after is not None:  # the endpoint said when; still no longer than the cap
            base = min(self.settings.backoff_max, max(base, retry_after))
        return base * random.uniform(0.75, 1.0)

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        # The session lives as long as this task: closed when the job cancels it at the end.
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers) as session:
            while True:
                if not len(self.queue):
                    self._idle.set()
                await self._deliver(session, await self.queue.get())

    async def flush(self, timeout: float) -> bool:
        """Wait until every queued event was posted (or given up), for ``timeout`` at most."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _deliver(self, session: aiohttp.ClientSession, event: dict[str, Any]) -> None:
        body = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        what = f"{event['event']} #{event['seq']}"
        for attempt in range(1, self.settings.attempts + 1):
            retry_after: float | None = None
            try:
                # No redirects: the Authorization header must not follow one elsewhere.
                async with session.post(
                    self.settings.url, data=body, allow_redirects=False
                ) as resp:
                    if 200 <= resp.status < 300:
                        answer = await read_body(resp.content, RESPONSE_MAX_BYTES)
                        self.delivered += 1
                        self._reply(answer, event)
                        return
                    problem = f"HTTP {resp.status}"
                    retryable = resp.status in (408, 425, 429) or resp.status >= 500
                    retry_after = _seconds(resp.headers.get("Retry-After"))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                problem, retryable = type(exc).__name__, True
            if not retryable or attempt == self.settings.attempts:
                self.failed += 1
                self._logger.warning(
                    "webhook %s: gave up on %s after %d attempt(s): %s",
                    self._where,
                    what,
                    attempt,
                    problem,
                )
                return
            pause = self.delay(attempt, retry_after)
            self._logger.info(
                "webhook %s: %s failed (%s), attempt %d, retrying in %.2fs",
                self._where,
                what,
                problem,
                attempt,
                pause,
            )
            await asyncio.sleep(pause)

    def _reply(self, answer: bytes | None, event: dict[str, Any]) -> None:
        if answer is None:
            self._ignore(event, "too_large", f"over {RESPONSE_MAX_BYTES} bytes")
            return
        try:
            replies = parse_replies(answer, self.settings.reply_topic)
        except NotJSON as exc:
            self._ignore(event, "not_json", str(exc), size=len(answer))
            return
        except ValueError as exc:
            self._ignore(event, "bad_reply", str(exc))
            return
        for reply in replies:
            self._send(reply.payload, reply.to, reply.topic)

    def _ignore(self, event: dict[str, Any], why: str, detail: str, **fields: Any) -> None:
        self.ignored[why] = self.ignored.get(why, 0) + 1
        self._logger.warning(
            "webhook %s: answer to %s #%s ignored (%s): %s",
            self._where,
            event["event"],
            event["seq"],
            why,
            detail,
            # For a JSON log handler; the message says the same for people.
            extra={"webhook_answer": why, "event_id": event["id"], "seq": event["seq"], **fields},
        )


def _seconds(header: str | None) -> float | None:
    try:
        value = float(header) if header else None
    except ValueError:  # an HTTP date: the capped backoff will do
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def participant_info(p: rtc.Participant) -> dict[str, Any]:
    return {
        "identity": p.identity,
        "sid": p.sid,
        "name": p.name,
        "kind": _enum_name(rtc.ParticipantKind, p.kind, "PARTICIPANT_KIND_"),
    }


def track_info(pub: rtc.TrackPublication) -> dict[str, Any]:
    info = {
        "sid": pub.sid,
        "name": pub.name,
        "kind": _enum_name(rtc.TrackKind, pub.kind, "KIND_"),
        "source": _enum_name(rtc.TrackSource, pub.source, "SOURCE_"),
        "mime_type": pub.mime_type,
        "muted": pub.muted,
        "simulcasted": pub.simulcasted,
    }
    if pub.kind == rtc.TrackKind.KIND_VIDEO:
        info.update(width=pub.width, height=pub.height)
    return info


def data_info(packet: rtc.DataPacket) -> dict[str, Any]:
    try:
        encoding, payload = "text", packet.data.decode("utf-8")
    except UnicodeDecodeError:
        encoding, payload = "base64", base64.b64encode(packet.data).decode("ascii")
    size = len(packet.data)
    return {"topic": packet.topic, "size": size, "encoding": encoding, "payload": payload}


def timestamp(now: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RoomEvents:
    """The room's event handlers: each builds the event and queues it, nothing that waits."""

    def __init__(self, ctx: JobContext, settings: Settings, poster: Poster) -> None:
        self.ctx, self.settings, self.poster = ctx, settings, poster
        self.seq = 0
        self.participants: set[str] = set()  # sids already reported: one event each, even
        self.tracks: set[str] = set()  # for what arrived while the bridge was connecting

    def attach(self, room: rtc.Room) -> None:
        room.on("participant_connected", self.joined)
        room.on("participant_disconnected", self.left)
        room.on("track_published", self.published)
        room.on("track_unpublished", self.unpublished)
        room.on("data_received", self.data)

    def emit(self, kind: str, **fields: Any) -> None:
        self.seq += 1
        job = self.ctx.job
        self.poster.put(
            {
                "id": uuid.uuid4().hex,
                "seq": self.seq,
                "event": kind,
                "timestamp": timestamp(),
                "room": job.room,
                "room_sid": job.room_sid,
                "job_id": job.id,
                "agent": job.agent_name,
                "bridge": self.ctx.identity,
                **fields,
            }
        )

    def started(self, room: rtc.Room) -> None:
        self.emit("bridge_started")
        for p in room.remote_participants.values():
            self.joined(p, initial=True)
            for pub in p.track_publications.values():
                self.published(pub, p, initial=True)

    def joined(self, p: rtc.RemoteParticipant, initial: bool = False) -> None:
        if p.sid not in self.participants:
            self.participants.add(p.sid)
            self.emit("participant_joined", participant=participant_info(p), initial=initial)

    def left(self, p: rtc.RemoteParticipant) -> None:
        self.participants.discard(p.sid)
        self.emit("participant_left", participant=participant_info(p))

    def published(
        self, pub: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant, initial: bool = False
    ) -> None:
        if pub.sid not in self.tracks:
            self.tracks.add(pub.sid)
            info = {"participant": participant_info(p), "track": track_info(pub)}
            self.emit("track_published", **info, initial=initial)

    def unpublished(self, pub: rtc.RemoteTrackPublication, p: rtc.RemoteParticipant) -> None:
        self.tracks.discard(pub.sid)
        self.emit("track_unpublished", participant=participant_info(p), track=track_info(pub))

    def data(self, packet: rtc.DataPacket) -> None:
        if self.settings.topics is not None and packet.topic not in self.settings.topics:
            return
        who = participant_info(packet.participant) if packet.participant else None
        self.emit("data_received", participant=who, data=data_info(packet))


async def entrypoint(ctx: JobContext) -> None:
    settings = Settings.from_env(os.environ)  # no URL, or not http(s): the job fails saying so

    def send(payload: bytes, to: list[str] | None, topic: str) -> None:
        ctx.create_task(
            ctx.room.local_participant.publish_data(
                payload, destination_identities=to or [], topic=topic
            ),
            name=f"reply on {topic}",
        )

    poster = Poster(settings, send=send, logger=ctx.logger)
    events = RoomEvents(ctx, settings, poster)

    async def stop(reason: str) -> None:
        events.emit("bridge_stopped", reason=reason)
        if not await poster.flush(settings.flush):
            ctx.logger.warning("webhook: %d event(s) not posted at shutdown", len(poster.queue))
        ctx.logger.info(
            "webhook bridge done: %d posted, %d failed, %d dropped (queue full)",
            poster.delivered,
            poster.failed,
            poster.queue.dropped,
        )

    events.attach(ctx.room)
    ctx.add_shutdown_callback(stop)
    ctx.create_task(poster.run(), name="webhook poster")
    await ctx.connect(auto_subscribe=False)  # it reports tracks, it needs none of their media
    events.started(ctx.room)
    ctx.logger.info(
        "webhook bridge in room %s posting to %s (topics: %s)",
        ctx.job.room,
        redact(settings.url),
        "*" if settings.topics is None else ",".join(sorted(settings.topics)),
    )
