"""OpenAI's documented API, to the letter, where the gateway alone decides it (the e2e file
tests/e2e/test_openai_api.py checks the same through a whole mesh and the official client)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pagemesh.services.gateway.app import GATEWAY, _stream
from pagemesh.services.gateway.chat import Tokenizer
from pagemesh.services.gateway.errors import APIError
from pagemesh.services.gateway.generation import ChoiceDelta, TokenInfo
from pagemesh.services.gateway.responses import (
    ChatFormatter,
    CompletionFormatter,
    ResponseMeta,
    TextOffsets,
    chat_logprobs,
    completion_logprobs,
)
from pagemesh.services.gateway.trace import RequestTimes
from pagemesh.services.gateway.validation import (
    GenerationOptions,
    Limits,
    check_context,
    check_logit_bias,
    parse_chat,
    parse_completion,
)

from tests.gateway.scripted_engine import ScriptedEngine
from tests.gateway.test_service import AUTH, mesh  # noqa: F401  (the scripted mesh fixture)

LIMITS = Limits()


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}


def refusal(body: dict[str, Any], completion: bool = False) -> APIError:
    with pytest.raises(APIError) as info:
        (parse_completion if completion else parse_chat)(body, LIMITS)
    assert info.value.status == 400
    return info.value


# Item 1. OpenAI and vLLM take `seed` as a signed 64-bit integer (vLLM: ge=-2**63, le=2**63-1).
@pytest.mark.parametrize("seed", [-(1 << 63), (1 << 63) - 1, 0, -1])
def test_seed_in_int64_is_taken(seed: int) -> None:
    assert parse_chat(chat(seed=seed), LIMITS).options.seed == seed & ((1 << 64) - 1)


@pytest.mark.parametrize("seed", [1 << 63, (1 << 64) - 1, -(1 << 63) - 1, 1 << 70])
def test_seed_beyond_int64_is_a_400_naming_seed(seed: int) -> None:
    assert refusal(chat(seed=seed)).param == "seed"
    assert refusal({"model": "m", "prompt": "hi", "seed": seed}, completion=True).param == "seed"


# Item 2. A bad logit_bias is a 400 whose `param` is "logit_bias"; every bad id is named.
def test_logit_bias_past_the_vocabulary_names_every_bad_id() -> None:
    options = GenerationOptions(logit_bias={5: 1.0, 1000: 2.0, 70000: -1.0, 99: 0.0})
    with pytest.raises(APIError) as info:
        check_logit_bias(options, vocab_size=100)
    err = info.value
    assert err.status == 400 and err.param == "logit_bias"
    assert "1000" in err.message and "70000" in err.message
    check_logit_bias(GenerationOptions(logit_bias={0: 1.0, 99: 1.0}), vocab_size=100)


# Item 7. OpenAI: "max_tokens ... This value is now deprecated in favor of max_completion_tokens".
# With both, max_completion_tokens is the bound; each is still checked as an integer >= 1.
def test_max_completion_tokens_takes_precedence_over_max_tokens() -> None:
    o = parse_chat(chat(max_tokens=50, max_completion_tokens=7), LIMITS).options
    assert o.max_tokens == 7 and o.max_tokens_param == "max_completion_tokens"
    o = parse_chat(chat(max_tokens=50), LIMITS).options
    assert o.max_tokens == 50 and o.max_tokens_param == "max_tokens"
    assert refusal(chat(max_tokens="x", max_completion_tokens=7)).param == "max_tokens"
    # The context's 400 names the parameter the bound came from.
    o = parse_chat(chat(max_completion_tokens=95), LIMITS).options
    with pytest.raises(APIError) as info:
        check_context(o, 10, 100)
    assert info.value.param == "max_completion_tokens"


# Item 8. Request-level `priority` and `timeout` are not honoured: refused, never ignored.
@pytest.mark.parametrize("name", ["priority", "timeout"])
def test_priority_and_timeout_are_refused_naming_the_parameter(name: str) -> None:
    assert refusal(chat(**{name: 1})).param == name
    assert refusal({"model": "m", "prompt": "hi", name: 1}, completion=True).param == name


# Item 4. OpenAI ends every stream with `data: [DONE]`, one that ends in an error event too.
class _FailingGeneration:
    n = 1

    async def steps(self) -> AsyncIterator[list[Any]]:
        raise APIError("boom", status=500, type="server_error")
        yield []  # an async generator


@pytest.fixture
async def failing_stream() -> AsyncIterator[TestClient]:
    async def handler(request: web.Request) -> web.StreamResponse:
        fmt = ChatFormatter(ResponseMeta.new("chatcmpl", "m"), False, False)
        return await _stream(request, _FailingGeneration(), [], fmt, RequestTimes())  # type: ignore[arg-type]

    app = web.Application()
    app.router.add_get("/", handler)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_a_stream_ending_in_an_error_still_sends_done(failing_stream: TestClient) -> None:
    body = await (await failing_stream.get("/")).read()
    frames = body.split(b"\n\n")
    assert frames[-2:] == [b"data: [DONE]", b""]
    assert b'"error"' in frames[-3] and b'"boom"' in frames[-3]


# Item 6. 429 and 503 say when to retry (Retry-After), which the official clients honour.
@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_on_429_and_503(status: int) -> None:
    assert int(APIError("later", status=status).response().headers["Retry-After"]) >= 1
    assert "Retry-After" not in APIError("bad").response().headers


async def test_http_surface(mesh: tuple[TestClient, ScriptedEngine]) -> None:  # noqa: F811
    client, _ = mesh
    body = {"model": "smol", "messages": [{"role": "user", "content": "q"}]}
    # Item 3: a body declared as a form is a 415 with OpenAI's error object.
    resp = await client.post(
        "/v1/chat/completions",
        data=json.dumps(body),
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status == 415
    assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}
    # Item 5: GET /v1/models/{model}: the model object, or OpenAI's 404 model_not_found.
    resp = await client.get("/v1/models/smol", headers=AUTH)
    assert resp.status == 200
    obj = await resp.json()
    assert obj["id"] == "smol" and obj["object"] == "model" and "created" in obj
    resp = await client.get("/v1/models/nope", headers=AUTH)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    # Item 6: a 429 for too many in flight carries Retry-After.
    client.server.app[GATEWAY].config.max_concurrent = 0
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status == 429 and resp.headers["Retry-After"]


def infos(tokenizer: Tokenizer, text: str) -> list[TokenInfo]:
    """The TokenInfos Generation makes for `text`'s tokens (logprobs made up, no top)."""
    return [
        TokenInfo(tokenizer.token_text(i), -0.5, [], tokenizer.token_bytes(i))
        for i in tokenizer.encode(text)
    ]


# Item 9. Completions `logprobs: 0`: each top_logprobs entry still holds the sampled token's own
# logprob (OpenAI and vLLM), never an empty object.
def test_completion_logprobs_zero_has_the_sampled_token(tokenizer: Tokenizer) -> None:
    tokens = infos(tokenizer, "Paris is")
    lp = completion_logprobs(tokens, TextOffsets(0), len("Paris is"))
    assert lp["top_logprobs"] == [{t.token: -0.5} for t in tokens]


# Item 10. Completions `text_offset` counts characters of the returned text: "🐵🐵" is two
# characters over six tokens, and no offset runs past the text's end.
def test_text_offset_counts_characters(tokenizer: Tokenizer) -> None:
    tokens = infos(tokenizer, "🐵🐵")
    assert len(tokens) == 6  # three byte-level tokens per emoji
    lp = completion_logprobs(tokens, TextOffsets(0), 2)
    assert lp["text_offset"] == [0, 0, 0, 1, 1, 1]
    # With an echo, offsets start after it; streamed in pieces, they are the same.
    fmt = CompletionFormatter(ResponseMeta.new("cmpl", "m"), False, True, "ab")
    streamed: list[int] = []
    for k, text in [(0, ""), (1, ""), (2, "🐵"), (3, ""), (4, ""), (5, "🐵")]:
        (chunk,) = fmt.delta_chunks(ChoiceDelta(0, text, None, [tokens[k]]))
        streamed += chunk["choices"][0]["logprobs"]["text_offset"]
    assert streamed == [2, 2, 2, 3, 3, 3]


# Item 11. Chat logprobs `bytes`: "A list of integers representing the UTF-8 bytes
# representation of the token. Useful in instances where characters are represented by multiple
# tokens and their byte representations must be combined to generate the correct text
# representation." So each token's bytes are its own and concatenated they rebuild the text.
def test_chat_logprob_bytes_are_each_tokens_own(tokenizer: Tokenizer) -> None:
    text = "Hi 🐵 é!"
    content = chat_logprobs(infos(tokenizer, text))["content"]
    assert bytes(b for entry in content for b in entry["bytes"]).decode() == text
    # A token that is part of a character shows those bytes escaped (as OpenAI shows such
    # tokens), never U+FFFD; whole characters are plain text.
    assert [(e["token"], e["bytes"]) for e in content] == [
        ("Hi", [72, 105]),
        (" \\xf0\\x9f", [32, 240, 159]),
        ("\\x90", [144]),
        ("\\xb5", [181]),
        (" é", [32, 195, 169]),
        ("!", [33]),
    ]
