"""Fixtures of the kvmanager tests. `make` builds a registered allocator twice over: the
in-process one and the gRPC client (over its Session stream, and unary) against a real in-process server on loopback, so every core
test also checks that both behave the same. Either exposes `.manager`, the core behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pagemesh.services.kvmanager.client import KVManagerClient
from pagemesh.services.kvmanager.local import LocalAllocator
from pagemesh.services.kvmanager.server import start_server

BS = 4


@pytest.fixture(params=["local", "grpc-session", "grpc-unary"])
async def make(request: pytest.FixtureRequest) -> AsyncIterator[Callable]:
    servers, clients = [], []

    async def factory(num_blocks: int = 16, executor_id: str = "ex", **register: Any):
        if request.param == "local":
            a = LocalAllocator(executor_id)
        else:
            srv = await start_server(port=0)
            servers.append(srv)
            a = KVManagerClient(
                f"127.0.0.1:{srv.port}",
                executor_id,
                use_session=request.param == "grpc-session",
            )
            a.manager = srv.manager  # type: ignore[attr-defined]
            clients.append(a)
        await a.register(num_blocks, BS, "model-a", **register)
        return a

    yield factory
    for c in clients:
        await c.close()
    for s in servers:
        await s.stop(0)
