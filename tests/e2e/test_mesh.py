"""The product end to end: three service processes on loopback, a real Redis, SmolLM2 on CPU.

Everything a client sees goes through the gateway's HTTP API (the official openai client, or
raw HTTP where the bytes themselves are under test); everything about memory is read from
kvmanager's own GetStats, never from the services' insides.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
import uuid
from typing import Any

import openai
import pytest
from pagemesh.proto import kvmanager_pb2
from pagemesh.services.kvmanager.hashing import salt_id

from tests.e2e.conftest import API_KEY, MODEL
from tests.support.mesh import REPO_ROOT, Mesh, assert_pool_consistent, wait_for

KV_STATS = [sys.executable, "-P", "-m", "pagemesh.cli", "kv", "stats"]
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


# ----- helpers ---------------------------------------------------------------------------------


def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def _conn(mesh: Mesh) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", mesh.gateway_port, timeout=120)


def post(
    mesh: Mesh, path: str, body: dict[str, Any] | bytes, auth: bool = True
) -> tuple[int, dict[str, str], bytes]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = f"Bearer {API_KEY}"
    conn = _conn(mesh)
    try:
        conn.request("POST", path, body=raw, headers=headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def raw_request(mesh: Mesh, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


def open_stream(mesh: Mesh, body: dict[str, Any]) -> socket.socket:
    """A raw connection with the request sent; closing it is a client disconnect."""
    sock = socket.create_connection(("127.0.0.1", mesh.gateway_port), timeout=120)
    sock.sendall(raw_request(mesh, body))
    return sock


def read_until(sock: socket.socket, marker: bytes, count: int = 1) -> bytes:
    data = b""
    while data.count(marker) < count:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early: {data[-500:]!r}"
        data += chunk
    return data


def pool(mesh: Mesh) -> kvmanager_pb2.PoolStats:
    p = mesh.pool()
    assert_pool_consistent(p)
    return p


def idle_pool(mesh: Mesh) -> kvmanager_pb2.PoolStats:
    """The pool once nothing is live (the baseline the tests compare against)."""
    return mesh.wait_idle(timeout=60)


def wait_released(mesh: Mesh, baseline_in_use: int, timeout: float = 10.0) -> float:
    """Seconds until kvmanager shows no live sequence and in_use back at the baseline."""
    t0 = time.monotonic()
    mesh.wait_idle(timeout=timeout, baseline_in_use=baseline_in_use)
    return time.monotonic() - t0


def unique_words(n: int) -> str:
    # A fresh prompt every run: no prefix-cache hit may shorten the prefill under test.
    tag = uuid.uuid4().hex[:6]
    return " ".join(f"w{tag}{i}" for i in range(n))


def sse_events(body: bytes) -> list[bytes]:
    """Splits an SSE body into the payloads of its `data:` events, checking the framing."""
    assert body.endswith(b"\n\n")
    frames = body[:-2].split(b"\n\n")
    out = []
    for frame in frames:
        assert frame.startswith(b"data: "), frame
        assert b"\n" not in frame and b"\r" not in frame, frame
        out.append(frame[len(b"data: ") :])
    return out


# ----- the client's view -----------------------------------------------------------------------


def test_openai_client_streams_paris(mesh: Mesh) -> None:
    stream = client(mesh).chat.completions.create(
        model=MODEL, messages=CAPITAL, stream=True, temperature=0, max_tokens=24
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_auth_and_models(mesh: Mesh) -> None:
    status, _, body = post(mesh, "/v1/chat/completions", {"model": MODEL}, auth=False)
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    models = client(mesh).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_logit_bias_through_the_api(mesh: Mesh) -> None:
    """The openai client's logit_bias reaches the sampler: banning the tokens of " Paris" keeps
    it out of the greedy answer, and an id past the vocabulary is a 400."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mesh.config.model)
    banned = {str(t): -100 for t in tok.encode(" Paris", add_special_tokens=False)}
    resp = client(mesh).chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=24, logit_bias=banned
    )
    assert "Paris" not in (resp.choices[0].message.content or "")
    body = {"model": MODEL, "messages": CAPITAL, "max_tokens": 2, "logit_bias": {"99999999": 1}}
    status, _, raw = post(mesh, "/v1/chat/completions", body)
    assert status == 400
    assert "logit_bias" in json.loads(raw)["error"]["message"]


def test_n2_parallel_samples(mesh: Mesh) -> None:
    resp = client(mesh).chat.completions.create(
        model=MODEL, messages=CAPITAL, n=2, temperature=1.0, seed=7, max_tokens=6
    )
    assert sorted(c.index for c in resp.choices) == [0, 1]
    assert all(c.finish_reason in ("stop", "length") and c.message.content for c in resp.choices)
    assert resp.usage.completion_tokens <= 12
    # Streaming: each choice opens with the role and ends with its own finish chunk.
    chunks = list(
        client(mesh).chat.completions.create(
            model=MODEL, messages=CAPITAL, n=2, temperature=1.0, seed=7, max_tokens=6, stream=True
        )
    )
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert mine[-1].finish_reason in ("stop", "length")
        assert sum(1 for c in mine if c.finish_reason) == 1


def test_stop_strings_cut_exactly(mesh: Mesh) -> None:
    full = client(mesh).chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=24
    )
    text = full.choices[0].message.content
    assert "Paris" in text
    cut = client(mesh).chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=24, stop=["Paris", "zzz"]
    )
    assert cut.choices[0].message.content == text[: text.index("Paris")]
    assert cut.choices[0].finish_reason == "stop"
    # Streamed, the stop string never shows up in any delta, even split across tokens.
    stop = text[text.index("Paris") - 3 : text.index("Paris") + 2]  # spans a token boundary
    chunks = list(
        client(mesh).chat.completions.create(
            model=MODEL, messages=CAPITAL, temperature=0, max_tokens=24, stop=[stop], stream=True
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text[: text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_include_usage_reports_cached_prefix(mesh: Mesh) -> None:
    system = (
        "You are the travel assistant of a small agency. "
        + unique_words(40)
        + " Answer briefly and politely; never invent facts; say so when you do not know."
    )
    usages = []
    for question in ("What is the capital of France?", "What is the capital of Italy?"):
        chunks = list(
            client(mesh).chat.completions.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                temperature=0,
                max_tokens=4,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None
        assert all(c.usage is None for c in chunks[:-1])
        usages.append(last.usage)
    first, second = usages
    assert first.prompt_tokens_details.cached_tokens == 0
    cached = second.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0  # whole blocks of the shared system prompt
    assert cached <= second.prompt_tokens - 1


def test_raw_sse_framing_byte_for_byte(mesh: Mesh) -> None:
    body = {
        "model": MODEL,
        "messages": CAPITAL,
        "stream": True,
        "temperature": 0,
        "max_tokens": 8,
        "stream_options": {"include_usage": True},
    }
    status, headers, raw = post(mesh, "/v1/chat/completions", body)
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache"
    payloads = sse_events(raw)
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    # Each event is exactly the compact JSON of its object: no stray whitespace, raw UTF-8.
    for p, c in zip(payloads, chunks, strict=False):
        assert p == json.dumps(c, separators=(",", ":"), ensure_ascii=False).encode()
    assert list(chunks[0]) == [
        "id", "object", "created", "model", "system_fingerprint", "choices", "usage"
    ]  # fmt: skip
    assert chunks[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] in ("stop", "length")
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == (
        usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    )
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
    assert "Paris" in text


def test_logprobs_seed_and_completions_stream(mesh: Mesh) -> None:
    resp = client(mesh).chat.completions.create(
        model=MODEL, messages=CAPITAL, temperature=0, max_tokens=4, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 2
        assert tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    # A seed makes sampling at temperature 1 reproducible.
    texts = {
        client(mesh)
        .chat.completions.create(
            model=MODEL, messages=CAPITAL, temperature=1.0, seed=1234, max_tokens=8
        )
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(texts) == 1
    # Plain completions stream text_completion chunks.
    chunks = list(
        client(mesh).completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True
        )
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert "Paris" in "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


# ----- bad input ------------------------------------------------------------------------------


def _chat(**extra: Any) -> bytes:
    return json.dumps({"model": MODEL, "messages": CAPITAL, **extra}).encode()


BAD_INPUT = [
    ("malformed json", b'{"model": "x", "messages": [', None),
    ("body not an object", b"[1, 2, 3]", None),
    ("messages wrong type", json.dumps({"model": MODEL, "messages": "hi"}).encode(), "messages"),
    ("temperature wrong type", _chat(temperature="warm"), "temperature"),
    ("stream wrong type", _chat(stream="yes"), "stream"),
    ("empty messages", json.dumps({"model": MODEL, "messages": []}).encode(), "messages"),
    (
        "prompt longer than context",
        json.dumps(
            {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 9000}]}
        ).encode(),
        "messages",
    ),
    ("max_tokens zero", _chat(max_tokens=0), "max_tokens"),
    ("max_tokens negative", _chat(max_tokens=-5), "max_tokens"),
    ("max_tokens past the context", _chat(max_tokens=8180), "max_tokens"),
    ("max_tokens absurd", _chat(max_tokens=10**12), "max_tokens"),
    ("n too large", _chat(n=100), "n"),
    # Within the gateway's limit but past the executor's (--max-num-seqs 2): refused by the
    # engine's own validation, still a 400 and still no block.
    ("n past the executor", _chat(n=3), None),
    (
        "unknown role",
        json.dumps({"model": MODEL, "messages": [{"role": "oracle", "content": "hi"}]}).encode(),
        "messages[0].role",
    ),
]


def test_unknown_model_is_404(mesh: Mesh) -> None:
    """OpenAI's answer to a model the server does not serve: 404, code model_not_found."""
    raw = json.dumps({"model": "gpt-9", "messages": CAPITAL}).encode()
    status, headers, body = post(mesh, "/v1/chat/completions", raw)
    assert status == 404, body
    assert headers["Content-Type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert (err["param"], err["code"]) == ("model", "model_not_found"), err
    assert "gpt-9" in err["message"] and MODEL in err["message"], err
    with pytest.raises(openai.NotFoundError):
        client(mesh).chat.completions.create(model="gpt-9", messages=CAPITAL, max_tokens=4)


def test_bad_input_is_400_and_costs_no_block(mesh: Mesh) -> None:
    before = idle_pool(mesh)
    for case, raw, param in BAD_INPUT:
        status, headers, body = post(mesh, "/v1/chat/completions", raw)
        assert status == 400, (case, body)
        assert headers["Content-Type"].startswith("application/json"), case
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, case
        assert err["type"] == "invalid_request_error" and err["message"], case
        if param is not None:
            assert err["param"] == param, (case, err)
    # The same through the official client: a typed BadRequestError.
    with pytest.raises(openai.BadRequestError):
        client(mesh).chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    after = pool(mesh)
    assert (after.free, after.in_use, after.cached, after.live_sequences) == (
        before.free,
        before.in_use,
        before.cached,
        0,
    )


# ----- disconnects ----------------------------------------------------------------------------


def decode_step_seconds(sock: socket.socket, events: int = 8) -> float:
    """Reads `events` SSE events and returns the mean time between them: one decode step."""
    data, stamps = b"", []
    while len(stamps) < events:
        chunk = sock.recv(65536)
        assert chunk, data[-500:]
        data += chunk
        stamps += [time.monotonic()] * (data.count(b"data: ") - len(stamps))
    return (stamps[-1] - stamps[1]) / max(1, len(stamps) - 2)


def test_disconnect_mid_stream_releases_blocks(mesh: Mesh) -> None:
    base = idle_pool(mesh)
    body = {"model": MODEL, "messages": CAPITAL, "stream": True, "max_tokens": 400}
    body["ignore_eos"] = True
    sock = open_stream(mesh, body)
    step = decode_step_seconds(sock)  # a few tokens in: decoding
    live = pool(mesh)
    assert live.live_sequences == 1 and live.in_use > base.in_use
    sock.close()
    took = wait_released(mesh, base.in_use)
    print(f"mid-stream disconnect: blocks back to baseline in {took:.2f}s (step {step:.3f}s)")
    # The abort is taken at the next step; the rest is the release RPC and our 0.2 s polling.
    assert took < 3 * step + 1.0


def test_disconnect_during_prefill_releases_blocks(mesh: Mesh) -> None:
    base = idle_pool(mesh)
    # ~2000 prompt tokens in 256-token chunks: prefill spans a dozen steps.
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": unique_words(500)}],
        "stream": True,
        "max_tokens": 4,
    }
    sock = open_stream(mesh, body)
    wait_for(lambda: pool(mesh).live_sequences == 1, 30, "the prompt to be allocated")
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(1)  # nothing sent back yet: still in prefill
    sock.close()
    took = wait_released(mesh, base.in_use)
    print(f"prefill disconnect: blocks back to baseline in {took:.2f}s")
    # At most the prefill chunk in flight (256 tokens on a CPU), then the abort's step.
    assert took < 10.0


def test_disconnect_while_queued(mesh: Mesh) -> None:
    base = idle_pool(mesh)
    busy = {"model": MODEL, "messages": CAPITAL, "stream": True, "max_tokens": 400, "n": 2}
    busy["ignore_eos"] = True
    running = open_stream(mesh, busy)  # n=2 takes both of the executor's two slots
    read_until(running, b'"index":1', count=2)
    step = decode_step_seconds(running)
    queued = open_stream(mesh, {"model": MODEL, "messages": CAPITAL, "stream": True})
    wait_for(lambda: mesh.executor_info().num_waiting == 1, 30, "the request to be queued")
    assert pool(mesh).live_sequences == 2  # the queued one holds no block
    t0 = time.monotonic()
    queued.close()
    wait_for(lambda: mesh.executor_info().num_waiting == 0, 10, "the queued request to go", 0.02)
    gone = time.monotonic() - t0
    assert pool(mesh).live_sequences == 2
    running.close()
    took = wait_released(mesh, base.in_use)
    print(
        f"queued disconnect: dequeued in {gone:.2f}s; running disconnect: blocks back to "
        f"baseline in {took:.2f}s (step {step:.3f}s)"
    )
    assert gone < 3 * step + 1.0 and took < 3 * step + 1.0


# ----- operators ------------------------------------------------------------------------------


def test_kv_stats_cli_shows_the_expected_hit_rate(mesh: Mesh) -> None:
    """Four completions sharing a 64-token prefix (4 blocks) under their own cache_salt: the
    first misses, the other three hit exactly 64 tokens each."""
    salt = f"kv-stats-{uuid.uuid4().hex}"
    shared = list(range(1000, 1064))
    prompts = [shared + [3000 + 10 * i + j for j in range(10)] for i in range(4)]
    usages = []
    for prompt in prompts:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "cache_salt": salt}
        status, _, raw = post(mesh, "/v1/completions", body)
        assert status == 200, raw
        usages.append(json.loads(raw)["usage"])
    assert [u["prompt_tokens_details"]["cached_tokens"] for u in usages] == [0, 64, 64, 64]
    out = subprocess.run(
        [*KV_STATS, "--json", "--address", mesh.kv_address],
        cwd=REPO_ROOT,
        env=mesh.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    stats = json.loads(out.stdout)
    tenant = next(t for t in stats["tenants"] if t["cache_salt_id"] == salt_id(salt))
    since_start = next(w for w in tenant["windows"] if w["name"] == "since_start")["hits"]
    assert int(since_start["query_tokens"]) == 4 * 74
    assert int(since_start["hit_tokens"]) == 3 * 64
    assert since_start["token_hit_rate"] == pytest.approx(192 / 296)
    assert since_start["request_hit_rate"] == pytest.approx(3 / 4)
    # The human-readable table and the gateway's /metrics tell the same story.
    table = subprocess.run(
        [*KV_STATS, "--address", mesh.kv_address],
        cwd=REPO_ROOT,
        env=mesh.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "64.9%" in table
    conn = _conn(mesh)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    conn.close()
    # Counters (kvmanager's since-start figures, no request in between), the ratio left to
    # PromQL.
    overall = next(w for w in stats["windows"] if w["name"] == "since_start")["hits"]
    assert f"pagemesh_gateway_kv_hit_tokens_total {float(overall['hit_tokens'])}" in metrics
    assert f"pagemesh_gateway_kv_query_tokens_total {float(overall['query_tokens'])}" in metrics
    assert "hit_rate" not in metrics
    assert "pagemesh_gateway_kv_redis_connected 1.0" in metrics


# ----- the executor's own gRPC API ------------------------------------------------------------


def test_executor_generate_abort_and_info(mesh: Mesh) -> None:
    from pagemesh.proto import executor_pb2 as pb

    base = idle_pool(mesh)
    stub = mesh.executor_stub()
    info = stub.GetInfo(pb.GetInfoRequest(), timeout=5)
    assert info.block_size == 16 and info.num_blocks == base.num_blocks and info.model_path
    prompt = list(range(2000, 2040))
    params = pb.SamplingParams(n=1, temperature=0, max_tokens=3, ignore_eos=True)
    steps = list(
        stub.Generate(
            pb.GenerateRequest(request_id="e2e-g1", prompt_token_ids=prompt, params=params),
            timeout=60,
        )
    )
    assert all(len(s.outputs) == 1 and s.outputs[0].request_id == "e2e-g1" for s in steps)
    assert sum(len(s.outputs[0].token_ids) for s in steps) == 3
    assert steps[-1].outputs[0].finish_reason == pb.FINISH_LENGTH
    # Abort by id: the caller still gets its ABORT end, and the blocks go back.
    params.max_tokens = 500
    call = stub.Generate(
        pb.GenerateRequest(request_id="e2e-g2", prompt_token_ids=prompt, params=params), timeout=60
    )
    first = next(call)
    assert first.outputs[0].request_id == "e2e-g2"
    assert stub.Abort(pb.AbortRequest(request_ids=["e2e-g2"]), timeout=5).num_aborted == 1
    rest = list(call)
    assert rest and rest[-1].outputs[-1].finish_reason == pb.FINISH_ABORT
    wait_released(mesh, base.in_use)
    # Beam search (gRPC only): the n best beams come back whole, then the stream ends. (Width
    # 2: the mesh runs --max-num-seqs 2.)
    beams = pb.SamplingParams(n=2, use_beam_search=True, beam_width=2, max_tokens=3)
    steps = list(
        stub.Generate(
            pb.GenerateRequest(request_id="e2e-g3", prompt_token_ids=prompt, params=beams),
            timeout=60,
        )
    )
    final = [o for s in steps for o in s.outputs if o.finish_reason != pb.FINISH_NONE]
    assert sorted(o.index for o in final) == [0, 1]
    assert all(o.token_ids for o in final)
    wait_released(mesh, base.in_use)
