"""Schemathesis against a real gateway over the real mesh (SmolLM2 on the CPU, real kvmanager,
executor and Redis processes), driven by the gateway's own GET /openapi.json: no 5xx, every
status, content type and body as documented (each server-sent event too), every request the
document calls invalid refused, and no request left hanging.

Generation is kept cheap for a CPU: each body asks for at most MAX_TOKENS tokens and names the
served model (a random name is only a 404), the context is short; examples are bounded and derandomized, so CI runs the
same cases every time."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.e2e.conftest import API_KEY, MODEL
from tests.support.mesh import Mesh, MeshConfig, http_get

MAX_TOKENS = 4
# A short context bounds the work of any one request on a CPU (a long prompt is a quick 400).
MAX_MODEL_LEN = 512
REQUEST_TIMEOUT = 120.0  # seconds: a request that takes longer has hung
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHECKS = [
    getattr(schemathesis.checks, name)
    for name in (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
    )
]
# (operation, generation mode, fields forced into the body) -> examples. The generation
# endpoints get the most: positive bodies that pass validation each run a (short) generation,
# and a third of those are made streams (few generated bodies stream and pass validation).
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
STREAM = (("stream", True),)
EXAMPLES: dict[tuple[str, GenerationMode, tuple[tuple[str, Any], ...]], int] = {
    ("POST /v1/chat/completions", POSITIVE, ()): 25,
    ("POST /v1/chat/completions", POSITIVE, STREAM): 15,
    ("POST /v1/chat/completions", NEGATIVE, ()): 30,
    ("POST /v1/completions", POSITIVE, ()): 25,
    ("POST /v1/completions", POSITIVE, STREAM): 15,
    ("POST /v1/completions", NEGATIVE, ()): 30,
    ("GET /v1/models", POSITIVE, ()): 2,
    ("GET /v1/models/{model}", POSITIVE, ()): 10,
    ("GET /health", POSITIVE, ()): 2,
    ("GET /metrics", POSITIVE, ()): 2,
    ("GET /openapi.json", POSITIVE, ()): 2,
}


def keep_small(body: Any, force: tuple[tuple[str, Any], ...] = ()) -> None:
    """Name the served model and bound the tokens to generate; a value the gateway refuses
    anyway (out of range, not an integer) is left as generated. `force`: fields to set."""
    if not isinstance(body, dict):
        return
    body.update(force)
    if isinstance(body.get("model"), str):
        body["model"] = MODEL
    capped = False
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            body[name] = min(value, MAX_TOKENS)
            capped = True
        elif value is not None:
            capped = True  # invalid: a 400 anyway
    if not capped:
        body["max_tokens"] = MAX_TOKENS


def sse_validator(document: dict[str, Any], path: str) -> jsonschema_rs.Validator:
    media = document["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"]
    payload = media["schema"]["properties"]["data"]["anyOf"][1]["contentSchema"]
    return jsonschema_rs.Draft202012Validator({**payload, "components": document["components"]})


def check_events(raw: bytes, validator: jsonschema_rs.Validator) -> None:
    """OpenAI's framing: `data: <json>` events, each as documented, the last `data: [DONE]`
    (schemathesis checks each event, not that the stream ends so)."""
    events = [e for e in raw.decode().split("\n\n") if e]
    assert events and events[-1] == "data: [DONE]", events[-3:]
    for event in events[:-1]:
        assert event.startswith("data: "), event
        payload = json.loads(event[len("data: ") :])
        errors = [e.message for e in validator.iter_errors(payload)]
        assert not errors, f"event {payload} breaks the document: {errors}"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Mesh]:
    config = MeshConfig(
        model=str(smollm2_path),
        num_blocks=256,
        api_key=API_KEY,
        model_name=MODEL,
        executor_args=("--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "4"),
    )
    with Mesh(tmp_path_factory.mktemp("openapi"), config) as m:
        yield m


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_schemathesis_finds_nothing(mesh: Mesh) -> None:
    status, raw = http_get(mesh.url + "/openapi.json", timeout=30)
    assert status == 200
    document = json.loads(raw)
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()
    events = {p: sse_validator(document, p) for p in ("/v1/chat/completions", "/v1/completions")}
    operations = {op.ok().label: op.ok() for op in schema.get_all_operations()}
    assert {label for label, _, _ in EXAMPLES} == set(operations)
    seen: dict[str, Counter[str]] = {}
    for (label, mode, force), examples in EXAMPLES.items():
        operation = operations[label]
        tally = seen.setdefault(label, Counter())
        strategy = operation.as_strategy(mode)
        fuzz(strategy, examples, mesh, events.get(operation.path), tally, force)
        if label == "GET /v1/models/{model}":  # the served one, not only random names
            strategy = operation.as_strategy(mode, path_parameters={"model": MODEL})
            fuzz(strategy, 1, mesh, None, tally)
    # The run reached the model, both ways of answering, on both generation endpoints.
    for label in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert seen[label]["200 application/json"] and seen[label]["200 text/event-stream"], seen
    assert seen["GET /v1/models/{model}"]["200 application/json"], seen
    mesh.wait_idle(timeout=60)  # nothing left running or holding blocks


def fuzz(
    strategy: Any,
    examples: int,
    mesh: Mesh,
    events: jsonschema_rs.Validator | None,
    tally: Counter[str],
    force: tuple[tuple[str, Any], ...] = (),
) -> None:
    """Sends `examples` cases and validates each answer; counts them by status and media type."""

    # No shrinking: a failure's report holds the request as curl already.
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def one(case: schemathesis.Case) -> None:
        keep_small(case.body, force)
        response = case.call_and_validate(
            base_url=mesh.url, headers=AUTH, checks=CHECKS, timeout=REQUEST_TIMEOUT
        )
        media = response.headers.get("content-type", [""])[0].split(";")[0]
        tally[f"{response.status_code} {media}"] += 1
        if events is not None and media == "text/event-stream":
            check_events(response.content, events)

    one()


# Found by this run: with `echo`, token ids were decoded before they were checked against the
# vocabulary, and an id past u64 made the tokenizer raise: a 500 instead of the documented 400.
@pytest.mark.parametrize("token", [49152, 1 << 61, 1 << 64])
def test_echo_of_token_ids_past_the_vocabulary_is_a_400(mesh: Mesh, token: int) -> None:
    body = {"model": MODEL, "prompt": [1, token], "echo": True, "max_tokens": 1}
    response = requests.post(mesh.url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"
