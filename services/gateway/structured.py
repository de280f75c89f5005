"""Structured output requests → the executor's guide (proto Guide), or a 400 naming the
parameter.

Accepted, as OpenAI and vLLM spell them:
- `response_format`: `{"type": "text"}` (nothing), `{"type": "json_object"}`, or
  `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`;
- `structured_outputs` (vLLM's current extension): one of `json` (a schema), `json_object`,
  `regex`, `choice`, `grammar`;
- vLLM's older names: `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

At most one of them may constrain a request. The schema's shape is checked here (an object
whose keywords have the right JSON types); what the grammar engine cannot compile comes back
from the executor as a refusal, which the gateway answers with a 400 naming the same parameter
(app.py), before any block is touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.gateway.errors import APIError, invalid

# A guide's text is sent to the executor and compiled there: bound it like any other input.
MAX_SPEC_CHARS = 256 * 1024

# JSON Schema keywords and the JSON types their values must have (a wrong one is a client error
# the grammar engine would report less clearly, or silently ignore).
_OBJECT_KEYWORDS = ("properties", "$defs", "definitions", "patternProperties")
_ARRAY_KEYWORDS = ("required", "enum", "anyOf", "oneOf", "allOf", "prefixItems")
_INT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties")
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


@dataclass(slots=True, frozen=True)
class GuideOptions:
    kind: int  # pb.GuideKind
    spec: str
    param: str  # the request parameter it came from, for a 400 that names it


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_schema(schema: Any, param: str, path: str = "") -> None:
    """The JSON schema's shape: an object (or true/false) whose keywords have valid values."""
    where = path or "the schema"
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise invalid(
            f"Invalid JSON schema in '{param}': {where} must be an object, "
            f"not {_type_name(schema)}.",
            param=param,
            code="invalid_json_schema",
        )
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in _TYPES:
            raise invalid(
                f"Invalid JSON schema in '{param}': {where} has unknown type {k!r}.",
                param=param,
                code="invalid_json_schema",
            )
    for key in _OBJECT_KEYWORDS:
        if key in schema:
            value = schema[key]
            if not isinstance(value, dict):
                raise invalid(
                    f"Invalid JSON schema in '{param}': '{key}' of {where} must be an object.",
                    param=param,
                    code="invalid_json_schema",
                )
            for name, sub in value.items():
                check_schema(sub, param, f"{path}/{key}/{name}")
    for key in _ARRAY_KEYWORDS:
        if key in schema and not isinstance(schema[key], list):
            raise invalid(
                f"Invalid JSON schema in '{param}': '{key}' of {where} must be an array.",
                param=param,
                code="invalid_json_schema",
            )
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, sub in enumerate(schema.get(key) or []):
            check_schema(sub, param, f"{path}/{key}/{i}")
    for key in ("items", "additionalProperties", "not"):
        if key in schema and not isinstance(schema[key], bool):
            check_schema(schema[key], param, f"{path}/{key}")
    for key in _INT_KEYWORDS:
        value = schema.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise invalid(
                f"Invalid JSON schema in '{param}': '{key}' of {where} must be an integer.",
                param=param,
                code="invalid_json_schema",
            )
    if "pattern" in schema and not isinstance(schema["pattern"], str):
        raise invalid(
            f"Invalid JSON schema in '{param}': 'pattern' of {where} must be a string.",
            param=param,
            code="invalid_json_schema",
        )


def _schema_guide(schema: Any, param: str) -> GuideOptions:
    check_schema(schema, param)
    spec = json.dumps(schema)
    _check_size(spec, param)
    return GuideOptions(pb.GUIDE_JSON_SCHEMA, spec, param)


def _check_size(spec: str, param: str) -> None:
    if len(spec) > MAX_SPEC_CHARS:
        raise invalid(
            f"'{param}' is too large ({len(spec)} characters; at most {MAX_SPEC_CHARS}).",
            param=param,
        )


def _response_format(value: Any) -> GuideOptions | None:
    param = "response_format"
    if not isinstance(value, dict):
        raise invalid(
            f"Invalid type for '{param}': expected an object.", param=param, code="invalid_type"
        )
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuideOptions(pb.GUIDE_JSON_OBJECT, "", param)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise invalid(
                "Missing required parameter: 'response_format.json_schema'.",
                param="response_format.json_schema",
                code="missing_required",
            )
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(
                "Missing required parameter: 'response_format.json_schema.name'.",
                param="response_format.json_schema.name",
                code="missing_required",
            )
        if "strict" in spec and spec["strict"] is not None and not isinstance(spec["strict"], bool):
            raise invalid(
                "Invalid type for 'response_format.json_schema.strict': expected a boolean.",
                param="response_format.json_schema.strict",
                code="invalid_type",
            )
        # OpenAI: a missing schema is "any JSON object".
        schema = spec.get("schema", {"type": "object"})
        return _schema_guide(schema, "response_format.json_schema.schema")
    raise invalid(
        f"Invalid value for 'response_format.type': {kind!r}. Supported values are: 'text', "
        "'json_object' and 'json_schema'.",
        param="response_format.type",
        code="invalid_value",
    )


def _string_guide(value: Any, param: str, kind: int) -> GuideOptions:
    if not isinstance(value, str) or not value:
        raise invalid(
            f"Invalid value for '{param}': expected a non-empty string.",
            param=param,
            code="invalid_value",
        )
    _check_size(value, param)
    return GuideOptions(kind, value, param)


def _choice_guide(value: Any, param: str) -> GuideOptions:
    if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
        raise invalid(
            f"Invalid value for '{param}': expected a non-empty array of non-empty strings.",
            param=param,
            code="invalid_value",
        )
    spec = json.dumps(value)
    _check_size(spec, param)
    return GuideOptions(pb.GUIDE_CHOICE, spec, param)


def _structured_outputs(value: Any) -> GuideOptions | None:
    param = "structured_outputs"
    if not isinstance(value, dict):
        raise invalid(
            f"Invalid type for '{param}': expected an object.", param=param, code="invalid_type"
        )
    given = [k for k in ("json", "json_object", "regex", "choice", "grammar") if value.get(k)]
    if len(given) > 1:
        raise invalid(
            f"'{param}' takes one of json, json_object, regex, choice and grammar; got "
            + ", ".join(given)
            + ".",
            param=param,
        )
    if not given:
        return None
    key = given[0]
    where = f"{param}.{key}"
    if key == "json":
        schema = value[key]
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as exc:
                raise invalid(f"'{where}' is not valid JSON: {exc}", param=where) from None
        return _schema_guide(schema, where)
    if key == "json_object":
        return GuideOptions(pb.GUIDE_JSON_OBJECT, "", where)
    if key == "regex":
        return _string_guide(value[key], where, pb.GUIDE_REGEX)
    if key == "choice":
        return _choice_guide(value[key], where)
    return _string_guide(value[key], where, pb.GUIDE_GRAMMAR)


def parse_guide(body: dict[str, Any]) -> GuideOptions | None:
    """The request's guide, if any; a 400 when it is malformed or given twice."""
    found: list[GuideOptions] = []
    fmt = body.get("response_format")
    if fmt is not None and (g := _response_format(fmt)) is not None:
        found.append(g)
    so = body.get("structured_outputs")
    if so is not None and (g := _structured_outputs(so)) is not None:
        found.append(g)
    legacy = body.get("guided_json")
    if legacy is not None:
        if isinstance(legacy, str):
            try:
                legacy = json.loads(legacy)
            except json.JSONDecodeError as exc:
                raise invalid(
                    f"'guided_json' is not valid JSON: {exc}", param="guided_json"
                ) from None
        found.append(_schema_guide(legacy, "guided_json"))
    if body.get("guided_regex") is not None:
        found.append(_string_guide(body["guided_regex"], "guided_regex", pb.GUIDE_REGEX))
    if body.get("guided_choice") is not None:
        found.append(_choice_guide(body["guided_choice"], "guided_choice"))
    if body.get("guided_grammar") is not None:
        found.append(_string_guide(body["guided_grammar"], "guided_grammar", pb.GUIDE_GRAMMAR))
    if len(found) > 1:
        names = ", ".join(g.param for g in found)
        raise invalid(
            f"Only one structured-output constraint may be given; this request has {names}.",
            param=found[1].param,
        )
    return found[0] if found else None


def refusal_error(exc: APIError, guide: GuideOptions) -> APIError:
    """The executor's refusal of a guided request (its grammar did not compile, or not in
    time), as a 400 naming the parameter the guide came from."""
    # The engine's refusals of a guide say "guide" (grammar.py, engine.py); any other refusal
    # is about something else and keeps its own wording.
    if exc.status != 400 or exc.param is not None or "guide" not in exc.message:
        return exc
    reason = exc.message.removeprefix("invalid guide: ")
    return invalid(f"Invalid '{guide.param}': {reason}", param=guide.param, code="invalid_value")
