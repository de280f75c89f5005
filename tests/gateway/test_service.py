"""The gateway against the real executor gRPC service, in one process, with a scripted engine
standing in for the model (the e2e tests run the real one). This pins the wire behaviour: one
StepOutput per step, fan-out to HTTP streams, OpenAI framing, aborts on disconnect."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import executor_pb2_grpc as pb_grpc
from pagemesh.services.executor.server import serve
from pagemesh.services.gateway.app import GATEWAY, GatewayConfig, create_app
from pagemesh.services.gateway.chat import Tokenizer

from pagemesh.redis_process import free_port
from tests.gateway.scripted_engine import ScriptedEngine, scripted_info

ANSWER = "The capital of France is Paris. 🎉 It is lovely."


@pytest.fixture
async def mesh(
    tokenizer: Tokenizer, smollm2_path: Path
) -> AsyncIterator[tuple[TestClient, ScriptedEngine]]:
    eos = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    engine = ScriptedEngine(tokenizer.encode(ANSWER), eos)
    port = free_port()
    info = scripted_info(len(tokenizer.hf), str(smollm2_path))
    stop = asyncio.Event()
    server = asyncio.create_task(serve(engine, info, "127.0.0.1", port, stop))
    app = create_app(GatewayConfig(executors=[f"127.0.0.1:{port}"], api_keys=["sekrit"]))
    async with TestClient(TestServer(app)) as client:
        for _ in range(200):
            if (await client.get("/health")).status == 200:
                break
            await asyncio.sleep(0.05)
        yield client, engine
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await server


AUTH = {"Authorization": "Bearer sekrit"}


def events(body: bytes) -> list[dict | str]:
    assert body.endswith(b"data: [DONE]\n\n")
    frames = body.split(b"\n\n")
    assert frames[-1] == b""
    out: list[dict | str] = []
    for frame in frames[:-1]:
        assert frame.startswith(b"data: ") and b"\n" not in frame
        data = frame[6:].decode()
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_auth_required(mesh: tuple[TestClient, ScriptedEngine]) -> None:
    client, _ = mesh
    resp = await client.post("/v1/chat/completions", json={})
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_stream_chat_framing_and_usage(mesh: tuple[TestClient, ScriptedEngine]) -> None:
    client, engine = mesh
    engine.cached = 16
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Capital of France?"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status == 200
    evs = events(await resp.read())
    chunks = evs[:-1]
    assert evs[-1] == "[DONE]"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == ANSWER
    assert chunks[-2]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[-1]["choices"] == []
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 16
    assert usage["completion_tokens"] == len(engine.answer) + 1
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_non_stream_n2_stop_and_length(mesh: tuple[TestClient, ScriptedEngine]) -> None:
    client, engine = mesh
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "q"}],
        "n": 2,
        "stop": ["Paris"],
    }
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    data = await resp.json()
    assert resp.status == 200, data
    assert [c["message"]["content"] for c in data["choices"]] == ["The capital of France is "] * 2
    assert [c["finish_reason"] for c in data["choices"]] == ["stop", "stop"]
    await asyncio.sleep(0.05)
    assert not engine.live  # cut by the stop string at the gateway: aborted at the executor
    body = {"model": "smol", "prompt": "x", "max_tokens": 3}
    data = await (await client.post("/v1/completions", json=body, headers=AUTH)).json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3


async def test_a_choice_cut_by_a_stop_string_ends_at_the_executor(
    mesh: tuple[TestClient, ScriptedEngine], tokenizer: Tokenizer
) -> None:
    """n > 1: the choice that meets the stop string is ended at the executor right away (no
    more steps or blocks for it), while the other choice runs on to its own end."""
    client, engine = mesh
    other = "Rome is a lovely old city, and it is big, and it is far from here."
    engine.choice_answers[1] = tokenizer.encode(other)
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "q"}],
        "n": 2,
        "stop": ["Paris"],
        "stream": True,
    }
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    chunks = [e for e in events(await resp.read()) if isinstance(e, dict)]
    text = ["", ""]
    finish: list[str | None] = [None, None]
    for chunk in chunks:
        for c in chunk["choices"]:
            text[c["index"]] += c["delta"].get("content") or ""
            finish[c["index"]] = c["finish_reason"] or finish[c["index"]]
    assert text == ["The capital of France is ", other]
    assert finish == ["stop", "stop"]
    [(rid, indices)] = engine.choice_aborts
    assert indices == [0]
    # Choice 0 stopped within a step or two of "Paris", not at the end of its script.
    upto_paris = len(tokenizer.encode("The capital of France is Paris"))
    assert engine.generated[rid, 0] <= upto_paris + 2 < len(engine.answer)
    assert engine.generated[rid, 1] == len(engine.choice_answers[1]) + 1  # to its EOS
    assert not engine.live


async def test_bad_requests_are_400s(mesh: tuple[TestClient, ScriptedEngine]) -> None:
    client, _ = mesh
    cases = [
        b"{not json",
        json.dumps(
            {"model": "smol", "messages": [{"role": "user", "content": "x " * 400}]}
        ).encode(),
        json.dumps(
            {"model": "smol", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000}
        ).encode(),
    ]
    for raw in cases:
        resp = await client.post(
            "/v1/chat/completions", data=raw, headers={**AUTH, "Content-Type": "application/json"}
        )
        assert resp.status == 400, raw
        assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}
    # A model this server does not serve: OpenAI's 404, code model_not_found.
    raw = json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode()
    resp = await client.post(
        "/v1/chat/completions", data=raw, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert (error["param"], error["code"]) == ("model", "model_not_found")


async def test_disconnect_aborts(mesh: tuple[TestClient, ScriptedEngine]) -> None:
    client, engine = mesh
    engine.delay = 0.05
    body = {"model": "smol", "messages": [{"role": "user", "content": "q"}], "stream": True}
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    await resp.content.readuntil(b"\n\n")
    resp.close()  # the client goes away mid-stream
    for _ in range(100):
        if engine.aborted:
            break
        await asyncio.sleep(0.02)
    assert len(engine.aborted) == 1 and not engine.live


async def test_generate_abort_and_info_rpcs(mesh: tuple[TestClient, ScriptedEngine]) -> None:
    client, engine = mesh
    engine.delay = 0.02
    gw = client.server.app[GATEWAY]
    stub = pb_grpc.ExecutorStub(gw.client._channel)
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert (info.executor_id, info.max_model_len, info.num_blocks) == ("fake", 256, 64)
    # Generate: one StepOutput per step, holding only this request, ending with its finish.
    req = pb.GenerateRequest(
        request_id="g1", prompt_token_ids=[1, 2, 3], params=pb.SamplingParams(n=2, max_tokens=3)
    )
    steps = [s async for s in stub.Generate(req)]
    assert len(steps) == 3 and all(len(s.outputs) == 2 for s in steps)
    assert {o.request_id for s in steps for o in s.outputs} == {"g1"}
    assert not any(s.token_request_ids for s in steps)  # full outputs only: simple clients
    assert [o.finish_reason for o in steps[-1].outputs] == [pb.FINISH_LENGTH] * 2
    # Abort: the Generate caller gets the ABORT ends, then the stream closes.
    req = pb.GenerateRequest(
        request_id="g2", prompt_token_ids=[1], params=pb.SamplingParams(max_tokens=1000)
    )
    call = stub.Generate(req)
    first = await call.read()
    assert first.outputs[0].request_id == "g2"
    assert (await stub.Abort(pb.AbortRequest(request_ids=["g2", "nope"]))).num_aborted == 1
    rest = []
    while (msg := await call.read()) is not grpc.aio.EOF:
        rest.append(msg)
    assert rest[-1].outputs[-1].finish_reason == pb.FINISH_ABORT
    assert "g2" in engine.aborted and not engine.live
    # Bad input is INVALID_ARGUMENT on Generate.
    with pytest.raises(grpc.aio.AioRpcError) as info_err:
        async for _ in stub.Generate(pb.GenerateRequest(request_id="g3")):
            pass
    assert info_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_models_health_metrics(mesh: tuple[TestClient, ScriptedEngine]) -> None:
    client, _ = mesh
    data = await (await client.get("/v1/models", headers=AUTH)).json()
    assert data["data"][0]["id"] == "smol"
    text = await (await client.get("/metrics")).text()
    assert "pagemesh_gateway_requests_in_flight" in text


async def test_too_many_in_flight_is_a_429(mesh: tuple[TestClient, ScriptedEngine]) -> None:
    client, engine = mesh
    client.server.app[GATEWAY].config.max_concurrent = 0
    body = {"model": "smol", "messages": [{"role": "user", "content": "q"}]}
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status == 429
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
    assert not engine.live


async def test_one_step_message_carries_every_request(
    mesh: tuple[TestClient, ScriptedEngine],
) -> None:
    """Concurrent HTTP requests share the gateway's one Serve stream: each scheduler step comes
    down as a single StepOutput holding the new tokens of all of them."""
    client, engine = mesh
    engine.delay = 0.02
    gw = client.server.app[GATEWAY]
    seen: list[set[str]] = []
    dispatch = gw.client._dispatch

    def spy(step: pb.StepOutput) -> None:
        seen.append({o.request_id for o in step.outputs} | set(step.token_request_ids))
        dispatch(step)

    gw.client._dispatch = spy  # type: ignore[method-assign]
    body = {"model": "smol", "messages": [{"role": "user", "content": "q"}], "max_tokens": 6}
    engine.step_sizes.clear()
    resps = await asyncio.gather(
        *(client.post("/v1/chat/completions", json=body, headers=AUTH) for _ in range(3))
    )
    assert [r.status for r in resps] == [200, 200, 200]
    assert len(seen) == sum(1 for n in engine.step_sizes if n)  # one message per step
    assert max(len(ids) for ids in seen) == 3  # ... carrying all three requests


async def test_oversized_body_is_refused_before_reading(
    mesh: tuple[TestClient, ScriptedEngine],
) -> None:
    client, engine = mesh
    client.server.app[GATEWAY].config.max_body_bytes = 1000
    body = {"model": "smol", "messages": [{"role": "user", "content": "x" * 2000}]}
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status == 413
    err = (await resp.json())["error"]
    assert err["type"] == "invalid_request_error" and "1000 bytes" in err["message"]
    assert not engine.live


async def test_omitted_max_tokens_fits_a_small_pool(
    mesh: tuple[TestClient, ScriptedEngine],
) -> None:
    """max_tokens defaults to what fits in the context AND the KV pool, so a small pool does
    not turn every request without max_tokens into a refusal."""
    client, engine = mesh
    gw = client.server.app[GATEWAY]
    gw.client.info.num_blocks = 4  # 64 tokens of pool, below max_model_len 256
    engine.capacity = 64
    body = {"model": "smol", "messages": [{"role": "user", "content": "q"}]}
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status == 200, await resp.text()
