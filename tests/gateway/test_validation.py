"""The validation matrix: every malformed request is a 400 naming its parameter, and a good one
parses into the options the executor gets."""

from __future__ import annotations

from typing import Any

import pytest
from pagemesh.services.gateway.errors import APIError
from pagemesh.services.gateway.validation import (
    GenerationOptions,
    Limits,
    check_context,
    parse_chat,
    parse_completion,
    parse_json,
)

LIMITS = Limits(max_n=4)
MSG = [{"role": "user", "content": "hi"}]


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, **extra}


def test_good_chat_request_maps_every_parameter() -> None:
    req = parse_chat(
        chat(
            max_completion_tokens=7,
            temperature=0.5,
            top_p=0.9,
            n=2,
            stop="\n",
            seed=-1,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            logprobs=True,
            top_logprobs=3,
            user="u",
            top_k=40,
            min_p=0.05,
            cache_salt="tenant-a",
            ignore_eos=True,
            stream=True,
            stream_options={"include_usage": True},
        ),
        LIMITS,
    )
    o = req.options
    assert (o.max_tokens, o.temperature, o.top_p, o.n, o.stop) == (7, 0.5, 0.9, 2, ["\n"])
    assert o.seed == (1 << 64) - 1  # the caller's bits, as the uint64 the executor takes
    assert (o.presence_penalty, o.frequency_penalty) == (0.5, -0.5)
    assert (o.logprobs, o.top_logprobs, o.user, o.top_k, o.min_p) == (True, 3, "u", 40, 0.05)
    assert (o.cache_salt, o.ignore_eos, req.stream, req.include_usage) == (
        "tenant-a",
        True,
        True,
        True,
    )


def test_defaults() -> None:
    req = parse_chat(chat(), LIMITS)
    assert req.options == GenerationOptions()
    assert (req.stream, req.include_usage) == (False, False)


def test_max_tokens_alias_and_content_parts_and_developer_role() -> None:
    req = parse_chat(
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None},
            ],
        },
        LIMITS,
    )
    assert req.options.max_tokens == 5
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


BAD_CHAT: list[tuple[str, dict[str, Any], str | None]] = [
    ("no model", {"messages": MSG}, "model"),
    ("model not a string", chat(model=3), "model"),
    ("no messages", {"model": "m"}, "messages"),
    ("messages not a list", {"model": "m", "messages": "hi"}, "messages"),
    ("empty messages", {"model": "m", "messages": []}, "messages"),
    ("message not an object", {"model": "m", "messages": ["hi"]}, "messages[0]"),
    (
        "unknown role",
        {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
        "messages[0].role",
    ),
    (
        "role not a string",
        {"model": "m", "messages": [{"role": 1, "content": "x"}]},
        "messages[0].role",
    ),
    ("content missing", {"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    (
        "content wrong type",
        {"model": "m", "messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
    ),
    (
        "image part",
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0]",
    ),
    ("temperature string", chat(temperature="hot"), "temperature"),
    ("temperature too high", chat(temperature=2.5), "temperature"),
    ("temperature bool", chat(temperature=True), "temperature"),
    ("top_p > 1", chat(top_p=1.5), "top_p"),
    ("n too large", chat(n=5), "n"),
    ("n zero", chat(n=0), "n"),
    ("n float", chat(n=1.5), "n"),
    ("max_tokens zero", chat(max_tokens=0), "max_tokens"),
    ("max_tokens negative", chat(max_tokens=-3), "max_tokens"),
    ("max_tokens huge", chat(max_tokens=10**12), "max_tokens"),
    ("max_tokens string", chat(max_tokens="10"), "max_tokens"),
    ("max_completion_tokens zero", chat(max_completion_tokens=0), "max_completion_tokens"),
    ("stop wrong type", chat(stop=5), "stop"),
    ("stop too many", chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    ("stop empty string", chat(stop=[""]), "stop"),
    ("presence_penalty out of range", chat(presence_penalty=3), "presence_penalty"),
    ("frequency_penalty wrong type", chat(frequency_penalty=[1]), "frequency_penalty"),
    ("seed string", chat(seed="x"), "seed"),
    ("logprobs not bool", chat(logprobs=1), "logprobs"),
    ("top_logprobs without logprobs", chat(top_logprobs=2), "top_logprobs"),
    ("top_logprobs too many", chat(logprobs=True, top_logprobs=50), "top_logprobs"),
    ("stream not bool", chat(stream="yes"), "stream"),
    (
        "stream_options without stream",
        chat(stream_options={"include_usage": True}),
        "stream_options",
    ),
    (
        "include_usage not bool",
        chat(stream=True, stream_options={"include_usage": 1}),
        "stream_options.include_usage",
    ),
    ("top_k below -1", chat(top_k=-2), "top_k"),
    ("min_p > 1", chat(min_p=2), "min_p"),
    ("ignore_eos not bool", chat(ignore_eos="no"), "ignore_eos"),
    ("cache_salt not a string", chat(cache_salt=1), "cache_salt"),
    ("user not a string", chat(user=1), "user"),
    ("tool without a function", chat(tools=[{"type": "function"}]), "tools[0].function"),
    ("functions (deprecated)", chat(functions=[{"name": "f"}]), "functions"),
    ("response_format unknown", chat(response_format={"type": "yaml"}), "response_format.type"),
    ("response_format not an object", chat(response_format="json"), "response_format"),
    ("logit_bias not an object", chat(logit_bias=[1, 2]), "logit_bias"),
    ("logit_bias key not an id", chat(logit_bias={"hello": 1}), "logit_bias"),
    ("logit_bias negative id", chat(logit_bias={"-3": 1}), "logit_bias"),
    ("logit_bias value too big", chat(logit_bias={"3": 101}), "logit_bias"),
    ("logit_bias value a string", chat(logit_bias={"3": "1"}), "logit_bias"),
    ("logit_bias too many", chat(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias"),
    (
        "logit_bias with beam search",
        chat(use_beam_search=True, n=2, temperature=0, logit_bias={"3": 1}),
        "logit_bias",
    ),
    ("nan temperature", chat(temperature=float("nan")), "temperature"),
]


@pytest.mark.parametrize(("case", "body", "param"), BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
def test_bad_chat_request_is_a_400_naming_the_parameter(
    case: str, body: dict[str, Any], param: str | None
) -> None:
    with pytest.raises(APIError) as info:
        parse_chat(body, LIMITS)
    err = info.value
    assert err.status == 400
    body_out = err.body()["error"]
    assert set(body_out) == {"message", "type", "param", "code"}
    assert body_out["type"] == "invalid_request_error"
    assert body_out["param"] == param
    assert body_out["message"]


@pytest.mark.parametrize("raw", [b"{", b"not json", b"\xff\xfe", b"[1, 2]", b'"s"', b""])
def test_malformed_json(raw: bytes) -> None:
    with pytest.raises(APIError) as info:
        parse_json(raw)
    assert info.value.status == 400 and info.value.code == "invalid_json"


# Found by the schemathesis run's manual follow-up: a lone surrogate escape reached the tokenizer
# (chat, prompt) or the UTF-8 encoder (cache_salt) and came back as a 500.
@pytest.mark.parametrize(
    "raw",
    [
        rb'{"model": "m", "prompt": "\ud800"}',
        rb'{"model": "m", "messages": [{"role": "user", "content": "a\uDFFFb"}]}',
        rb'{"model": "m", "prompt": "hi", "cache_salt": "\udbff"}',
        rb'{"model": "m", "prompt": "hi", "logit_bias": {"\ud834": 1}}',
    ],
)
def test_lone_surrogates_are_invalid_json(raw: bytes) -> None:
    with pytest.raises(APIError) as info:
        parse_json(raw)
    assert info.value.status == 400 and info.value.code == "invalid_json"


def test_surrogate_pairs_are_characters() -> None:
    assert parse_json(rb'{"prompt": "\ud83d\ude00 \u00e9"}')["prompt"] == "\U0001f600 \u00e9"


def test_completion_prompt_forms() -> None:
    assert parse_completion({"model": "m", "prompt": "hi"}, LIMITS).prompt == "hi"
    assert parse_completion({"model": "m", "prompt": ["hi"]}, LIMITS).prompt == "hi"
    assert parse_completion({"model": "m", "prompt": [1, 2]}, LIMITS).prompt == [1, 2]
    assert parse_completion({"model": "m", "prompt": [[1, 2]]}, LIMITS).prompt == [1, 2]
    req = parse_completion({"model": "m", "prompt": "x", "logprobs": 2, "echo": True}, LIMITS)
    assert (req.options.logprobs, req.options.top_logprobs, req.echo) == (True, 2, True)


@pytest.mark.parametrize("prompt", [None, "", 5, [], ["a", "b"], [1, -1], [True], [1.5], {"a": 1}])
def test_bad_completion_prompt(prompt: Any) -> None:
    body = {"model": "m"} if prompt is None else {"model": "m", "prompt": prompt}
    with pytest.raises(APIError) as info:
        parse_completion(body, LIMITS)
    assert info.value.param == "prompt"


def test_completion_logprobs_bounded_at_5() -> None:
    with pytest.raises(APIError) as info:
        parse_completion({"model": "m", "prompt": "x", "logprobs": 6}, LIMITS)
    assert info.value.param == "logprobs"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3, "n": 2}, "best_of"),
        ({"best_of": 0}, "best_of"),
    ],
)
def test_completion_options_not_served_are_refused(extra: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_completion({"model": "m", "prompt": "x", **extra}, LIMITS)
    assert info.value.param == param


def test_completion_best_of_equal_to_n_and_empty_suffix_pass() -> None:
    req = parse_completion(
        {"model": "m", "prompt": "x", "n": 2, "best_of": 2, "suffix": ""}, LIMITS
    )
    assert req.options.n == 2


def test_context_checks() -> None:
    assert check_context(GenerationOptions(), 10, 100) == 90  # default: what fits
    assert check_context(GenerationOptions(max_tokens=90), 10, 100) == 90
    with pytest.raises(APIError) as info:
        check_context(GenerationOptions(max_tokens=91), 10, 100)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"
    with pytest.raises(APIError) as info:
        check_context(GenerationOptions(), 100, 100)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    # A KV pool smaller than the context bounds it too.
    assert check_context(GenerationOptions(), 10, 100, capacity=64) == 54
    with pytest.raises(APIError):
        check_context(GenerationOptions(max_tokens=60), 10, 100, capacity=64)


def test_logit_bias_is_parsed() -> None:
    req = parse_chat(chat(logit_bias={"50256": -100, "7": 2.5, " 9": 0}), LIMITS)
    assert req.options.logit_bias == {50256: -100.0, 7: 2.5, 9: 0.0}
    assert parse_chat(chat(), LIMITS).options.logit_bias == {}


def test_response_format_text_is_accepted() -> None:
    """Text is what the server makes anyway: asking for it is no error."""
    req = parse_chat(chat(response_format={"type": "text"}), LIMITS)
    assert req.messages == parse_chat(chat(), LIMITS).messages
