"""The gateway's /metrics over real loopback HTTP, with the real executor gRPC service (a
scripted engine standing in for the model) and a real kvmanager: every request counted by route
and status code, 4xx included; kvmanager's figures mirrored as counters, never as ratios; the
exposition clean for a strict parser with promtool's rules and for promtool itself when one can
be had (tests/support/exposition.py)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pagemesh.services.executor.server import serve
from pagemesh.services.gateway.app import GATEWAY, GatewayConfig, create_app
from pagemesh.services.gateway.chat import Tokenizer
from pagemesh.services.kvmanager.server import start_server
from prometheus_client.parser import text_string_to_metric_families

from pagemesh.redis_process import free_port
from tests.gateway.scripted_engine import ScriptedEngine, scripted_info
from tests.support.exposition import promtool_problems, strict_problems

AUTH = {"Authorization": "Bearer sekrit"}
CHAT = "/v1/chat/completions"
MAX_BODY = 4096


@pytest.fixture
async def gateway(tokenizer: Tokenizer, smollm2_path: Path) -> AsyncIterator[TestClient]:
    kv = await start_server(port=0, metrics_port=0)
    eos = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    engine = ScriptedEngine(tokenizer.encode("Paris."), eos)
    port = free_port()
    info = scripted_info(len(tokenizer.hf), str(smollm2_path))
    stop = asyncio.Event()
    server = asyncio.create_task(serve(engine, info, "127.0.0.1", port, stop))
    config = GatewayConfig(
        executors=[f"127.0.0.1:{port}"],
        kvmanager=f"127.0.0.1:{kv.port}",
        api_keys=["sekrit"],
        max_body_bytes=MAX_BODY,
    )
    try:
        async with TestClient(TestServer(create_app(config))) as client:
            for _ in range(400):
                if (await client.get("/health")).status == 200:
                    break
                await asyncio.sleep(0.05)
            client.kv_metrics_port = kv.metrics_port  # type: ignore[attr-defined]
            yield client
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await server
        await kv.stop()


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_every_request_is_counted_by_route_and_code(gateway: TestClient) -> None:
    client = gateway
    ok = {"model": "smol", "messages": [{"role": "user", "content": "Capital of France?"}]}
    assert (await client.post(CHAT, json=ok, headers=AUTH)).status == 200
    resp = await client.post(CHAT, json={**ok, "stream": True}, headers=AUTH)
    assert resp.status == 200
    await resp.read()
    resp = await client.post(CHAT, json={"model": "smol", "messages": []}, headers=AUTH)
    assert resp.status == 400
    assert (await client.post(CHAT, json=ok)).status == 401  # no key
    big = {**ok, "user": "x" * (2 * MAX_BODY)}
    assert (await client.post(CHAT, json=big, headers=AUTH)).status == 413
    client.server.app[GATEWAY].config.max_concurrent = 0
    assert (await client.post(CHAT, json=ok, headers=AUTH)).status == 429
    client.server.app[GATEWAY].config.max_concurrent = 1024
    assert (await client.get("/v1/models/no-such-model", headers=AUTH)).status == 404
    assert (await client.get("/v1/models/no-such-model-2", headers=AUTH)).status == 404
    assert (await client.get("/no/such/url")).status == 404

    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    counted = _samples(text, "pagemesh_gateway_requests_total")

    def n(route: str, code: str) -> float:
        return counted.get((("code", code), ("route", route)), 0.0)

    assert n(CHAT, "200") == 2
    assert n(CHAT, "400") == 1
    assert n(CHAT, "401") == 1
    assert n(CHAT, "413") == 1
    assert n(CHAT, "429") == 1
    # Ids and unknown URLs are not label values of their own.
    assert n("/v1/models/{model}", "404") == 2
    assert n("other", "404") == 1
    assert n("/health", "200") >= 1

    # kvmanager's figures: counters to divide in PromQL, never a ratio, never a counter as gauge.
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    for name in ("query_tokens", "hit_tokens", "query_requests", "hit_requests"):
        assert families.get(f"pagemesh_gateway_kv_{name}") == "counter", name
    assert "hit_rate" not in text
    assert "_created" not in text
    assert families["pagemesh_gateway_kv_up"] == "gauge"

    assert strict_problems(text) == []
    from_promtool = promtool_problems(text)
    assert from_promtool in (None, []), from_promtool


BAD = """# HELP pagemesh_gateway_kv_token_hit_rate a ratio
# TYPE pagemesh_gateway_kv_token_hit_rate gauge
pagemesh_gateway_kv_token_hit_rate{window="since_start"} 0.5
# HELP pagemesh_gateway_kv_evictions evictions as a counter without _total
# TYPE pagemesh_gateway_kv_evictions counter
pagemesh_gateway_kv_evictions{executor="a"} 3
# HELP requests_total a gauge named like a counter
# TYPE requests_total gauge
requests_total 1
"""


def test_the_checkers_catch_what_the_gateway_used_to_export() -> None:
    problems = "\n".join(strict_problems(BAD))
    assert "precomputed ratio" in problems
    assert 'counter metrics should have "_total" suffix' in problems
    assert 'non-counter metrics should not have "_total" suffix' in problems
    assert strict_problems("# TYPE a counter\nb_total 1\n")  # a sample outside its family
    from_promtool = promtool_problems(BAD)
    if from_promtool is not None:
        assert any("_total" in line for line in from_promtool), from_promtool


async def test_kvmanagers_exposition_is_clean_too(gateway: TestClient) -> None:
    import aiohttp

    port = gateway.kv_metrics_port  # type: ignore[attr-defined]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    assert "pagemesh_kv_" in text
    assert strict_problems(text) == []
    from_promtool = promtool_problems(text)
    assert from_promtool in (None, []), from_promtool
