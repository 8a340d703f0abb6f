"""Relay: routes data messages between the participants of a room, with the sender's identity.

A participant publishes on the relay topic (``RELAY_TOPIC``, default ``relay``) and the relay
forwards the message on ``<topic>.out`` to everybody else in the room, or to the identities
the message names, wrapped in JSON that says who sent it. Each sender has a token bucket
(``RELAY_RATE`` messages a second, bursts of ``RELAY_BURST``): what goes over it is dropped,
and the sender hears about it on ``<topic>.error`` (once per ``NOTICE_WINDOW``). A message on
``<topic>.summary`` gets the requester the room's counts.

What comes in::

    anything                              plain: relayed as text (UTF-8) or base64 bytes
    {"payload": <JSON>, "to": ["bob"]}    an envelope: payload relayed as JSON, to bob only;
                                          "to" left out or null: to everybody else

What goes out on ``<topic>.out`` (one JSON object)::

    {"from": "alice", "kind": "text"|"bytes"|"json", "payload": ..., "to": [...] (if named)}

What goes out is always valid JSON (RFC 8259) that fits in one data packet: an envelope
whose payload holds a number JSON cannot carry (``NaN``, ``Infinity``, ``1e999``, which
browsers' ``JSON.parse`` refuses) is refused, and so is a message that, wrapped and escaped,
would be over ``PACKET_MAX_BYTES``; the sender is told on ``<topic>.error`` either way.

``from`` is the identity LiveKit authenticated for the sender, never a field of the message,
so it cannot be forged. The payload is the sender's data, passed on as data: this agent never
interprets it, and a receiver should not either (no eval, no markup).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from livekit import rtc

from lkrun.context import JobContext

NOTICE_WINDOW = 5.0  # seconds: at most one rate-limit notice per sender in this time
SUMMARY_MAX_PARTICIPANTS = 100  # a summary lists at most these (fewer if they do not fit)
# What the relay publishes in one message at most: a LiveKit data packet holds about 15 KiB,
# and a larger publish fails. Escaping can make a relayed message ~6x its input
# (a control character becomes \u0001), base64 4/3.
PACKET_MAX_BYTES = 15_000


@dataclass(frozen=True)
class Settings:
    topic: str = "relay"
    rate: float = 5.0  # messages a second, per sender
    burst: int = 10  # messages a sender may send at once
    max_bytes: int = 8192  # larger messages are refused (LiveKit packets are ~15 KiB at most)

    @property
    def out_topic(self) -> str:
        return f"{self.topic}.out"

    @property
    def error_topic(self) -> str:
        return f"{self.topic}.error"

    @property
    def summary_topic(self) -> str:
        return f"{self.topic}.summary"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        topic = env.get("RELAY_TOPIC", cls.topic).strip()
        if not topic:
            raise ValueError("RELAY_TOPIC must not be empty")
        return cls(
            topic=topic,
            rate=_number(env, "RELAY_RATE", cls.rate, float, minimum=0.001),
            burst=_number(env, "RELAY_BURST", cls.burst, int, minimum=1),
            max_bytes=_number(env, "RELAY_MAX_BYTES", cls.max_bytes, int, minimum=1),
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
        raise ValueError(f"{name} must be at least {minimum}, not {raw!r}")
    return value


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; a message takes one. Starts full."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until the next token, as of the last take()."""
        return max(0.0, (1 - self.tokens) / self.rate)


@dataclass
class Sender:
    """What the relay knows about one participant."""

    bucket: TokenBucket
    received: int = 0  # messages it sent to the relay (summary requests included)
    relayed: int = 0
    dropped: int = 0  # over the rate limit
    invalid: int = 0  # refused: too large, bad envelope, nobody to send to
    delivered: int = 0  # relayed messages it was sent
    last_notice: float = field(default=-math.inf)
    dropped_since_notice: int = 0


# What the relay does to the room: send(data, destination identities, topic). Destinations
# are never empty: an empty list would mean everybody.
Send = Callable[[bytes, list[str], str], None]


class Relay:
    """The routing, counting and rate limiting, apart from the room so it can be tested alone."""

    def __init__(
        self,
        settings: Settings,
        *,
        room: str,
        send: Send,
        present: Callable[[], Collection[str]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.room = room
        self._send = send
        self._present = present  # identities of the remote participants now in the room
        self._clock = clock
        self._started = clock()
        self.senders: dict[str, Sender] = {}

    def sender(self, identity: str) -> Sender:
        found = self.senders.get(identity)
        if found is None:
            bucket = TokenBucket(self.settings.rate, self.settings.burst, self._clock())
            found = self.senders[identity] = Sender(bucket)
        return found

    def on_message(self, identity: str, topic: str, data: bytes) -> None:
        s = self.settings
        if topic not in (s.topic, s.summary_topic):
            return
        sender = self.sender(identity)
        sender.received += 1
        now = self._clock()
        # Everything costs a token, summary requests and invalid messages too: the limit
        # bounds the work (and the replies) one participant can cause.
        if not sender.bucket.take(now):
            self._drop(identity, sender, now)
            return
        if topic == s.summary_topic:
            self._send(self.summary(), [identity], s.summary_topic)
        else:
            self._relay(identity, sender, data)

    def _drop(self, identity: str, sender: Sender, now: float) -> None:
        sender.dropped += 1
        sender.dropped_since_notice += 1
        if now - sender.last_notice < NOTICE_WINDOW:
            return
        sender.last_notice = now
        self._error(
            identity,
            "rate_limited",
            f"over {self.settings.rate:g} messages/s (bursts of {self.settings.burst}): dropped",
            dropped=sender.dropped_since_notice,  # since the previous notice, this one included
            dropped_total=sender.dropped,
            retry_after=round(sender.bucket.retry_after(), 3),
            rate=self.settings.rate,
            burst=self.settings.burst,
        )
        sender.dropped_since_notice = 0

    def _relay(self, identity: str, sender: Sender, data: bytes) -> None:
        if len(data) > self.settings.max_bytes:
            sender.invalid += 1
            self._error(
                identity,
                "too_large",
                f"{len(data)} bytes, over {self.settings.max_bytes}",
                max_bytes=self.settings.max_bytes,
            )
            return
        try:
            kind, payload, named = parse(data)
        except ValueError as exc:
            sender.invalid += 1
            self._error(identity, "bad_envelope", str(exc))
            return
        present = set(self._present())
        if named is None:
            recipients = sorted(present - {identity})
        else:
            recipients = [who for who in dict.fromkeys(named) if who in present]
            missing = [who for who in named if who not in present]
            if missing:  # said, even when the others get it
                self._error(identity, "not_in_room", "not in the room", identities=missing)
        if not recipients:
            sender.invalid += 1
            if named is None:
                self._error(identity, "nobody_else", "nobody else is in the room")
            return
        out: dict[str, Any] = {"from": identity, "kind": kind, "payload": payload}
        if named is not None:
            out["to"] = recipients
        try:
            encoded = _dumps(out)
        except (ValueError, RecursionError):  # parse() took it, so nesting at the very limit
            sender.invalid += 1
            self._error(identity, "bad_envelope", "the payload is nested too deeply to relay")
            return
        if len(encoded) > PACKET_MAX_BYTES:
            sender.invalid += 1
            self._error(
                identity,
                "too_large",
                f"{len(encoded)} bytes once relayed, over the data packet's {PACKET_MAX_BYTES}",
                max_bytes=self.settings.max_bytes,
                relayed_bytes=len(encoded),
                packet_max_bytes=PACKET_MAX_BYTES,
            )
            return
        self._send(encoded, recipients, self.settings.out_topic)
        sender.relayed += 1
        for who in recipients:
            self.sender(who).delivered += 1

    def _error(self, identity: str, code: str, message: str, **details: Any) -> None:
        encoded = _dumps({"error": code, "message": message, **details})
        if len(encoded) > PACKET_MAX_BYTES:  # e.g. a long list of absent identities
            encoded = _dumps({"error": code, "message": message, "truncated": True})
        self._send(encoded, [identity], self.settings.error_topic)

    def summary(self) -> bytes:
        present = set(self._present())
        for who in present:
            self.sender(who)  # present but silent participants are listed too
        rows = [
            {
                "identity": who,
                "present": who in present,
                "received": s.received,
                "relayed": s.relayed,
                "dropped": s.dropped,
                "invalid": s.invalid,
                "delivered": s.delivered,
            }
            for who, s in self.senders.items()
        ]
        rows.sort(key=lambda r: (not r["present"], -r["received"], r["identity"]))
        totals = {
            key: sum(r[key] for r in rows) for key in ("received", "relayed", "dropped", "invalid")
        }
        head = {
            "room": self.room,
            "uptime": round(self._clock() - self._started, 3),
            "rate": self.settings.rate,
            "burst": self.settings.burst,
        }
        shown = min(len(rows), SUMMARY_MAX_PARTICIPANTS)
        while True:  # long identities: fewer rows, so that the summary fits in one packet
            encoded = _dumps(
                {
                    **head,
                    "participants": rows[:shown],
                    "truncated": shown < len(rows),
                    "totals": totals,
                }
            )
            if len(encoded) <= PACKET_MAX_BYTES or shown == 0:
                return encoded
            shown //= 2


def parse(data: bytes) -> tuple[str, Any, list[str] | None]:
    """(kind, payload, named destinations or None) of a message sent to the relay.

    A JSON object with a ``payload`` key is an envelope; anything else is a plain message.
    Raises ValueError for an envelope whose ``to`` is not a list of identities, or that holds
    a number JSON cannot carry (``NaN``, ``Infinity``, one past a double's range).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes", base64.b64encode(data).decode("ascii"), None
    non_finite: list[str] = []  # Python's json takes them; what it would emit, browsers refuse

    def constant(name: str) -> float:
        non_finite.append(name)
        return math.nan

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            non_finite.append(literal)
        return value

    try:
        value = json.loads(text, parse_constant=constant, parse_float=number)
    except (ValueError, RecursionError):  # deep nesting raises RecursionError
        return "text", text, None
    if not isinstance(value, dict) or "payload" not in value:
        return "text", text, None  # relayed as the text it is: a string is always valid JSON
    if non_finite:
        raise ValueError(
            f"{non_finite[0][:32]!r} is not a JSON number (NaN, Infinity or out of range): "
            f"send it as a string"
        )
    to = value.get("to")
    if to is None:
        return "json", value["payload"], None
    if not isinstance(to, list) or not to or not all(isinstance(t, str) and t for t in to):
        raise ValueError('"to" must be a non-empty list of participant identities')
    return "json", value["payload"], to


def decode_bytes(message: Mapping[str, Any]) -> bytes:
    """A relayed message's payload as bytes, for a receiver written in Python."""
    if message["kind"] == "bytes":
        try:
            return base64.b64decode(message["payload"], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"bad base64 payload: {exc}") from None
    if message["kind"] == "text":
        return str(message["payload"]).encode("utf-8")
    return _dumps(message["payload"])


def _dumps(value: Any) -> bytes:
    # allow_nan=False: never NaN/Infinity on the wire (parse() keeps them out; this makes sure).
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


async def entrypoint(ctx: JobContext) -> None:
    settings = Settings.from_env(os.environ)  # a bad setting fails the job, naming it

    def send(data: bytes, to: list[str], topic: str) -> None:
        if not to:  # LiveKit reads an empty list as "everybody": never what the relay means
            return
        ctx.create_task(
            ctx.room.local_participant.publish_data(data, destination_identities=to, topic=topic),
            name=f"publish on {topic}",
        )

    relay = Relay(
        settings,
        room=ctx.job.room,
        send=send,
        present=lambda: list(ctx.room.remote_participants),
    )

    def on_data(packet: rtc.DataPacket) -> None:
        if packet.participant is None:  # from a server SDK: no identity to relay or answer
            return
        relay.on_message(packet.participant.identity, packet.topic or "", packet.data)

    def log_summary(reason: str) -> None:
        totals = json.loads(relay.summary())["totals"]
        ctx.logger.info("relay done (%s): %s", reason, totals)

    ctx.room.on("data_received", on_data)
    ctx.add_shutdown_callback(log_summary)
    await ctx.connect()
    ctx.logger.info(
        "relay ready in room %s: topic %r, %g msg/s, bursts of %d",
        ctx.job.room,
        settings.topic,
        settings.rate,
        settings.burst,
    )
