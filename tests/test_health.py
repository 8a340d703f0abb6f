"""The health HTTP endpoint, on a real socket."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from lkrun.api.health import HealthError, HealthServer


class Readiness:
    def __init__(self) -> None:
        self.ready = True
        self.reason = ""

    def __call__(self) -> tuple[bool, str]:
        return self.ready, self.reason


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
async def server(readiness: Readiness) -> AsyncIterator[HealthServer]:
    health = HealthServer("127.0.0.1", 0, ready=readiness)
    await health.start()
    yield health
    await health.stop()


def url(health: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{health.port}{path}"


async def test_port_zero_binds_a_real_port(server: HealthServer) -> None:
    assert server.port > 0


async def test_healthz(server: HealthServer, client: aiohttp.ClientSession) -> None:
    async with client.get(url(server, "/healthz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_readyz_follows_the_callback(
    server: HealthServer, client: aiohttp.ClientSession, readiness: Readiness
) -> None:
    async with client.get(url(server, "/readyz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"ready": True}

    readiness.ready, readiness.reason = False, "draining"
    async with client.get(url(server, "/readyz")) as resp:
        assert resp.status == 503
        assert await resp.json() == {"ready": False, "reason": "draining"}

    readiness.ready, readiness.reason = True, ""
    async with client.get(url(server, "/readyz")) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_head(server: HealthServer, client: aiohttp.ClientSession, path: str) -> None:
    async with client.head(url(server, path)) as resp:
        assert resp.status == 200


async def test_unknown_path_is_404(server: HealthServer, client: aiohttp.ClientSession) -> None:
    async with client.get(url(server, "/nope")) as resp:
        assert resp.status == 404


async def test_bind_conflict(server: HealthServer) -> None:
    other = HealthServer("127.0.0.1", server.port, ready=lambda: (True, ""))
    with pytest.raises(HealthError) as caught:
        await other.start()
    message = str(caught.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:{server.port}: ")
    assert "in use" in message.lower()
    assert "\n" not in message
    await other.stop()  # harmless after a failed start


async def test_extra_route(readiness: Readiness, client: aiohttp.ClientSession) -> None:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text="lkrun_jobs 3\n")

    health = HealthServer("127.0.0.1", 0, ready=readiness)
    health.add_route("/metrics", metrics)
    await health.start()
    try:
        async with client.get(url(health, "/metrics")) as resp:
            assert resp.status == 200
            assert await resp.text() == "lkrun_jobs 3\n"
        with pytest.raises(RuntimeError):
            health.add_route("/late", metrics)
    finally:
        await health.stop()


async def test_stop_releases_the_port(readiness: Readiness) -> None:
    health = HealthServer("127.0.0.1", 0, ready=readiness)
    await health.start()
    port = health.port
    await health.stop()
    await health.stop()  # idempotent

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    again = HealthServer("127.0.0.1", port, ready=readiness)
    await again.start()
    assert again.port == port
    await again.stop()
