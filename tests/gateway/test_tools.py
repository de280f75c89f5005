"""The gateway's structured-output and tool-calling pieces on their own: request validation
(a 400 naming the parameter), the guides sent to the executor, the conversation's tool turns,
the tool-call parsers and the streamer that turns text deltas into OpenAI's tool-call deltas."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.gateway.errors import APIError
from pagemesh.services.gateway.tool_parsers import (
    ToolStreamer,
    constrained_calls,
    parse_calls,
    parser_for_template,
)
from pagemesh.services.gateway.tools import prepare_messages
from pagemesh.services.gateway.validation import Limits, parse_chat, parse_completion

FN = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
MSGS = [{"role": "user", "content": "hi"}]


def chat(**body: Any):
    return parse_chat({"model": "m", "messages": MSGS, **body}, Limits())


def param_of(**body: Any) -> str | None:
    with pytest.raises(APIError) as info:
        chat(**body)
    assert info.value.status == 400
    return info.value.param


def test_response_format_and_extensions_become_guides() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    g = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    ).options.guide
    assert g is not None and g.kind == pb.GUIDE_JSON_SCHEMA and json.loads(g.spec) == schema
    assert chat(response_format={"type": "json_object"}).options.guide.kind == pb.GUIDE_JSON_OBJECT
    assert chat(response_format={"type": "text"}).options.guide is None
    assert chat(structured_outputs={"regex": "a+"}).options.guide.kind == pb.GUIDE_REGEX
    assert chat(guided_choice=["a", "b"]).options.guide.kind == pb.GUIDE_CHOICE
    assert chat(guided_grammar='root ::= "a"').options.guide.kind == pb.GUIDE_GRAMMAR
    assert chat(guided_json=json.dumps(schema)).options.guide.spec == json.dumps(schema)
    c = parse_completion(
        {"model": "m", "prompt": "x", "response_format": {"type": "json_object"}}, Limits()
    )
    assert c.options.guide is not None


def test_bad_structured_input_names_the_parameter() -> None:
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    assert param_of(response_format=bad_schema) == "response_format.json_schema.schema"
    assert param_of(response_format={"type": "json_schema"}) == "response_format.json_schema"
    assert param_of(response_format={"type": "yaml"}) == "response_format.type"
    assert param_of(structured_outputs={"regex": "a", "choice": ["b"]}) == "structured_outputs"
    assert param_of(guided_choice=[]) == "guided_choice"
    assert param_of(guided_regex="a", guided_choice=["b"]) == "guided_choice"
    assert (
        param_of(response_format={"type": "json_object"}, use_beam_search=True, n=2, temperature=0)
        == "response_format"
    )


def test_tools_validation() -> None:
    assert param_of(tools=[{"type": "function", "function": {}}]) == "tools[0].function.name"
    assert param_of(tools=[FN, FN]) == "tools"
    named = {"type": "function", "function": {"name": "other"}}
    assert param_of(tools=[FN], tool_choice=named) == "tool_choice"
    assert param_of(tool_choice="required") == "tool_choice"
    assert param_of(tools=[FN], use_beam_search=True, n=2, temperature=0) == "tools"
    assert param_of(tools=[FN], tool_choice="sometimes") == "tool_choice"
    assert (
        param_of(tools=[FN], tool_choice="required", response_format={"type": "json_object"})
        == "tool_choice"
    )
    bad_call = {
        "role": "assistant",
        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{"}}],
    }
    assert param_of(messages=[*MSGS, bad_call]) == "messages[1].tool_calls[0].function.arguments"
    assert (
        param_of(messages=[*MSGS, {"role": "tool", "content": "x"}]) == "messages[1].tool_call_id"
    )


def test_tool_choice_guides() -> None:
    assert chat(tools=[FN]).options.guide is None  # auto: parsed, not constrained
    named = chat(tools=[FN], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.options.guide.spec) == FN["function"]["parameters"]
    required = chat(tools=[FN], tool_choice="required", parallel_tool_calls=False)
    spec = json.loads(required.options.guide.spec)
    assert spec["type"] == "array" and spec["maxItems"] == 1 and spec["minItems"] == 1
    assert required.options.guide.param == "tool_choice"


def test_tool_turns_for_a_template_without_tools() -> None:
    req = chat(
        tools=[FN],
        messages=[
            *MSGS,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    )
    msgs, tools = prepare_messages(req.messages, req.tools, "{{ message['content'] }}")
    assert tools is None and msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"]
    assert (
        msgs[2]["content"]
        == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )
    assert msgs[3] == {"role": "tool", "content": "sunny"}
    # A template that renders tools and calls itself gets them as they are.
    msgs, tools = prepare_messages(
        req.messages, req.tools, "{% for t in tools %}{{ m.tool_calls }}"
    )
    assert tools == req.tools.tools and msgs[1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris"
    }


def test_parsers() -> None:
    assert parser_for_template("... <tool_call> ...") == "hermes"
    assert parser_for_template("[TOOL_CALLS] ...") == "mistral"
    assert parser_for_template("<|python_tag|> ipython") == "llama3_json"
    assert parser_for_template("[TOOL_CALLS]", override="hermes") == "hermes"
    content, calls = parse_calls(
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {}}</tool_call>',
    )
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("a", {"x": 1}),
        ("b", {}),
    ]
    assert parse_calls("hermes", "<tool_call>not json</tool_call>") == (
        "<tool_call>not json</tool_call>",
        [],
    )
    _, calls = parse_calls(
        "llama3_json", '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}}'
    )
    assert [c.name for c in calls] == ["a", "b"]
    assert parse_calls("llama3_json", "Paris.") == ("Paris.", [])
    _, calls = parse_calls("mistral", '[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}]')
    assert calls[0].name == "a" and json.loads(calls[0].arguments) == {"x": 1}
    cut = '[{"name": "a", "arguments": {"x": 1}}, {"name": "a", "argu'
    assert [c.arguments for c in constrained_calls("required", "", cut)] == ['{"x": 1}']


def _assemble(deltas: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str, str]]]:
    """What the openai SDK's stream helpers build from the deltas."""
    content = ""
    calls: dict[int, list[str]] = {}
    for d in deltas:
        content += d.get("content") or ""
        for tc in d.get("tool_calls", []):
            entry = calls.setdefault(tc["index"], ["", "", ""])
            if "id" in tc:
                assert "type" in tc and "name" in tc["function"], "id, type and name come first"
                entry[0], entry[1] = tc["id"], tc["function"]["name"]
            entry[2] += tc["function"].get("arguments", "")
    return content, [tuple(calls[i]) for i in sorted(calls)]  # type: ignore[misc]


def _stream(st: ToolStreamer, pieces: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in pieces:
        out += st.push(p)
    return out + st.finish()


def test_streaming_auto_hermes_sends_content_then_calls() -> None:
    text = 'Checking.<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
    st = ToolStreamer("auto", "hermes")
    deltas = _stream(st, [text[i : i + 3] for i in range(0, len(text), 3)])
    content, calls = _assemble(deltas)
    assert content == "Checking." and [(n, json.loads(a)) for _, n, a in calls] == [("a", {"x": 1})]
    assert not any("<tool" in (d.get("content") or "") for d in deltas)  # the marker is held
    st = ToolStreamer("auto", "hermes")
    assert _assemble(_stream(st, ["Paris is", " nice <", "3"]))[0] == "Paris is nice <3"
    assert not st.calls


def test_streaming_named_and_required() -> None:
    st = ToolStreamer("function", "hermes", "get_weather")
    deltas = _stream(st, ['{"city"', ': "Paris"}'])
    _, calls = _assemble(deltas)
    assert calls[0][1] == "get_weather" and json.loads(calls[0][2]) == {"city": "Paris"}
    assert len(deltas) == 3  # the name first, then each argument fragment as it came
    st = ToolStreamer("required", "hermes")
    text = '[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"y": 2}}]'
    _, calls = _assemble(_stream(st, [text[:10], text[10:]]))
    assert [(n, json.loads(a)) for _, n, a in calls] == [("a", {}), ("b", {"y": 2})]
    assert len({i for i, _, _ in calls}) == 2
