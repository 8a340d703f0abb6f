"""The framework's shared inference process, in pieces and without processes.

The wire between a job and the inference process, the job's executor against an in-process
unix server (concurrent requests, errors, the process dying with requests in flight), the
inference process's own server with fake runners, the import graph that tells which agent
registers which runner, and the daemon's bookkeeping of leases, readiness and statistics.
The processes themselves run in tests/test_inference.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from livekit.agents.inference_runner import _InferenceRunner

from lkrun import paths
from lkrun.child.framework import inference, inference_proc
from lkrun.child.framework.inference import (
    InferenceUnavailable,
    NoInference,
    SocketInference,
    WireError,
)
from lkrun.child.framework.inference_proc import InferenceServer, load_runner
from lkrun.child.importgraph import ImportGraph
from lkrun.interpreter import ChildSideError
from lkrun.supervision import inference as supervision
from lkrun.supervision.inference import InferenceProcess, InferenceProcesses, Lease
from tests.conftest import wait_for

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def unix_server(path: Path, handler: Handler) -> AsyncIterator[asyncio.Server]:
    server = await asyncio.start_unix_server(handler, path=str(path))
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


def short_socket(tmp_path: Path) -> Path:
    # pytest's tmp_path can be longer than a unix socket path may be (108 bytes).
    return tmp_path / "s" if len(str(tmp_path)) < 90 else Path(f"/tmp/lkrun-test-{id(tmp_path)}.s")


# -- the wire -------------------------------------------------------------------------------


def test_requests_and_answers_round_trip_with_binary_data() -> None:
    data = bytes(range(256))
    request = inference.decode(inference.encode_request(7, "m", data))
    assert request == {"id": 7, "method": "m", "data": data}
    assert inference.decode(inference.encode_answer(7, b"\x00ok")) == {"id": 7, "data": b"\x00ok"}
    assert inference.decode(inference.encode_answer(8, None)) == {"id": 8, "data": None}
    assert inference.decode(inference.encode_error(9, "boom")) == {"id": 9, "error": "boom"}
    assert inference.encode_request(1, "m", b"x").endswith(b"\n")


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"method": "m"}\n',
        b'{"id": "1"}\n',
        b'{"id": 1, "data": "%%%"}\n',
        b'{"id": 1, "data": 5}\n',
        b'{"id": 1, "method": 3}\n',
        b'{"id": 1, "error": {}}\n',
    ],
)
def test_malformed_lines_are_wire_errors(line: bytes) -> None:
    with pytest.raises(WireError):
        inference.decode(line)


# -- the job's executor ----------------------------------------------------------------------


async def test_concurrent_requests_on_one_connection_are_matched_by_id(tmp_path: Path) -> None:
    path = short_socket(tmp_path)
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = inference.decode(await reader.readline())
        second = inference.decode(await reader.readline())
        # Answered in the other order: the executor must not rely on it.
        for message in (second, first):
            writer.write(inference.encode_answer(message["id"], message["data"] + b"!"))
        await writer.drain()
        await reader.read()

    async with unix_server(path, handler):
        executor = SocketInference(str(path))
        answers = await asyncio.gather(
            executor.do_inference("m", b"one"), executor.do_inference("m", b"two")
        )
        await executor.aclose()
    assert answers == [b"one!", b"two!"]
    assert connections == 1


async def test_an_error_answer_raises_with_the_method_and_the_error(tmp_path: Path) -> None:
    path = short_socket(tmp_path)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        message = inference.decode(await reader.readline())
        writer.write(inference.encode_error(message["id"], "model not loaded"))
        await writer.drain()
        await reader.read()

    async with unix_server(path, handler):
        executor = SocketInference(str(path))
        with pytest.raises(RuntimeError, match="inference of eou failed: model not loaded"):
            await executor.do_inference("eou", b"{}")
        await executor.aclose()


async def test_requests_in_flight_fail_at_once_when_the_process_dies(tmp_path: Path) -> None:
    """Fake: a server that takes the requests and closes the connection, as a killed
    inference process does. The requests fail at once instead of waiting forever; the next
    call connects again and is answered."""
    path = short_socket(tmp_path)
    answered = False

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not answered:
            await reader.readline()
            await reader.readline()
            writer.close()  # dies with both requests unanswered
            return
        message = inference.decode(await reader.readline())
        writer.write(inference.encode_answer(message["id"], b"again"))
        await writer.drain()
        await reader.read()

    async with unix_server(path, handler):
        executor = SocketInference(str(path))
        began = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(
                executor.do_inference("m", b"1"),
                executor.do_inference("m", b"2"),
                return_exceptions=True,
            ),
            5,
        )
        assert time.monotonic() - began < 2
        for result in results:
            assert isinstance(result, InferenceUnavailable), result
            assert "closed the connection" in str(result)
        answered = True
        assert await executor.do_inference("m", b"3") == b"again"
        await executor.aclose()


async def test_no_process_listening_fails_at_once(tmp_path: Path) -> None:
    executor = SocketInference(str(short_socket(tmp_path)))
    with pytest.raises(InferenceUnavailable, match="cannot reach the inference process"):
        await asyncio.wait_for(executor.do_inference("m", b""), 5)


async def test_a_closed_executor_refuses_and_no_inference_says_why() -> None:
    executor = SocketInference("/nonexistent")
    await executor.aclose()
    with pytest.raises(InferenceUnavailable, match="the job is over"):
        await executor.do_inference("m", b"")
    with pytest.raises(InferenceUnavailable, match="registers an _InferenceRunner"):
        await NoInference().do_inference("m", b"")


def test_the_job_gets_a_socket_executor_only_with_a_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(inference.SOCKET_ENV, raising=False)
    assert isinstance(inference.executor_for_job(), NoInference)
    monkeypatch.setenv(inference.SOCKET_ENV, "/run/x.sock")
    executor = inference.executor_for_job()
    assert isinstance(executor, SocketInference) and executor.path == "/run/x.sock"
    assert supervision.SOCKET_ENV == inference.SOCKET_ENV  # the daemon sets what jobs read


# -- the inference process's server, with fake runners -------------------------------------


class SlowEcho(_InferenceRunner):
    INFERENCE_METHOD = "test_slow_echo"

    def initialize(self) -> None:
        pass

    def run(self, data: bytes) -> bytes | None:
        request = json.loads(data)
        time.sleep(request.get("sleep", 0))
        return data if request.get("echo", True) else None


async def test_the_server_runs_requests_of_one_connection_concurrently(tmp_path: Path) -> None:
    server = InferenceServer({"echo": SlowEcho()}, {"broken": "cannot load: no model file"})
    path = short_socket(tmp_path)
    async with unix_server(path, server.serve_connection):
        executor = SocketInference(str(path))
        began = time.monotonic()
        slow = asyncio.ensure_future(executor.do_inference("echo", b'{"sleep": 0.5}'))
        fast = await executor.do_inference("echo", b'{"sleep": 0}')
        assert fast == b'{"sleep": 0}' and not slow.done()  # not queued behind the slow one
        assert await slow == b'{"sleep": 0.5}'
        assert time.monotonic() - began < 2
        assert await executor.do_inference("echo", b'{"echo": false}') is None
        with pytest.raises(RuntimeError, match="runner broken is unavailable: cannot load"):
            await executor.do_inference("broken", b"{}")
        with pytest.raises(RuntimeError, match=r"unknown inference method 'nope'.*runs: echo"):
            await executor.do_inference("nope", b"{}")
        with pytest.raises(RuntimeError, match="JSONDecodeError"):
            await executor.do_inference("echo", b"not json")
        await executor.aclose()
        await wait_for(lambda: not server._peers, what="the server to see the job go")
    outcomes = [(method, ok) for method, _, ok in server.done]
    assert sorted(outcomes) == sorted(
        [
            ("echo", True),
            ("echo", True),
            ("echo", True),
            ("broken", False),
            ("nope", False),
            ("echo", False),
        ]
    )
    server.pool.shutdown()


class Gate(_InferenceRunner):
    """Holds each request until the test opens the gate."""

    INFERENCE_METHOD = "test_gate"

    def __init__(self) -> None:
        self.gate = threading.Event()

    def initialize(self) -> None:
        pass

    def run(self, data: bytes) -> bytes | None:
        self.gate.wait(30)
        return data


def counting(server: InferenceServer) -> dict[str, int]:
    """Counts the gate's requests the server is answering now, and the most it ever did."""
    answer = server.answer
    seen = {"now": 0, "peak": 0}

    async def counted(message: dict[str, Any]) -> bytes:
        if message.get("method") != "gate":
            return await answer(message)
        seen["now"] += 1
        seen["peak"] = max(seen["peak"], seen["now"])
        try:
            return await answer(message)
        finally:
            seen["now"] -= 1

    server.answer = counted  # type: ignore[method-assign]
    return seen


async def test_one_connection_has_a_bounded_number_of_requests_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that sends more requests than the cap: the server reads no further until one
    is answered, so it never runs more than the cap of them at once; all are answered."""
    monkeypatch.setattr(inference_proc, "MAX_IN_FLIGHT", 2, raising=False)
    gate = Gate()
    server = InferenceServer({"gate": gate}, {})
    server.pool = ThreadPoolExecutor(max_workers=8)  # threads are not what limits it
    seen = counting(server)
    path = short_socket(tmp_path)
    async with unix_server(path, server.serve_connection):
        flood = SocketInference(str(path))
        requests = [
            asyncio.ensure_future(flood.do_inference("gate", str(n).encode())) for n in range(5)
        ]
        await wait_for(lambda: seen["now"] >= 2, what="two requests to be answered")
        # Another job is served meanwhile: the server has read all it was going to read.
        other = SocketInference(str(path))
        with pytest.raises(RuntimeError, match="unknown inference method"):
            await other.do_inference("nope", b"")
        assert seen["peak"] == 2 and not any(r.done() for r in requests)
        gate.gate.set()
        answers = await asyncio.wait_for(asyncio.gather(*requests), 10)
        assert answers == [str(n).encode() for n in range(5)]
        assert seen["peak"] == 2
        await flood.aclose()
        await other.aclose()
        await wait_for(lambda: not server._peers, what="the server to see the jobs go")
    server.pool.shutdown()


async def test_a_dropped_connection_leaves_no_request_task_behind(tmp_path: Path) -> None:
    """The job goes with requests in flight: their handlers are cancelled and awaited
    before the connection's task ends."""
    gate = Gate()
    server = InferenceServer({"gate": gate}, {})
    left: list[asyncio.Task[Any]] = []
    ended = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.serve_connection(reader, writer)
        left.extend(
            t
            for t in asyncio.all_tasks()
            if not t.done() and "serve_connection" in t.get_coro().__qualname__
        )
        ended.set()

    path = short_socket(tmp_path)
    async with unix_server(path, handler):
        executor = SocketInference(str(path))
        requests = [asyncio.ensure_future(executor.do_inference("gate", b"x")) for _ in range(2)]
        await wait_for(lambda: len(server.pool._threads) > 0, what="a request to run")
        await executor.aclose()
        await asyncio.wait_for(ended.wait(), 10)
        gate.gate.set()
        results = await asyncio.gather(*requests, return_exceptions=True)
    assert left == []
    assert all(isinstance(r, InferenceUnavailable) for r in results), results
    server.pool.shutdown()


async def test_a_moved_connection_answers_what_it_has_while_new_requests_go_anew(
    tmp_path: Path,
) -> None:
    """Fake: the first connection gets a request, says ``moved``, and answers it only after
    a second request has been answered on a new connection. The executor closes the first
    connection after that answer, and leaves no reader behind."""
    path = short_socket(tmp_path)
    connections: list[str] = []
    second_answered = asyncio.Event()
    first_closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        name = f"c{len(connections) + 1}"
        connections.append(name)
        if name == "c1":
            message = inference.decode(await reader.readline())
            writer.write(inference.encode_moved())
            await writer.drain()
            await second_answered.wait()
            writer.write(inference.encode_answer(message["id"], b"old"))
            await writer.drain()
            assert await reader.read() == b""  # the job closed it: nothing else came
            first_closed.set()
            return
        while line := await reader.readline():
            message = inference.decode(line)
            writer.write(inference.encode_answer(message["id"], b"new"))
            await writer.drain()
            second_answered.set()

    async with unix_server(path, handler):
        executor = SocketInference(str(path))
        old = asyncio.ensure_future(executor.do_inference("m", b"1"))
        await wait_for(lambda: any(c.moved for c in executor._connections), what="the moved notice")
        assert executor._current is None
        assert await asyncio.wait_for(executor.do_inference("m", b"2"), 5) == b"new"
        assert await asyncio.wait_for(old, 5) == b"old"
        await asyncio.wait_for(first_closed.wait(), 5)
        assert await executor.do_inference("m", b"3") == b"new"
        await executor.aclose()
        readers = [
            t
            for t in asyncio.all_tasks()
            if not t.done() and t.get_coro().__qualname__ == "SocketInference._read"
        ]
    assert connections == ["c1", "c2"] and readers == []


async def test_a_draining_server_moves_its_jobs_and_ends_when_they_have_gone(
    tmp_path: Path,
) -> None:
    """drain(): every connection hears ``moved``; a request in flight is still answered;
    drain returns once the jobs have closed their connections."""
    gate = Gate()
    server = InferenceServer({"gate": gate, "echo": SlowEcho()}, {})
    path = short_socket(tmp_path)
    async with unix_server(path, server.serve_connection):
        busy, idle = SocketInference(str(path)), SocketInference(str(path))
        in_flight = asyncio.ensure_future(busy.do_inference("gate", b"late"))
        assert await idle.do_inference("echo", b"{}") == b"{}"
        await wait_for(lambda: len(server.pool._threads) > 0, what="the request to run")
        drained = asyncio.ensure_future(server.drain())
        # The idle job's connection closes at once; the busy one's waits for its answer.
        await wait_for(lambda: not idle._connections, what="the idle job to hear moved")
        await wait_for(lambda: busy._current is None, what="the busy job to hear moved")
        assert len(busy._connections) == 1 and len(server._peers) == 1
        assert not drained.done()
        gate.gate.set()
        assert await asyncio.wait_for(in_flight, 5) == b"late"
        await asyncio.wait_for(drained, 5)
        await busy.aclose()
        await idle.aclose()
        await wait_for(lambda: not server._peers, what="the server to see the jobs go")
    server.pool.shutdown()


def test_a_runner_class_is_checked_against_its_method() -> None:
    source = f"{__name__}:SlowEcho"
    assert isinstance(load_runner("test_slow_echo", source), SlowEcho)
    with pytest.raises(TypeError, match="INFERENCE_METHOD is 'test_slow_echo', not 'other'"):
        load_runner("other", source)
    with pytest.raises(TypeError, match="not an _InferenceRunner class"):
        load_runner("x", f"{__name__}:short_socket")


# -- which agent registers which runner -----------------------------------------------------


def test_each_agent_is_credited_with_the_runners_its_imports_register(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two agents import one plugin: the second import registers nothing, yet both get its
    runner; an agent that does not import it gets none."""
    monkeypatch.setattr(_InferenceRunner, "registered_runners", {})
    package = tmp_path / "h6graph"
    (package / "plugins").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plugins" / "__init__.py").write_text("from . import eou\n")
    (package / "plugins" / "eou.py").write_text(
        "from livekit.agents.inference_runner import _InferenceRunner\n"
        "class Runner(_InferenceRunner):\n"
        "    INFERENCE_METHOD = 'h6_eou'\n"
        "    def initialize(self): pass\n"
        "    def run(self, data): return data\n"
        "_InferenceRunner.register_runner(Runner)\n"
    )
    (package / "agent_a.py").write_text("from h6graph.plugins.eou import Runner\n")
    (package / "agent_b.py").write_text("from h6graph import plugins\n")
    (package / "agent_c.py").write_text("import json\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = ImportGraph()
    graph.install()
    try:
        for name in ("agent_a", "agent_b", "agent_c"):
            __import__(f"h6graph.{name}")
    finally:
        graph.uninstall()
        for name in [m for m in sys.modules if m.startswith("h6graph")]:
            del sys.modules[name]
    runner = [{"method": "h6_eou", "class": "h6graph.plugins.eou:Runner"}]
    assert inference.registered_runners(graph.reach("h6graph.agent_a")) == runner
    assert inference.registered_runners(graph.reach("h6graph.agent_b")) == runner
    assert inference.registered_runners(graph.reach("h6graph.agent_c")) == []
    assert inference.registered_runners(None) == runner


# -- the daemon's bookkeeping ----------------------------------------------------------------


def process(
    tmp_path: Path,
    make_env: Callable[[Any], dict[str, str]] = lambda leases: {},
    **options: Any,
) -> InferenceProcess:
    return InferenceProcess(
        interpreter="/venv/bin/python",
        socket_path=tmp_path / "s",
        cwd=tmp_path,
        make_env=make_env,
        **options,
    )


def take_over(
    proc: InferenceProcess, failed: dict[str, str] | None = None, files: list[str] | None = None
) -> Any:
    """As run() does when a process it started has loaded what the leases want now (none is
    started here): it serves, the one before it (if any) retires."""
    failed = failed or {}
    instance = supervision._Instance(
        pid=4000, path=proc.socket_path, runners=dict(proc.runners), generation=proc._generation
    )
    served = [m for m in proc.runners if m not in failed]
    ready = {"type": "ready", "runners": served, "failed": failed, "files": files or []}
    proc._on_message(instance, ready)
    proc._promote(instance)
    return instance


async def test_an_agent_waits_until_the_process_is_up_with_its_runners(tmp_path: Path) -> None:
    proc = process(tmp_path)
    changes: list[str] = []
    first = Lease("a", {"m1": "plug:R1"}, lambda: changes.append("a"))
    proc.add(first)
    assert first.waiting and proc.runners == {"m1": "plug:R1"}
    take_over(proc)
    assert not first.waiting and proc.ready and changes == ["a"]

    # A second agent with the same runner shares the process as it runs.
    same = Lease("b", {"m1": "plug:R1"}, lambda: changes.append("b"))
    proc._restart.clear()
    proc.add(same)
    assert not same.waiting and not proc._restart.is_set() and not proc._stale()

    # One with a runner the process lacks makes it start again with both; it waits.
    more = Lease("c", {"m2": "plug:R2"}, lambda: changes.append("c"))
    proc.add(more)
    assert more.waiting and proc._restart.is_set() and proc._stale()
    assert proc.runners == {"m1": "plug:R1", "m2": "plug:R2"}
    assert [a for a in proc.command() if a.startswith("--runner")] == [
        "--runner=m1=plug:R1",
        "--runner=m2=plug:R2",
    ]
    # A runner that failed to load does not keep its agent waiting: its jobs get the error.
    take_over(proc, failed={"m2": "no model"})
    assert not more.waiting and not proc._stale()
    assert proc.status()["failed_runners"] == {"m2": "no model"}
    assert proc.status()["agents"] == ["a", "b", "c"]
    await proc._stop_all()


def test_a_renamed_runner_class_is_what_the_next_process_loads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent's code now registers method m with another class: its new lease comes
    before the old one goes (AgentProcesses._sync_inference). The next process loads the
    new class, and nobody is told another agent registered m first."""
    caplog.set_level(logging.WARNING, logger="lkrun.inference")
    proc = process(tmp_path)
    old = Lease("a", {"m": "mod:Old"}, lambda: None)
    proc.add(old)
    proc._restart.clear()  # as when the process with mod:Old started
    new = Lease("a", {"m": "mod:New"}, lambda: None)
    proc.add(new)
    proc.remove(old)
    assert proc.runners == {"m": "mod:New"} and proc._restart.is_set()
    assert "--runner=m=mod:New" in proc.command()
    assert [r for r in caplog.records if r.name == "lkrun.inference"] == []


def test_a_runner_no_agent_registers_any_more_is_not_loaded_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An agent goes: its runners leave the set, and the process is to start again
    without them. Between agents the first to attach owns a method name, also when its
    lease is replaced (its env changed) while the other one's is held."""
    caplog.set_level(logging.WARNING, logger="lkrun.inference")
    proc = process(tmp_path)
    a = Lease("a", {"m1": "p:R1"}, lambda: None)
    b = Lease("b", {"m1": "q:Other", "m2": "p:R2"}, lambda: None)
    proc.add(a)
    proc.add(b)
    assert proc.runners == {"m1": "p:R1", "m2": "p:R2"}
    conflicts = [r for r in caplog.records if r.name == "lkrun.inference"]
    assert len(conflicts) == 1 and conflicts[0].levelno == logging.WARNING  # b's m1
    replaced = Lease("a", {"m1": "p:R1"}, lambda: None, env={"HF_HOME": "/m"})
    proc.add(replaced)
    proc.remove(a)
    assert proc.runners == {"m1": "p:R1", "m2": "p:R2"}
    proc._restart.clear()  # as when that process started
    proc.remove(b)
    assert proc.runners == {"m1": "p:R1"} and proc._restart.is_set()
    assert [a for a in proc.command() if a.startswith("--runner")] == ["--runner=m1=p:R1"]
    assert len([r for r in caplog.records if r.name == "lkrun.inference"]) == 1


def test_a_failed_start_releases_the_waiting_agents(tmp_path: Path) -> None:
    proc = process(tmp_path)
    lease = Lease("a", {"m1": "plug:R1"}, lambda: None)
    proc.add(lease)
    proc._settle_leases(failed=True)
    assert not lease.waiting


def test_statistics_give_counts_and_latency(tmp_path: Path) -> None:
    proc = process(tmp_path)
    proc.add(Lease("a", {"m1": "plug:R1"}, lambda: None))
    done = [["m1", 0.001 * n, n != 7] for n in range(1, 11)] + [["bogus", "x", True]]
    instance = supervision._Instance(pid=1, path=tmp_path / "s", runners={}, generation=0)
    proc._on_message(instance, {"type": "stats", "done": done})
    status = proc.status()
    assert (status["requests"], status["errors"]) == (10, 1)
    latency = status["latency_ms"]
    assert latency["samples"] == 10
    assert latency["p50"] == 6.0 and latency["max"] == 10.0 and latency["mean"] == 5.5
    assert process(tmp_path).status()["latency_ms"] is None


async def test_one_process_per_interpreter_until_its_last_agent_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fake: the supervising task waits instead of starting a process."""
    runs: list[str] = []
    stopped: list[str] = []

    async def fake_run(self: InferenceProcess) -> None:
        runs.append(self.interpreter)
        try:
            await asyncio.Event().wait()
        finally:
            stopped.append(self.interpreter)

    monkeypatch.setattr(InferenceProcess, "run", fake_run)
    registry = InferenceProcesses(workdir=tmp_path, base_env={"LIVEKIT_API_SECRET": "s", "A": "1"})
    a = registry.attach("a", "/env1/bin/python", {"m": "p:R"})
    b = registry.attach("b", "/env1/bin/python", {"m": "p:R"})
    c = registry.attach("c", "/env2/bin/python", {"m": "p:R"})
    await asyncio.sleep(0)
    assert a.process is b.process and a.process is not c.process
    assert runs == ["/env1/bin/python", "/env2/bin/python"]
    assert a.socket_path == str(registry.socket_path("/env1/bin/python"))
    assert a.socket_path != c.socket_path and len(a.socket_path) < 100
    assert a.process is not None and a.process.leases == [a, b]

    a.release()
    await asyncio.sleep(0)
    assert stopped == [] and len(registry.status()) == 2
    b.release()
    b.release()  # twice is harmless
    for _ in range(3):
        await asyncio.sleep(0)
    assert stopped == ["/env1/bin/python"]
    assert [s["interpreter"] for s in registry.status()] == ["/env2/bin/python"]

    # Started again for a new agent, at the same socket path.
    d = registry.attach("d", "/env1/bin/python", {"m": "p:R"})
    assert d.socket_path == a.socket_path
    socket_dir = Path(d.socket_path).parent
    await asyncio.sleep(0)
    await registry.close()
    assert sorted(stopped) == ["/env1/bin/python", "/env1/bin/python", "/env2/bin/python"]
    assert not socket_dir.exists()


def test_the_process_gets_what_its_agents_jobs_share_of_their_environment(
    tmp_path: Path,
) -> None:
    daemon_env = {
        "LIVEKIT_API_KEY": "k",
        "LIVEKIT_API_SECRET": "s",
        "LKRUN_DASHBOARD_TOKEN": "t" * 20,
        "PYTHONPATH": "/daemon",
        "HOME": "/root",
        "HF_HOME": "/daemon/hf",
        "OMP_NUM_THREADS": "8",
    }
    registry = InferenceProcesses(
        workdir=tmp_path,
        base_env=daemon_env,
        env_for=lambda python, env, own: env.update(OWN=python, OWN_PATH=own.get("PYTHONPATH", "")),
    )
    python = sys.executable
    plain = Lease("a", {}, lambda: None)
    # No agent sets anything: the daemon's environment, without the API credentials, and
    # the manifest's directory first on the path (as a job gets it).
    env = registry.env(python, [plain])
    assert "LIVEKIT_API_SECRET" not in env and "LIVEKIT_API_KEY" not in env
    assert "LKRUN_DASHBOARD_TOKEN" not in env
    assert env["HOME"] == "/root" and env["HF_HOME"] == "/daemon/hf"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/daemon"]
    # The agents' env tables, over the daemon's: the first agent's value of each variable;
    # the API credentials stay out even when an agent passes them to its jobs. PYTHONPATH:
    # every entry one of their jobs has, the plain agent's (the daemon's) included.
    one = Lease(
        "b",
        {},
        lambda: None,
        env={
            "PYTHONPATH": "/src/b",
            "HF_HOME": "/models/b",
            "OMP_NUM_THREADS": "2",
            "LIVEKIT_API_SECRET": "passed on purpose",
            "LKRUN_DASHBOARD_TOKEN": "passed on purpose too",
        },
    )
    two = Lease("c", {}, lambda: None, env={"PYTHONPATH": "/src/c:/src/b", "HF_HOME": "/m/c"})
    env = registry.env(python, [plain, one, two])
    assert env["HF_HOME"] == "/models/b" and env["OMP_NUM_THREADS"] == "2"
    assert "LIVEKIT_API_SECRET" not in env and "LKRUN_DASHBOARD_TOKEN" not in env
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path), "/daemon", "/src/b", "/src/c"]
    # Another interpreter: adapted for it, with its agents' path (the daemon's is not
    # theirs there: a plain agent's jobs have the manifest's directory).
    env = registry.env("/other/bin/python", [plain, one])
    assert env["OWN"] == "/other/bin/python" and env["HF_HOME"] == "/models/b"
    assert env["OWN_PATH"].split(os.pathsep) == [str(tmp_path), "/src/b"]


async def test_a_changed_runner_source_starts_the_process_again(tmp_path: Path) -> None:
    runner_file = tmp_path / "my_runner.py"
    runner_file.write_text("# a runner beside the agents\n")
    other = tmp_path / "agent.py"
    other.write_text("# the agent\n")
    proc = process(tmp_path)
    proc.add(Lease("a", {"m1": "my_runner:R"}, lambda: None))
    take_over(proc, files=[str(runner_file)])
    proc._restart.clear()
    os.utime(other, (1, 1))  # the agent's own code: not the process's business
    assert not proc.code_changed() and not proc._restart.is_set() and not proc._stale()
    os.utime(runner_file, (2, 2))
    assert proc.code_changed() and proc._restart.is_set() and proc._stale()
    assert not proc.code_changed()  # a second agent saying so: the same restart
    take_over(proc)
    assert not proc._stale()
    await proc._stop_all()


# -- the supervision's failures ------------------------------------------------------------


@contextlib.asynccontextmanager
async def running(proc: InferenceProcess) -> AsyncIterator[asyncio.Task[None]]:
    run = asyncio.create_task(proc.run())
    try:
        yield run
    finally:
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)


def leftover_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of the daemon's inference supervision still running."""
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and t.get_coro().cr_code.co_filename == supervision.__file__
    ]


async def test_an_environment_that_cannot_be_made_is_a_failed_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """make_env raises (the child side cannot be put in the agent's environment): the start
    failed, as if the process had exited; the agent stops waiting, and it is tried again."""
    monkeypatch.setattr(supervision, "BACKOFF_BASE", 60.0)  # no second try during the test

    def broken(leases: Any) -> dict[str, str]:
        raise ChildSideError("cannot put lkrun's child side in /venv: read-only file system")

    proc = process(tmp_path, make_env=broken)
    lease = Lease("a", {"m": "p:R"}, lambda: None)
    proc.add(lease)
    async with running(proc) as run:
        await wait_for(lambda: not lease.waiting, 5, what="the failed start to free the agent")
        status = proc.status()
        assert status["last_error"].startswith("cannot start it")
        assert "read-only file system" in status["last_error"]
        assert status["restarts"] == 1 and not status["ready"] and not run.done()
    assert leftover_tasks() == []


async def test_the_socket_directory_is_the_daemons_and_a_killed_ones_is_cleaned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    state = tmp_path / "state"
    directory = supervision.socket_dir_for(state)
    assert directory.parent == paths.runtime_dir()  # not the state dir: socket paths are short
    assert directory == supervision.socket_dir_for(state)
    assert directory != supervision.socket_dir_for(tmp_path / "other-state")
    directory.mkdir(parents=True)
    (directory / "0123456789ab.sock").write_text("")  # what a killed daemon left
    registry = InferenceProcesses(workdir=tmp_path, socket_dir=directory)
    registry.clean_stale()
    assert not directory.exists()
    path = registry.socket_path("/venv/bin/python")
    assert path.parent == directory and stat.S_IMODE(directory.stat().st_mode) == 0o700
    await registry.close()
    assert not directory.exists()
    # A runtime directory others may write to is no place for them: a temporary one is.
    directory.parent.chmod(0o777)
    registry = InferenceProcesses(workdir=tmp_path, socket_dir=directory)
    path = registry.socket_path("/venv/bin/python")
    assert path.parent != directory and path.parent.name.startswith("lkrun-inference-")
    await registry.close()
    assert not path.parent.exists()


def test_status_prints_one_line_per_inference_process() -> None:
    from lkrun.cli.status import _inference_line

    line = _inference_line(
        {
            "interpreter": "/venv/bin/python",
            "pid": 42,
            "ready": True,
            "agents": ["a", "b"],
            "runners": ["lk_end_of_utterance_en"],
            "failed_runners": {},
            "restarts": 1,
            "last_error": "process 41 exited with code -9",
            "rss_mb": 119.5,
            "pss_mb": 90.3,
            "requests": 6,
            "errors": 0,
            "latency_ms": {"p50": 0.7, "p95": 0.8, "max": 0.8, "mean": 0.6, "samples": 6},
        }
    )
    assert line == (
        "inference process for /venv/bin/python (a, b): pid 42, runners "
        "lk_end_of_utterance_en; RSS 119.5 MB, PSS 90.3 MB; 6 request(s), 0 error(s), "
        "p50 0.7 ms, p95 0.8 ms; 1 restart(s) (last: process 41 exited with code -9)"
    )
