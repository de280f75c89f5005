"""OpenAI's documented API, to the letter, through a whole mesh (SmolLM2 on the CPU): the
official openai client where the SDK exposes the behaviour, raw HTTP where it does not."""

from __future__ import annotations

import http.client
import json
from typing import Any

import openai
import pytest

from tests.e2e.conftest import API_KEY, MODEL
from tests.e2e.test_mesh import client, post
from tests.support.mesh import Mesh

HI = [{"role": "user", "content": "Say hi."}]
VOCAB = 49152  # SmolLM2's


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict)
    # The SDK hands over the `error` object itself.
    return body.get("error", body)  # type: ignore[no-any-return]


# Item 1. seed: "integer or null" - a signed 64-bit integer at OpenAI and vLLM; past it, a 400.
def test_seed_bounded_to_int64(mesh: Mesh) -> None:
    c = client(mesh)
    ok = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, seed=(1 << 63) - 1)
    assert ok.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, seed=1 << 63)
    assert error_of(info.value)["param"] == "seed"


# Item 2. logit_bias "Accepts a JSON object that maps tokens (specified by their token ID in the
# tokenizer) to an associated bias value": ids outside the vocabulary are a 400 naming each.
def test_logit_bias_outside_the_vocabulary_names_every_id(mesh: Mesh) -> None:
    bias = {"5": 1, str(VOCAB): 1, str(VOCAB + 7): -1}
    with pytest.raises(openai.BadRequestError) as info:
        client(mesh).chat.completions.create(
            model=MODEL, messages=HI, max_tokens=2, logit_bias=bias
        )
    err = error_of(info.value)
    assert err["param"] == "logit_bias"
    assert str(VOCAB) in err["message"] and str(VOCAB + 7) in err["message"]


# Item 3. The API takes JSON bodies ("Content-Type: application/json"); a form is a 415 with an
# OpenAI-style error object (vLLM answers so too).
def test_a_form_body_is_a_415(mesh: Mesh) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", mesh.gateway_port, timeout=60)
    try:
        body = json.dumps({"model": MODEL, "messages": HI})
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={
                "Authorization": f"Bearer {API_KEY}",
                "Content-Type": "application/x-www-form-urlencoded",
            },
        )
        resp = conn.getresponse()
        status, raw = resp.status, resp.read()
    finally:
        conn.close()
    assert status == 415
    err = json.loads(raw)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


# Item 5. "Retrieve model: Retrieves a model instance" - the model object; an unknown id is 404.
def test_retrieve_model(mesh: Mesh) -> None:
    c = client(mesh)
    model = c.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by
    assert isinstance(model.created, int)
    with pytest.raises(openai.NotFoundError) as info:
        c.models.retrieve("no-such-model")
    assert error_of(info.value)["code"] == "model_not_found"


# Item 7. max_tokens "is now deprecated in favor of max_completion_tokens": with both, the
# latter bounds the completion.
def test_max_completion_tokens_takes_precedence(mesh: Mesh) -> None:
    out = client(mesh).chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=20,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage is not None and out.usage.completion_tokens == 3
    assert out.choices[0].finish_reason == "length"


# Item 8. Request-level priority/timeout are not honoured: a 400 naming it, never ignored.
@pytest.mark.parametrize("name", ["priority", "timeout"])
def test_priority_and_timeout_are_refused(mesh: Mesh, name: str) -> None:
    status, _, raw = post(mesh, "/v1/chat/completions", {"model": MODEL, "messages": HI, name: 5})
    assert status == 400
    assert json.loads(raw)["error"]["param"] == name


# Item 9. Completions logprobs: 0 - each position's top_logprobs entry holds the sampled token
# and its logprob (OpenAI and vLLM), not an empty object.
def test_completion_logprobs_zero(mesh: Mesh) -> None:
    out = client(mesh).completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=0
    )
    lp = out.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top == {token: logprob}


EMOJI = [{"role": "user", "content": "Reply with two monkey emojis 🐵🐵 and nothing else."}]


# Item 10. text_offset counts characters of the returned text and never runs past its end.
def test_completion_text_offsets_within_the_text(mesh: Mesh) -> None:
    out = client(mesh).completions.create(
        model=MODEL, prompt="Monkeys: 🐵🐵🐵 and more 🐵", max_tokens=12, temperature=0, logprobs=1
    )
    text = out.choices[0].text
    lp = out.choices[0].logprobs
    assert lp is not None and lp.text_offset
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert all(o < max(len(text), 1) for o in lp.text_offset)


# Item 11. Chat logprobs `bytes` are each token's own: concatenated, they rebuild the content.
def test_chat_logprob_bytes_rebuild_the_text(mesh: Mesh) -> None:
    out = client(mesh).chat.completions.create(
        model=MODEL, messages=EMOJI, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = out.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    raw = bytes(b for t in choice.logprobs.content for b in (t.bytes or []))
    assert raw.decode("utf-8", errors="ignore").startswith(choice.message.content or "")
    for t in choice.logprobs.content:
        assert "\ufffd" not in t.token
