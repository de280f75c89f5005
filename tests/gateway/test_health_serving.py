"""/health answers 503 whenever the gateway cannot serve, over real loopback HTTP and the real
executor gRPC service (a scripted engine standing in for the model): an executor failing every
step (as one told its epoch is stale did, while /health said "ok"), and no executor at all."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from pagemesh.services.executor.engine_api import SequenceOutput
from pagemesh.services.executor.server import serve
from pagemesh.services.gateway.app import GatewayConfig, create_app
from pagemesh.services.gateway.chat import Tokenizer
from pagemesh.services.gateway.migration import MigrationPolicy
from pagemesh.services.gateway.served_models import FAILING_AFTER

from pagemesh.redis_process import free_port
from tests.gateway.scripted_engine import ScriptedEngine, scripted_info

CHAT = "/v1/chat/completions"
BODY = {"model": "smol", "messages": [{"role": "user", "content": "Capital of France?"}]}


class BreakableEngine(ScriptedEngine):
    """Every step raises while `broken` is set, as an engine whose kvmanager calls all fail."""

    broken = False

    async def step(self) -> list[SequenceOutput]:
        if self.broken:
            await asyncio.sleep(0.01)
            self.live.clear()  # the loop fails every request in flight
            raise RuntimeError("kvmanager: epoch 7 of executor 'fake' is stale")
        return await super().step()


async def _health_until(client: TestClient, status: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        resp = await client.get("/health")
        body = await resp.json()
        if resp.status == status:
            return body
        assert time.monotonic() < deadline, f"/health stayed {resp.status} {body}"
        await asyncio.sleep(0.1)


async def test_health_is_503_while_the_executor_fails_and_when_it_is_gone(
    tokenizer: Tokenizer, smollm2_path: Path
) -> None:
    eos = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    engine = BreakableEngine(tokenizer.encode("Paris."), eos)
    port = free_port()
    info = scripted_info(len(tokenizer.hf), str(smollm2_path))
    stop = asyncio.Event()
    server = asyncio.create_task(serve(engine, info, "127.0.0.1", port, stop))
    # A request waits migration.wait_s for an executor to come back before its 503 (60 s by
    # default, to ride through a restart); 2 s here, the 503 after it is what is tested.
    config = GatewayConfig(executors=[f"127.0.0.1:{port}"], migration=MigrationPolicy(wait_s=2.0))
    app = create_app(config)
    try:
        async with TestClient(TestServer(app)) as client:
            assert (await _health_until(client, 200))["status"] == "ok"
            assert (await client.post(CHAT, json=BODY)).status == 200

            engine.broken = True
            for _ in range(FAILING_AFTER):
                resp = await client.post(CHAT, json=BODY)
                assert resp.status == 500, await resp.text()
            resp = await client.get("/health")
            assert resp.status == 503
            assert (await resp.json())["status"] == "executor failing"
            assert resp.headers["Retry-After"]

            # Requests still reach it, and the first success clears the state.
            engine.broken = False
            assert (await client.post(CHAT, json=BODY)).status == 200
            assert (await _health_until(client, 200, timeout=1.0))["status"] == "ok"

            # No executor at all: 503 until one is back.
            stop.set()
            await server
            body = await _health_until(client, 503)
            assert body["status"] == "executor unavailable"
            assert (await client.post(CHAT, json=BODY)).status == 503
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await server
