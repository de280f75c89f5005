"""The executor's gRPC service around an engine, on a free loopback port, with the gateway's
client connected to it: for tests of what crosses the Serve stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.executor.server import serve
from pagemesh.services.gateway.executor_client import ExecutorClient

from pagemesh.redis_process import free_port


@contextlib.asynccontextmanager
async def executor_service(engine: Any, trace_path: str = "") -> AsyncIterator[ExecutorClient]:
    """Serves `engine` (started) until the block ends; yields a connected client."""
    info = pb.ExecutorInfo(
        executor_id="test",
        model="smol",
        block_size=engine.config.block_size,
        num_blocks=engine.pool.num_blocks,
        max_model_len=engine.max_model_len,
    )
    port = free_port()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(engine, info, "127.0.0.1", port, stop, trace_path))
    client = ExecutorClient(f"127.0.0.1:{port}")
    client.start()
    try:
        await asyncio.wait_for(client._connected.wait(), 60)
        yield client
    finally:
        await client.close()
        stop.set()
        await server
