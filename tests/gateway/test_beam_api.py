"""Beam search through the API: the gateway (aiohttp) in front of the real executor gRPC service
running the real LLMEngine (SmolLM2 on CPU, in-process allocator). /v1/completions and
/v1/chat/completions, streaming and not, return transformers' beams; bad combinations are
OpenAI-style 400s that cost no block."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.executor.server import serve
from pagemesh.services.gateway.app import GatewayConfig, create_app

from pagemesh.redis_process import free_port
from tests.executor.engine_support import assert_all_free_or_cached, make_engine, tokenizer
from tests.executor.test_beam_search import MAX_NEW, hf_beams

PROMPT = "List three uses of a paperclip:"
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture
async def api(smollm2_path: Path) -> AsyncIterator[tuple[TestClient, object]]:
    engine = await make_engine(smollm2_path, max_beam_width=8)
    info = pb.ExecutorInfo(
        executor_id="beam",
        model="smol",
        model_path=str(smollm2_path),
        block_size=engine.config.block_size,
        num_blocks=engine.pool.num_blocks,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
        eos_token_id=2,
        max_num_seqs=engine.config.max_num_seqs,
        max_beam_width=engine.config.max_beam_width,
    )
    port = free_port()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(engine, info, "127.0.0.1", port, stop))
    app = create_app(GatewayConfig(executors=[f"127.0.0.1:{port}"]))
    async with TestClient(TestServer(app)) as client:
        for _ in range(400):
            if (await client.get("/health")).status == 200:
                break
            await asyncio.sleep(0.05)
        yield client, engine
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await server


def _text(path: Path, ids: list[int]) -> str:
    return tokenizer(path).decode(ids, skip_special_tokens=True)


def _sse(body: bytes) -> list[dict]:
    assert body.endswith(b"data: [DONE]\n\n")
    return [json.loads(f[6:]) for f in body.split(b"\n\n")[:-2]]


async def test_completions_return_transformers_beams(
    api: tuple[TestClient, object], smollm2_path: Path
) -> None:
    client, engine = api
    body = {
        "model": "smol",
        "prompt": PROMPT,
        "max_tokens": MAX_NEW,
        "use_beam_search": True,
        "n": 3,
        "beam_width": 8,
        "length_penalty": 0.5,
        "early_stopping": True,
    }
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    prompt = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    beams, _ = hf_beams(smollm2_path, tuple(prompt), 8, 3, 0.5, True)
    choices = sorted(data["choices"], key=lambda c: c["index"])
    assert [c["text"] for c in choices] == [_text(smollm2_path, b) for b in beams]
    assert data["usage"]["completion_tokens"] == sum(len(b) for b in beams)

    # Streaming: the role/first chunks come at once, the final beams at the end; same text.
    resp = await client.post("/v1/completions", json={**body, "stream": True})
    assert resp.status == 200
    chunks = _sse(await resp.read())
    texts = ["", "", ""]
    finish = [None, None, None]
    for c in chunks:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
            finish[ch["index"]] = ch["finish_reason"] or finish[ch["index"]]
    assert texts == [c["text"] for c in choices]
    assert finish == [c["finish_reason"] for c in choices]
    await asyncio.sleep(0.1)
    assert_all_free_or_cached(engine)


async def test_chat_beams_stream_and_not(
    api: tuple[TestClient, object], smollm2_path: Path
) -> None:
    client, engine = api
    body = {
        "model": "smol",
        "messages": CHAT,
        "max_tokens": MAX_NEW,
        "use_beam_search": True,
        "n": 2,
        "beam_width": 4,
        "early_stopping": "never",
        "length_penalty": 2.0,
    }
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    ids = tokenizer(smollm2_path).apply_chat_template(CHAT, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    beams, _ = hf_beams(smollm2_path, tuple(ids), 4, 2, 2.0, "never")
    choices = sorted(data["choices"], key=lambda c: c["index"])
    assert [c["message"]["content"] for c in choices] == [_text(smollm2_path, b) for b in beams]
    assert [c["finish_reason"] for c in choices] == [
        "stop" if b[-1] == 2 else "length" for b in beams
    ]

    resp = await client.post(
        "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert resp.status == 200
    chunks = _sse(await resp.read())
    assert chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    content = ["", ""]
    for c in chunks:
        for ch in c["choices"]:
            content[ch["index"]] += ch["delta"].get("content") or ""
    assert content == [c["message"]["content"] for c in choices]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == sum(
        len(b) for b in beams
    )
    await asyncio.sleep(0.1)
    assert_all_free_or_cached(engine)


BAD = [
    ({"beam_width": 0}, "beam_width", "between 1 and 8"),
    ({"beam_width": 9}, "beam_width", "between 1 and 8"),
    ({"beam_width": 2, "n": 3}, "n", "at most beam_width (2) beams"),
    ({"temperature": 0.8}, "temperature", "beam search is deterministic"),
    ({"top_p": 0.9}, "top_p", "cannot be combined with 'use_beam_search'"),
    ({"top_k": 5}, "top_k", "cannot be combined"),
    ({"min_p": 0.1}, "min_p", "cannot be combined"),
    ({"seed": 3}, "seed", "cannot be combined"),
    ({"presence_penalty": 0.5}, "presence_penalty", "cannot be combined"),
    ({"logprobs": 2}, "logprobs", "cannot be combined"),
    ({"early_stopping": "sometimes"}, "early_stopping", 'true, false or "never"'),
    ({"length_penalty": "long"}, "length_penalty", "expected a number"),
    ({"use_beam_search": "yes"}, "use_beam_search", "expected a boolean"),
    ({"use_beam_search": False, "beam_width": 4}, "beam_width", "requires 'use_beam_search'"),
]


async def test_bad_beam_requests_are_400s(api: tuple[TestClient, object]) -> None:
    client, engine = api
    for endpoint, base in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": CHAT}),
    ):
        for extra, param, words in BAD:
            if endpoint.startswith("/v1/chat") and param == "logprobs":
                extra = {"logprobs": True}
            body = {"model": "smol", "max_tokens": 4, "use_beam_search": True, **base, **extra}
            resp = await client.post(endpoint, json=body)
            assert resp.status == 400, (endpoint, extra)
            err = (await resp.json())["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == param
            assert words in err["message"], err["message"]
    assert not engine.has_unfinished_requests()
    assert_all_free_or_cached(engine)
