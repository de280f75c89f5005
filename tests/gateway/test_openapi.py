"""The OpenAPI document (services/gateway/openapi.py): valid OpenAPI 3.1, every route the app
serves is in it, its request schemas follow the gateway's limits, and the examples it calls
valid or invalid are what validation.py says they are."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest
import schemathesis
from aiohttp.test_utils import TestClient, TestServer
from pagemesh.services.gateway.app import GatewayConfig, create_app
from pagemesh.services.gateway.errors import APIError
from pagemesh.services.gateway.openapi import build_openapi
from pagemesh.services.gateway.validation import Limits, parse_chat, parse_completion

LIMITS = Limits()
DOC = build_openapi(LIMITS)


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(DOC)
    schema.validate()  # the OpenAPI 3.1 meta-schema
    for name, component in DOC["components"]["schemas"].items():
        # Each schema is valid JSON Schema 2020-12 (OpenAPI 3.1's dialect) and its refs resolve.
        jsonschema_rs.meta.validate(component)
        validator(name).is_valid({})
    # Every operation loads (refs resolved, parameters understood).
    labels = {op.ok().label for op in schema.get_all_operations()}
    assert "POST /v1/chat/completions" in labels and "GET /v1/models/{model}" in labels


def validator(name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}
    )


async def test_every_route_is_documented_and_the_document_is_served() -> None:
    app = create_app(GatewayConfig(executors=["127.0.0.1:1"], limits=Limits(max_n=3)))
    routes = {
        (r.method.lower(), r.resource.canonical.replace("{model:.+}", "{model}"))
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    documented = {(m, p) for p, ops in DOC["paths"].items() for m in ops}
    assert routes == documented
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/openapi.json")  # no key needed, like /health
        assert resp.status == 200 and resp.content_type == "application/json"
        served = await resp.json()
    # Built from this gateway's limits, not the defaults.
    n = served["components"]["schemas"]["ChatCompletionRequest"]["properties"]["n"]
    assert n["maximum"] == 3


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
COMPLETION = {"model": "m", "prompt": "hi"}


def accepted(parse: Any, body: dict[str, Any]) -> bool:
    try:
        parse(body, LIMITS)
    except APIError:
        return False
    return True


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"n": LIMITS.max_n, "max_tokens": None, "stop": ["a", "b"], "seed": -1},
        {"temperature": 2, "top_p": 0, "top_k": -1, "logit_bias": {"0": 100, "12": -100}},
        {"n": LIMITS.max_n + 1},
        {"temperature": 2.01},
        {"seed": 1 << 63},
        {"stop": ""},
        {"stop": ["x"] * (LIMITS.max_stop + 1)},
        {"logit_bias": {"07": 1}},
        {"logit_bias": {"1": 101}},
        {"max_completion_tokens": 0},
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "assistant"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"early_stopping": "sometimes", "use_beam_search": True},
        # null is "not set" for every field, length_penalty included (it was a 400 with beams).
        {"use_beam_search": True, "length_penalty": None, "beam_width": None},
        # JSON Schema's integers include 4.0; so do the gateway's (beam_width was the exception).
        {"use_beam_search": True, "beam_width": 4.0, "n": 2.0},
        {"use_beam_search": True, "beam_width": LIMITS.max_beam_width + 1},
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "text"}},
        {"top_logprobs": LIMITS.max_top_logprobs + 1, "logprobs": True},
    ],
)
def test_chat_schema_agrees_with_validation(extra: dict[str, Any]) -> None:
    """Where the document decides, it decides as the gateway does (both ways)."""
    body = {**CHAT, **extra}
    assert validator("ChatCompletionRequest").is_valid(body) == accepted(parse_chat, body)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"prompt": [1, 2, 3]},
        {"prompt": ["one"]},
        {"prompt": [[1, 2]]},
        {"prompt": [1.0, 2.0]},  # integers in JSON (they were a 400)
        {"prompt": [1.5]},
        {"prompt": ""},
        {"prompt": []},
        {"prompt": [-1]},
        {"prompt": ["a", "b"]},
        {"logprobs": 5, "echo": True},
        {"logprobs": 6},
        {"best_of": LIMITS.max_n + 1},
    ],
)
def test_completion_schema_agrees_with_validation(extra: dict[str, Any]) -> None:
    body = {**COMPLETION, **extra}
    assert validator("CompletionRequest").is_valid(body) == accepted(parse_completion, body)


def test_schemathesis_checks_each_streamed_event_against_the_document() -> None:
    """The stream's schema is what schemathesis validates every `data:` payload with: chunks as
    the formatter writes them pass, a chunk with a wrong type does not."""
    from pagemesh.services.gateway.responses import ChatFormatter, ResponseMeta
    from pagemesh.services.gateway.sse import DONE, encode_event
    from requests import Request
    from schemathesis.core.transport import Response

    operation = schemathesis.openapi.from_dict(DOC)["/v1/chat/completions"]["POST"]
    case = operation.Case(body=CHAT, media_type="application/json")
    chunks = ChatFormatter(ResponseMeta.new("chatcmpl", "m"), True, False).role_chunks(2)
    good = b"".join(encode_event(c) for c in chunks) + DONE
    chunks[1]["choices"][0]["index"] = "1"
    bad = b"".join(encode_event(c) for c in chunks) + DONE

    def check(raw: bytes) -> None:
        response = Response(
            status_code=200,
            headers={"content-type": ["text/event-stream; charset=utf-8"]},
            content=raw,
            request=Request("POST", "http://gateway/v1/chat/completions", json=CHAT).prepare(),
            elapsed=0.1,
            verify=True,
        )
        case.validate_response(response, checks=[schemathesis.checks.response_schema_conformance])

    check(good)
    with pytest.raises(BaseExceptionGroup) as info:
        check(bad)
    assert [f.title for f in info.value.exceptions] == ["SSE event violates schema"]
