"""The gateway's view of kvmanager for /health (services/gateway/kvmanager_link.py), against a
real kvmanager over gRPC and a real redis-server that the test stops and starts."""

from __future__ import annotations

import asyncio
import time

from aiohttp.test_utils import TestClient, TestServer
from pagemesh.services.gateway.app import GatewayConfig, create_app
from pagemesh.services.gateway.kvmanager_link import KVManagerLink
from pagemesh.services.kvmanager.server import start_server

from pagemesh.redis_process import RedisProcess, free_port


async def _until(link: KVManagerLink, want: dict[str, str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (got := await link.health()) != want:
        assert time.monotonic() < deadline, f"health stayed {got}, wanted {want}"
        await asyncio.sleep(0.1)


async def test_health_follows_redis_through_an_outage(redis_process: RedisProcess) -> None:
    server = await start_server(port=0, redis_url=redis_process.url)
    link = KVManagerLink(f"127.0.0.1:{server.port}")
    try:
        await _until(link, {"kvmanager": "serving", "redis": "connected"})
        redis_process.stop()
        await _until(link, {"kvmanager": "serving", "redis": "unreachable"})
        stats = await link.stats()
        assert stats is not None and not stats.redis_connected
        redis_process.start()
        await _until(link, {"kvmanager": "serving", "redis": "connected"})
    finally:
        await link.close()
        await server.stop()


async def test_health_without_redis_and_without_kvmanager() -> None:
    server = await start_server(port=0)  # memory only: no Redis health entry
    link = KVManagerLink(f"127.0.0.1:{server.port}")
    try:
        assert await link.health() == {"kvmanager": "serving", "redis": "off"}
    finally:
        await link.close()
        await server.stop()
    gone = KVManagerLink(f"127.0.0.1:{free_port()}")
    try:
        assert await gone.health() == {"kvmanager": "unreachable", "redis": "unknown"}
        assert await gone.stats() is None
    finally:
        await gone.close()


async def test_gateway_health_names_kvmanager() -> None:
    """No executor yet: 503 as before, and the body says what kvmanager is doing."""
    config = GatewayConfig(
        executors=[f"127.0.0.1:{free_port()}"], kvmanager=f"127.0.0.1:{free_port()}"
    )
    async with TestClient(TestServer(create_app(config))) as client:
        resp = await client.get("/health")
        assert resp.status == 503
        assert await resp.json() == {
            "status": "loading",
            "kvmanager": "unreachable",
            "redis": "unknown",
        }
