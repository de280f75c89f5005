"""Structured output and tool calling through a whole mesh (SmolLM2 on the CPU) with the
official openai client and LangChain: Pydantic parsing, 30 JSON schemas (streamed and not,
n = 2) that jsonschema validates, json_object, named and required tool calls whose arguments
validate, streamed calls equal to the non-streamed ones, a conversation that goes on after a
tool result, and the 400s of bad input. One mesh for the module; the schema runs send their
requests concurrently so the executor batches them (constrained and unconstrained together)."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.mesh import Mesh, MeshConfig
from tests.support.schemas import SCHEMAS

API_KEY = "e2e-secret"
MODEL = "SmolLM2-135M-Instruct"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a timezone.",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 24}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Mesh]:
    config = MeshConfig(model=str(smollm2_path), num_blocks=1024, api_key=API_KEY, model_name=MODEL)
    with Mesh(tmp_path_factory.mktemp("structured"), config) as m:
        yield m


def client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)


def _validate(doc: Any, schema: dict[str, Any]) -> None:
    jsonschema.validate(doc, schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


class City(BaseModel):
    name: Annotated[str, Field(min_length=1, max_length=16)]
    country: Annotated[str, Field(min_length=1, max_length=16)]
    population_millions: Annotated[int, Field(ge=0, le=100)]


def test_parse_with_a_pydantic_model(mesh: Mesh) -> None:
    out = client(mesh).chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        temperature=0,
        max_tokens=80,
    )
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


def _schema_request(c: openai.OpenAI, name: str, schema: dict[str, Any], stream: bool) -> list[str]:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"Reply with JSON for a {name}."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": True},
        },
        "n": 2,
        "seed": 1,
        "max_tokens": 160,
    }
    if not stream:
        out = c.chat.completions.create(**kwargs)
        assert all(ch.finish_reason == "stop" for ch in out.choices), name
        return [ch.message.content or "" for ch in out.choices]
    texts = ["", ""]
    finish: list[str | None] = [None, None]
    for chunk in c.chat.completions.create(**kwargs, stream=True):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            finish[ch.index] = ch.finish_reason or finish[ch.index]
    assert finish == ["stop", "stop"], name
    return texts


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_thirty_schemas_n2_validate(mesh: Mesh, stream: bool) -> None:
    c = client(mesh)
    failures: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        # An unconstrained greedy request in the same batches: its answer does not change.
        plain = pool.submit(
            c.chat.completions.create,
            model=MODEL,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=16,
        )
        futures = {pool.submit(_schema_request, c, n, s, stream): (n, s) for n, s in SCHEMAS}
        for future, (name, schema) in futures.items():
            try:
                for text in future.result():
                    _validate(json.loads(text), schema)
            except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
                failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
        assert plain.result().choices[0].message.content == "The capital of France is Paris."
    assert not failures, failures


def test_json_object_and_completions(mesh: Mesh) -> None:
    c = client(mesh)
    out = c.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Reply with a JSON object with the name and age of a cat."}
        ],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=120,
    )
    assert isinstance(json.loads(out.choices[0].message.content or ""), dict)
    schema = SCHEMAS[0][1]
    done = c.completions.create(
        model=MODEL,
        prompt="A person as JSON:",
        max_tokens=60,
        temperature=0,
        extra_body={
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": schema},
            }
        },
    )
    _validate(json.loads(done.choices[0].text), schema)
    choice = c.completions.create(
        model=MODEL,
        prompt="Is the sky blue? Answer:",
        max_tokens=4,
        temperature=0,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert choice.choices[0].text in ("yes", "no")


def _calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(t.function.name, json.loads(t.function.arguments)) for t in message.tool_calls or []]


@pytest.mark.parametrize(
    "tool_choice",
    ["required", {"type": "function", "function": {"name": "get_weather"}}],
    ids=["required", "named"],
)
def test_tool_calls_validate_and_stream_the_same(mesh: Mesh, tool_choice: Any) -> None:
    c = client(mesh)
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": [WEATHER, TIME],
        "tool_choice": tool_choice,
        "temperature": 0,
        "max_tokens": 120,
    }
    out = c.chat.completions.create(**kwargs)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = _calls(choice.message)
    assert calls
    params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    for name, args in calls:
        _validate(args, params[name])
    if isinstance(tool_choice, dict):
        assert [n for n, _ in calls] == ["get_weather"]
    assert all(
        t.id.startswith("call_") and t.type == "function" for t in choice.message.tool_calls or []
    )
    with c.chat.completions.stream(**kwargs) as stream:
        final = stream.get_final_completion()
    assert _calls(final.choices[0].message) == calls
    assert final.choices[0].finish_reason == "tool_calls"


def test_conversation_goes_on_after_a_tool_result(mesh: Mesh) -> None:
    c = client(mesh)
    first = c.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=80,
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    out = c.chat.completions.create(
        model=MODEL,
        messages=[
            *ASK_WEATHER,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call.model_dump()],
            },
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
        ],
        tools=[WEATHER],
        temperature=0,
        max_tokens=40,
    )
    msg = out.choices[0].message
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert msg.content or msg.tool_calls


def test_langchain_structured_output_and_bind_tools(mesh: Mesh) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=MODEL,
        base_url=mesh.url + "/v1",
        api_key=API_KEY,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=80,
        max_retries=0,
    )
    city = llm.with_structured_output(City).invoke("Describe Paris.")
    assert isinstance(city, City)

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?"
    )
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    assert isinstance(msg.tool_calls[0]["args"].get("city"), str)


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    return body["error"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            # Well-formed, but the grammar engine cannot compile the pattern: the executor's
            # refusal, still a 400 naming the parameter.
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}},
                }
            },
            "response_format.json_schema.schema",
        ),
        ({"structured_outputs": {"grammar": "root ::= ("}}, "structured_outputs.grammar"),
        (
            {"tools": [{"type": "function", "function": {"description": "no name"}}]},
            "tools[0].function.name",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "use_beam_search": True, "n": 2, "temperature": 0}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
    ids=[
        "bad-type",
        "bad-pattern",
        "bad-ebnf",
        "no-name",
        "unknown-choice",
        "beam",
        "choice-without-tools",
        "bad-format",
    ],
)
def test_bad_input_is_a_400_naming_the_parameter(
    mesh: Mesh, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(mesh).chat.completions.create(
            model=MODEL, messages=ASK_WEATHER, max_tokens=8, extra_body=extra
        )
    err = _error(info.value)
    assert err["param"] == param, err
    assert ".cc" not in err["message"] and "Traceback" not in err["message"], err
