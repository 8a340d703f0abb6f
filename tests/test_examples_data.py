"""The data examples: the relay (lkrun/examples/relay.py), end to end and its logic alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from livekit import rtc

from lkrun.examples import relay
from tests.conftest import observer, unique, wait_for, wait_for_participant
from tests.helpers import agent_table, dispatch, job_in_room

RELAY = "lkrun.examples.relay:entrypoint"
CPU_OFF = '[daemon]\nload_threshold = "off"\n\n'  # a busy shared machine must not refuse jobs


class Inbox:
    """What one observer receives from the relay, by topic."""

    def __init__(self, room: rtc.Room, relay_identity: str) -> None:
        self.room = room
        self.relay = relay_identity
        self.got: dict[str, list[dict[str, Any]]] = {}
        room.on("data_received", self._on_data)

    def _on_data(self, packet: rtc.DataPacket) -> None:
        if packet.participant is not None and packet.participant.identity == self.relay:
            self.got.setdefault(packet.topic, []).append(json.loads(packet.data))

    def on(self, topic: str) -> list[dict[str, Any]]:
        return self.got.get(topic, [])

    async def send(self, data: bytes | str, topic: str = "relay") -> None:
        await self.room.local_participant.publish_data(
            data, destination_identities=[self.relay], topic=topic
        )

    async def summary(self, timeout: float = 15) -> dict[str, Any]:
        before = len(self.on("relay.summary"))
        await self.send(b"", topic="relay.summary")
        await wait_for(lambda: len(self.on("relay.summary")) > before, timeout, what="a summary")
        return self.on("relay.summary")[-1]


@contextlib.asynccontextmanager
async def rooms(server: Any, room_name: str, n: int) -> AsyncIterator[list[rtc.Room]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(observer(server, room_name)) for _ in range(n)]


def row(summary: dict[str, Any], identity: str) -> dict[str, Any]:
    return next(r for r in summary["participants"] if r["identity"] == identity)


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
async def test_relay_routes_with_identity_limits_rate_and_sums_up(
    start_daemon: Any, livekit_server: Any, start_method: str
) -> None:
    name, room_name = unique("relay"), unique("room")
    rate, burst = 2.0, 5
    env = {"RELAY_RATE": str(rate), "RELAY_BURST": str(burst)}
    daemon = await start_daemon(
        CPU_OFF + agent_table(name, RELAY, start_method=start_method, env=env)
    )
    async with rooms(livekit_server, room_name, 3) as (a, b, c):
        await dispatch(livekit_server, room_name, name)
        agent = await wait_for_participant(a, f"{name}-", timeout=30)
        for room in (b, c):
            await wait_for_participant(room, f"{name}-", timeout=30)
        await job_in_room(daemon, room_name, "running")
        ia, ib, ic = (r.local_participant.identity for r in (a, b, c))
        A, B, C = (Inbox(r, agent.identity) for r in (a, b, c))

        # Plain text goes to everybody else, with the sender's identity.
        await A.send("hello")
        for box in (B, C):
            await wait_for(lambda box=box: box.on("relay.out"), 20, what="the relayed hello")
            assert box.on("relay.out") == [{"from": ia, "kind": "text", "payload": "hello"}]
        # Bytes that are not UTF-8 arrive as base64; a "from" in the payload is only data.
        await A.send(b"\xff\x00\x01")
        await wait_for(lambda: len(C.on("relay.out")) == 2, 20, what="the bytes")
        await B.send(json.dumps({"from": "admin", "payload": "not me"}))
        await wait_for(lambda: len(C.on("relay.out")) == 3, 20, what="B's message")
        assert relay.decode_bytes(C.on("relay.out")[1]) == b"\xff\x00\x01"
        assert C.on("relay.out")[2] == {"from": ib, "kind": "json", "payload": "not me"}

        # A named destination: only C gets it, and knows it was addressed to it.
        await A.send(json.dumps({"to": [ic], "payload": {"secret": 1}}))
        await A.send(json.dumps({"to": ["nobody-here"], "payload": 2}))
        await wait_for(lambda: len(C.on("relay.out")) == 4, 20, what="the private message")
        assert C.on("relay.out")[3] == {
            "from": ia,
            "kind": "json",
            "payload": {"secret": 1},
            "to": [ic],
        }
        await wait_for(lambda: A.on("relay.error"), 20, what="the unknown destination notice")
        assert A.on("relay.error")[0]["error"] == "not_in_room"
        assert A.on("relay.error")[0]["identities"] == ["nobody-here"]
        await A.send("after")  # ordered behind the private one on the relay's channel to B
        await wait_for(lambda: len(B.on("relay.out")) == 3, 20, what="the message after")
        assert [m["payload"] for m in B.on("relay.out")] == ["hello", "/wAB", "after"]

        # The rate limit: C (whose bucket is full) sends 10 a second for 3 s, 5 times its rate.
        sent = 30
        start = time.monotonic()
        for i in range(sent):
            await C.send(f"burst {i}")
            await asyncio.sleep(0.1)  # pacing the sender, as a chatty client would

        async def all_counted() -> dict[str, Any] | None:
            summary = await B.summary()  # A spent its burst: its request could be dropped
            return summary if row(summary, ic)["received"] == sent else None

        summary = await wait_for(all_counted, 60, interval=1.5, what="the relay to count the burst")
        elapsed = time.monotonic() - start
        mine = row(summary, ic)
        relayed, dropped = mine["relayed"], mine["dropped"]
        assert relayed + dropped == sent
        # The bucket starts with `burst` tokens and earns `rate` a second, over a span no
        # longer than from the first send to the summary that counted the last message.
        # More than the burst got through: tokens came back while C went on sending.
        assert burst < relayed <= burst + rate * elapsed + 1, (relayed, elapsed)

        def burst_at(box: Inbox) -> list[dict[str, Any]]:
            return [m for m in box.on("relay.out") if str(m["payload"]).startswith("burst")]

        await wait_for(lambda: len(burst_at(B)) == relayed, 20, what="the relayed part")
        assert all(m["from"] == ic for m in burst_at(B))
        notices = [n for n in C.on("relay.error") if n["error"] == "rate_limited"]
        assert 1 <= len(notices) <= 1 + elapsed / relay.NOTICE_WINDOW
        assert notices[0]["dropped_total"] == 1 and notices[0]["burst"] == burst

        # The summary lists everybody, present, with what they sent and were sent.
        assert summary["room"] == room_name
        assert {r["identity"] for r in summary["participants"]} == {ia, ib, ic}
        assert all(r["present"] for r in summary["participants"])
        assert row(summary, ia)["relayed"] == 4 and row(summary, ia)["invalid"] == 1
        assert row(summary, ib)["relayed"] == 1
        assert row(summary, ic)["delivered"] == 5  # hello, bytes, B's, the private one, after
        assert summary["totals"]["dropped"] == dropped
        print(f"relay: {relayed} of {sent} relayed in {elapsed:.1f}s, {len(notices)} notice(s)")
    assert "relay ready in room" in daemon.log()


async def test_relay_rejects_a_bad_setting_naming_it(
    start_daemon: Any, livekit_server: Any
) -> None:
    name, room_name = unique("relay"), unique("room")
    env = {"RELAY_RATE": "fast"}
    daemon = await start_daemon(CPU_OFF + agent_table(name, RELAY, env=env))
    await dispatch(livekit_server, room_name, name)
    job = await job_in_room(daemon, room_name, "failed")
    assert job["error"] == "ValueError: RELAY_RATE must be a number, not 'fast'"


# The logic alone, with a fake clock and a fake room (fast tier).

PACKET_BYTES = 15_000  # LiveKit's data packet holds about 15 KiB: a larger publish fails


def strict_json(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON")


class FakeRoom:
    def __init__(self, *present: str) -> None:
        self.present = list(present)
        self.sent: list[tuple[str, list[str], Any]] = []
        self.now = 100.0

    def send(self, data: bytes, to: list[str], topic: str) -> None:
        assert to, "an empty destination list would reach everybody"
        # What every receiver must be able to read: one data packet of strict JSON (a
        # browser's JSON.parse throws on NaN and Infinity, which Python's json would take).
        assert len(data) <= PACKET_BYTES, f"{len(data)} bytes: over a data packet"
        self.sent.append((topic, to, json.loads(data, parse_constant=strict_json)))

    def relay(self, **settings: Any) -> relay.Relay:
        return relay.Relay(
            relay.Settings(**settings),
            room="r",
            send=self.send,
            present=lambda: self.present,
            clock=lambda: self.now,
        )

    def on(self, topic: str) -> list[tuple[list[str], Any]]:
        return [(to, body) for t, to, body in self.sent if t == topic]


def test_token_bucket_allows_burst_plus_rate_times_t() -> None:
    room = FakeRoom("a", "b")
    r = room.relay(rate=2.0, burst=3)
    for _ in range(10):  # 10 at once: the burst
        r.on_message("a", "relay", b"x")
    room.now += 1.0  # a second: two more tokens
    for _ in range(10):
        r.on_message("a", "relay", b"x")
    assert r.senders["a"].relayed == 3 + 2 and r.senders["a"].dropped == 7 + 8
    notices = room.on("relay.error")
    assert len(notices) == 1  # both bursts fall in one notice window
    assert notices[0] == (
        ["a"],
        {
            "error": "rate_limited",
            "message": "over 2 messages/s (bursts of 3): dropped",
            "dropped": 1,
            "dropped_total": 1,
            "retry_after": 0.5,
            "rate": 2.0,
            "burst": 3,
        },
    )
    room.now += relay.NOTICE_WINDOW + 10  # the bucket is full again: no more than the burst
    for _ in range(30):
        r.on_message("a", "relay", b"x")
    assert r.senders["a"].relayed == 5 + 3
    assert len(room.on("relay.error")) == 2
    second = room.on("relay.error")[1][1]
    assert (second["dropped"], second["dropped_total"]) == (6 + 8 + 1, 7 + 8 + 1)


def test_messages_are_parsed_as_data_and_refused_with_a_reason() -> None:
    room = FakeRoom("a", "b", "c")
    r = room.relay(max_bytes=64)
    r.on_message("a", "other", b"ignored: not the relay's topic")
    r.on_message("a", "relay", b'{"to": "b", "payload": 1}')
    r.on_message("a", "relay", b'{"to": [], "payload": 1}')
    r.on_message("a", "relay", b"x" * 65)
    r.on_message("a", "relay", b'{"payload": "<script>", "to": ["b", "b", "zed"]}')
    r.on_message("a", "relay", b"[" * 5000)  # too deep for json: plain text (but too large)
    r.on_message("a", "relay", b'{"no payload": true}')
    r.on_message("a", "relay", b"\x80")
    errors = [body["error"] for _, body in room.on("relay.error")]
    assert errors == ["bad_envelope", "bad_envelope", "too_large", "not_in_room", "too_large"]
    assert room.on("relay.out") == [
        (["b"], {"from": "a", "kind": "json", "payload": "<script>", "to": ["b"]}),
        (["b", "c"], {"from": "a", "kind": "text", "payload": '{"no payload": true}'}),
        (["b", "c"], {"from": "a", "kind": "bytes", "payload": "gA=="}),
    ]
    assert r.senders["a"].received == 7 and r.senders["a"].invalid == 4
    room.present = ["a"]
    r.on_message("a", "relay", b"alone")
    assert room.on("relay.error")[-1][1]["error"] == "nobody_else"
    assert relay.parse(b"\xff") == ("bytes", "/w==", None)
    assert relay.parse(b"[" * 100_000)[0] == "text"  # json's RecursionError: plain text


def test_summary_lists_present_and_departed_participants() -> None:
    room = FakeRoom("a", "b", "quiet")
    r = room.relay()
    r.on_message("a", "relay", b"hi")
    room.present = ["b", "quiet"]  # a left
    r.on_message("b", "relay.summary", b"")
    [(to, summary)] = room.on("relay.summary")
    assert to == ["b"]
    rows = {row["identity"]: row for row in summary["participants"]}
    assert rows["a"]["present"] is False and rows["a"]["relayed"] == 1
    assert rows["quiet"] == {
        "identity": "quiet",
        "present": True,
        "received": 0,
        "relayed": 0,
        "dropped": 0,
        "invalid": 0,
        "delivered": 1,
    }
    assert summary["totals"] == {"received": 2, "relayed": 1, "dropped": 0, "invalid": 0}


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"RELAY_BURST": "0"}, "RELAY_BURST must be at least 1, not '0'"),
        ({"RELAY_RATE": "nan"}, "RELAY_RATE must be at least 0.001, not 'nan'"),
        ({"RELAY_TOPIC": " "}, "RELAY_TOPIC must not be empty"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError) as raised:
        relay.Settings.from_env(env)
    assert str(raised.value) == error


def test_defaults() -> None:
    s = relay.Settings.from_env({})
    assert (s.topic, s.rate, s.burst, s.out_topic) == ("relay", 5.0, 10, "relay.out")


def test_numbers_json_cannot_carry_are_refused_and_the_sender_told() -> None:
    """Issue 17 item 12: NaN, Infinity, 1e999 came out as NaN/Infinity, which JSON.parse
    refuses in every browser. Refused in an envelope; as plain text they are just text."""
    room = FakeRoom("a", "b")
    r = room.relay()
    for bad in (b'{"payload": NaN}', b'{"payload": [1, -Infinity]}', b'{"payload": 1e999}'):
        r.on_message("a", "relay", bad)
    r.on_message("a", "relay", b'{"payload": {"n": 1.5e300}, "x": Infinity}')  # anywhere in it
    r.on_message("a", "relay", b"NaN")
    r.on_message("a", "relay", b"[1e999]")
    r.on_message("a", "relay", b'{"payload": [1.5, -0.0, 1e308]}')
    assert [body["error"] for _, body in room.on("relay.error")] == ["bad_envelope"] * 4
    assert "NaN" in room.on("relay.error")[0][1]["message"]
    assert [body for _, body in room.on("relay.out")] == [
        {"from": "a", "kind": "text", "payload": "NaN"},
        {"from": "a", "kind": "text", "payload": "[1e999]"},
        {"from": "a", "kind": "json", "payload": [1.5, -0.0, 1e308]},
    ]
    assert r.senders["a"].invalid == 4 and r.senders["a"].relayed == 3


def test_a_message_too_large_once_relayed_is_refused_and_the_sender_told() -> None:
    """8 KiB of control characters is 48 KiB escaped: past a data packet, the publish failed
    and the sender heard nothing. Binary data (base64, 4/3) still fits."""
    room = FakeRoom("a", "b")
    r = room.relay()  # RELAY_MAX_BYTES 8192
    r.on_message("a", "relay", b"\x01" * 8192)
    r.on_message("a", "relay", b'"' * 8000)  # plain text: each quote escaped, 2 bytes
    r.on_message("a", "relay", bytes(range(128, 256)) * 64)  # not UTF-8: base64
    errors = [body for _, body in room.on("relay.error")]
    assert [e["error"] for e in errors] == ["too_large", "too_large"]
    assert errors[0]["relayed_bytes"] > 6 * 8192 and errors[0]["packet_max_bytes"] <= PACKET_BYTES
    assert [body["kind"] for _, body in room.on("relay.out")] == ["bytes"]
    assert r.senders["a"].invalid == 2 and r.senders["a"].relayed == 1


def test_notices_and_summaries_fit_in_a_packet() -> None:
    room = FakeRoom("a", "b")
    r = room.relay(max_bytes=60_000)  # a setting may allow long envelopes
    absent = [f"{n:04d}" + "z" * 200 for n in range(100)]
    r.on_message("a", "relay", json.dumps({"payload": 1, "to": ["b", *absent]}).encode())
    [(_, notice)] = room.on("relay.error")
    assert notice == {"error": "not_in_room", "message": "not in the room", "truncated": True}
    assert room.on("relay.out") == [
        (["b"], {"from": "a", "kind": "json", "payload": 1, "to": ["b"]})
    ]
    room.present = ["a", "b", *absent]  # 102 present, long identities
    r.on_message("a", "relay.summary", b"")
    [(_, summary)] = room.on("relay.summary")
    assert summary["truncated"] is True and 0 < len(summary["participants"]) < 100


async def test_relay_tells_the_sender_what_it_cannot_relay_and_relays_up_to_a_packet(
    start_daemon: Any, livekit_server: Any
) -> None:
    """Issue 17 item 12 against the real server: a message that escaping would take past a
    data packet, and an envelope with NaN, are refused with a notice (they used to fail the
    publish or reach clients as invalid JSON); one just under the packet limit arrives."""
    name, room_name = unique("relay"), unique("room")
    env = {"RELAY_MAX_BYTES": "12000"}
    daemon = await start_daemon(CPU_OFF + agent_table(name, RELAY, env=env))
    async with rooms(livekit_server, room_name, 2) as (a, b):
        await dispatch(livekit_server, room_name, name)
        agent = await wait_for_participant(a, f"{name}-", timeout=30)
        await wait_for_participant(b, f"{name}-", timeout=30)
        await job_in_room(daemon, room_name, "running")
        A, B = Inbox(a, agent.identity), Inbox(b, agent.identity)
        await A.send(b"\x01" * 8192)  # 48 KiB escaped
        await A.send(b'{"payload": NaN}')
        binary = bytes(range(128, 256)) * 87  # 11136 bytes, 14848 in base64
        await A.send(binary)
        await wait_for(lambda: B.on("relay.out"), 30, what="the large binary message")
        await wait_for(lambda: len(A.on("relay.error")) == 2, 30, what="two notices")
    [out] = B.on("relay.out")
    assert relay.decode_bytes(out) == binary
    errors = A.on("relay.error")
    assert [e["error"] for e in errors] == ["too_large", "bad_envelope"]
    assert errors[0]["relayed_bytes"] > relay.PACKET_MAX_BYTES
