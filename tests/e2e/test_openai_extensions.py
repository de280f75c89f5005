"""Prompt logprobs through a whole mesh (SmolLM2 on the CPU): completions' `echo` with
`logprobs`, and vLLM's extensions that evaluation tools use (`prompt_logprobs`,
`return_tokens_as_token_ids`, `stream_options.continuous_usage_stats`). The official openai
client where the SDK exposes the behaviour (extensions ride in `extra_body` and come back as
extra fields), raw HTTP where it does not."""

from __future__ import annotations

import json
import math

import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.test_mesh import client, post
from tests.support.mesh import Mesh

PROMPT = "The capital of France is Paris. The capital of Italy is"


def _echo(mesh: Mesh, **kw):
    return client(mesh).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, **kw
    )


# OpenAI's legacy completions: `echo` "Echo back the prompt in addition to the completion"; with
# `logprobs`, the prompt's tokens are part of the returned text and get their logprobs too, the
# first one null (nothing precedes it), as the legacy API and vLLM return them.
def test_echo_with_logprobs_scores_the_prompt(mesh: Mesh) -> None:
    out = _echo(mesh, logprobs=2)
    plain = client(mesh).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2
    )
    choice = out.choices[0]
    n_prompt = out.usage.prompt_tokens
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert choice.text == PROMPT + plain.choices[0].text
    gen = plain.choices[0].logprobs
    assert gen is not None and gen.tokens is not None
    assert len(lp.tokens) == n_prompt + len(gen.tokens)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    # The prompt's tokens, as text, rebuild the prompt; the completion's follow unchanged.
    assert "".join(lp.tokens[:n_prompt]) == PROMPT
    assert lp.tokens[n_prompt:] == gen.tokens
    for a, b in zip(lp.token_logprobs[n_prompt:], gen.token_logprobs or [], strict=True):
        assert abs(a - b) < 1e-4
    # Each prompt position after the first: its own token and up to 2 alternatives.
    for token, logprob, top in zip(
        lp.tokens[1:n_prompt],
        lp.token_logprobs[1:n_prompt],
        lp.top_logprobs[1:n_prompt],
        strict=True,
    ):
        assert top[token] == logprob and 1 <= len(top) <= 3
    # text_offset: characters of the returned text, from 0, never past its end.
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert lp.text_offset[n_prompt] == len(PROMPT)
    assert max(lp.text_offset) < len(choice.text)
    # A prompt that scores this well against its own continuation: " Rome" is likely.
    assert math.exp(max(lp.token_logprobs[1:n_prompt])) > 0.1


def test_echo_with_logprobs_streamed_equals_whole(mesh: Mesh) -> None:
    whole = _echo(mesh, logprobs=1).choices[0].logprobs
    tokens: list[str] = []
    logprobs: list[float | None] = []
    text = ""
    for chunk in client(mesh).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, echo=True, logprobs=1, stream=True
    ):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens.extend(c.logprobs.tokens or [])
                logprobs.extend(c.logprobs.token_logprobs or [])
    assert whole is not None and text.startswith(PROMPT)
    assert tokens == whole.tokens
    assert logprobs[0] is None
    for a, b in zip(logprobs[1:], (whole.token_logprobs or [])[1:], strict=True):
        assert a is not None and b is not None and abs(a - b) < 1e-4


# vLLM's `prompt_logprobs`: per prompt token after the first, a map from token id to
# {logprob, rank, decoded_token}, the prompt's own token always among them; null first.
def test_prompt_logprobs_field(mesh: Mesh) -> None:
    out = client(mesh).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 3}
    )
    echo = _echo(mesh, logprobs=0).choices[0].logprobs
    assert echo is not None and echo.token_logprobs is not None
    choice = out.choices[0].model_dump()
    plp = choice["prompt_logprobs"]
    assert len(plp) == out.usage.prompt_tokens and plp[0] is None
    for j, entry in enumerate(plp[1:], 1):
        own = [v for v in entry.values() if v["decoded_token"] == echo.tokens[j]]
        assert own, (j, entry)
        assert abs(own[0]["logprob"] - echo.token_logprobs[j]) < 1e-4
        ranks = sorted(v["rank"] for v in entry.values())
        assert ranks[:3] == [1, 2, 3] and own[0]["rank"] >= 1
        assert len(entry) in (3, 4)  # the top 3, and the prompt's token when not among them
    # Chat carries it at the top level, as vLLM does.
    chat = client(mesh).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        extra_body={"prompt_logprobs": 0},
    )
    body = chat.model_dump()
    assert body["prompt_logprobs"][0] is None
    assert len(body["prompt_logprobs"]) == chat.usage.prompt_tokens
    assert all(len(e) == 1 for e in body["prompt_logprobs"][1:])


def test_prompt_logprobs_refused_on_a_stream_and_bounded(mesh: Mesh) -> None:
    for extra, param in (
        ({"stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": "x"}, "prompt_logprobs"),
    ):
        status, _, raw = post(
            mesh, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, **extra}
        )
        assert status == 400, raw
        assert json.loads(raw)["error"]["param"] == param


# vLLM's `return_tokens_as_token_ids`: every token string in logprobs is "token_id:<id>".
def test_return_tokens_as_token_ids(mesh: Mesh) -> None:
    c = client(mesh)
    chat = c.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi."}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"return_tokens_as_token_ids": True},
    )
    content = chat.choices[0].logprobs.content
    assert content
    for t in content:
        assert t.token.startswith("token_id:") and int(t.token.split(":")[1]) >= 0
        assert all(a.token.startswith("token_id:") for a in t.top_logprobs)
    # bytes stay the token's own: the text still rebuilds from them.
    raw = bytes(b for t in content for b in (t.bytes or []))
    assert raw.decode("utf-8", errors="ignore") == chat.choices[0].message.content
    comp = c.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=3,
        temperature=0,
        logprobs=1,
        echo=True,
        extra_body={"return_tokens_as_token_ids": True},
    )
    lp = comp.choices[0].logprobs
    assert lp is not None and lp.tokens
    assert all(t.startswith("token_id:") for t in lp.tokens)
    assert all(k.startswith("token_id:") for top in lp.top_logprobs[1:] for k in top)


# vLLM's `stream_options.continuous_usage_stats`: every chunk carries the usage so far.
def test_continuous_usage_stats(mesh: Mesh) -> None:
    stream = client(mesh).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    )
    seen = []
    for chunk in stream:
        assert chunk.usage is not None, chunk
        seen.append(chunk.usage)
    assert len(seen) >= 3
    completions = [u.completion_tokens for u in seen]
    assert completions == sorted(completions) and completions[-1] == 8
    assert {u.prompt_tokens for u in seen} == {seen[-1].prompt_tokens}
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in seen)


@pytest.mark.parametrize("value", ["yes", 1])
def test_continuous_usage_stats_must_be_a_boolean(mesh: Mesh, value: object) -> None:
    status, _, raw = post(
        mesh,
        "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "stream_options": {"continuous_usage_stats": value},
        },
    )
    assert status == 400
    assert json.loads(raw)["error"]["param"] == "stream_options.continuous_usage_stats"
