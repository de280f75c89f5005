"""The gateway's OpenAPI 3.1 document (`GET /openapi.json`): every route, the request fields the
gateway accepts with the bounds validation.py enforces, the responses it writes and OpenAI's error
object for every 4xx/5xx.

The document is built from the operator's `Limits` (the same bounds validation.py checks), so it
says what this gateway accepts, not what a default one would. It may be looser than the gateway
(checks that depend on the model or on two fields together, such as the context length or
`top_logprobs` without `logprobs`, are 400s it cannot express) but never stricter: a request the
document calls invalid is one the gateway refuses (the schemathesis test checks both ways).

A new request field is one line in `_sampling_fields`, `_chat_fields` or `_completion_fields`.
"""

from __future__ import annotations

from typing import Any

from pagemesh.services.gateway.beam import DEFAULT_BEAM_WIDTH
from pagemesh.services.gateway.validation import CHAT_ROLES, Limits

Schema = dict[str, Any]

OPENAPI_VERSION = "3.1.0"
FINISH_REASONS = ("stop", "length", "abort", "tool_calls")  # generation.FINISH_REASONS, tools


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# ----- request fields: every one may be null, which the gateway reads as "not set" -----


def _field(types: list[str], description: str, **constraints: Any) -> Schema:
    return {"type": [*types, "null"], "description": description, **constraints}


def integer(lo: int, hi: int, description: str) -> Schema:
    return _field(["integer"], description, minimum=lo, maximum=hi)


def number(lo: float, hi: float, description: str) -> Schema:
    return _field(["number"], description, minimum=lo, maximum=hi)


def boolean(description: str) -> Schema:
    return _field(["boolean"], description)


def string(description: str, **constraints: Any) -> Schema:
    return _field(["string"], description, **constraints)


def one_of(description: str, *schemas: Schema) -> Schema:
    return {"description": description, "anyOf": [*schemas, {"type": "null"}]}


def _stop(limits: Limits) -> Schema:
    one = {"type": "string", "minLength": 1, "maxLength": limits.max_stop_chars}
    return one_of(
        "Up to max_stop sequences; the text is cut before the first one generated.",
        one,
        {"type": "array", "items": one, "maxItems": limits.max_stop},
    )


def _logit_bias(limits: Limits) -> Schema:
    return _field(
        ["object"],
        "Token id (a decimal string) -> bias added to its logit. Ids past the model's"
        " vocabulary are a 400.",
        propertyNames={"pattern": "^(0|[1-9][0-9]*)$"},
        additionalProperties={"type": "number", "minimum": -100, "maximum": 100},
        maxProperties=limits.max_logit_bias,
    )


def _stream_options() -> Schema:
    return _field(
        ["object"],
        "Only with `stream: true`. include_usage: a last chunk with `usage` and no choices;"
        " continuous_usage_stats (vLLM): every chunk carries the usage so far.",
        properties={
            "include_usage": {"type": "boolean"},
            "continuous_usage_stats": {"type": "boolean"},
        },
    )


def _sampling_fields(limits: Limits) -> dict[str, Schema]:
    """Fields both generation endpoints take (validation._common_options, beam.parse_beam)."""
    return {
        "model": {"type": "string", "description": "A served model's id (GET /v1/models)."},
        "stream": boolean("Answer as server-sent events, ending with `data: [DONE]`."),
        "stream_options": _stream_options(),
        "max_tokens": integer(1, limits.max_tokens, "Tokens to generate at most (deprecated)."),
        "max_completion_tokens": integer(
            1, limits.max_tokens, "Tokens to generate at most; wins over max_tokens."
        ),
        "temperature": number(0, 2, "Sampling temperature; 0 is greedy."),
        "top_p": number(0, 1, "Nucleus sampling mass."),
        "top_k": integer(-1, 1 << 20, "Keep the k most likely tokens; 0 or -1: all."),
        "min_p": number(0, 1, "Drop tokens below min_p times the most likely's probability."),
        "n": integer(1, limits.max_n, "Choices to generate."),
        "stop": _stop(limits),
        "seed": integer(-(1 << 63), (1 << 63) - 1, "Seed for reproducible sampling."),
        "presence_penalty": number(-2, 2, "OpenAI's presence penalty."),
        "frequency_penalty": number(-2, 2, "OpenAI's frequency penalty."),
        "repetition_penalty": number(0.01, 10, "vLLM's multiplicative repetition penalty."),
        "ignore_eos": boolean("Go on past the end-of-sequence token (vLLM)."),
        "cache_salt": string("Prompts share cached KV only with the same salt (vLLM)."),
        "user": string("An end-user id (recorded, not used)."),
        "logit_bias": _logit_bias(limits),
        "use_beam_search": boolean("Beam search instead of sampling (vLLM)."),
        "beam_width": integer(
            1, limits.max_beam_width, f"Beams kept; default max(n, {DEFAULT_BEAM_WIDTH})."
        ),
        "length_penalty": number(-10, 10, "Beam score is logprob / length ** length_penalty."),
        "prompt_logprobs": integer(
            0,
            limits.max_top_logprobs,
            "vLLM: each prompt token's logprob and rank, with this many alternatives; not with"
            " stream or beam search.",
        ),
        "return_tokens_as_token_ids": boolean('vLLM: tokens in logprobs as "token_id:<id>".'),
        **_structured_fields(),
        "early_stopping": one_of(
            "When beam search stops (transformers' generate).",
            {"type": "boolean"},
            {"const": "never"},
        ),
    }


def _chat_message() -> Schema:
    text_part = {
        "type": "object",
        "required": ["type", "text"],
        "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    }
    return {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"enum": list(CHAT_ROLES)},
            "content": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": text_part},
                    {"type": "null"},
                ]
            },
        },
        # Only an assistant turn may leave `content` out.
        "anyOf": [{"required": ["content"]}, {"properties": {"role": {"const": "assistant"}}}],
    }


def _chat_fields(limits: Limits) -> dict[str, Schema]:
    return {
        "messages": {
            "type": "array",
            "items": ref("ChatMessage"),
            "minItems": 1,
            "maxItems": limits.max_messages,
        },
        "logprobs": boolean("Return each output token's logprob."),
        "top_logprobs": integer(
            0, limits.max_top_logprobs, "Most likely alternatives per token; needs logprobs."
        ),
        **_tool_fields(),
    }


def _structured_fields() -> dict[str, Schema]:
    """Structured output (structured.py): OpenAI's response_format and vLLM's names. At most one
    of them per request (a rule across fields: the gateway's 400)."""
    json_schema = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "schema": {"type": ["object", "boolean"]},
            "strict": {"type": ["boolean", "null"]},
        },
    }
    return {
        "response_format": _field(
            ["object"],
            "text (nothing), json_object (any JSON object) or json_schema (output valid against"
            " json_schema.schema).",
            required=["type"],
            properties={
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "json_schema": json_schema,
            },
        ),
        "structured_outputs": _field(
            ["object"],
            "vLLM: one of json (a schema), json_object, regex, choice, grammar (EBNF).",
            properties={
                "json": {"type": ["object", "boolean", "string"]},
                "json_object": {"type": "boolean"},
                "regex": {"type": "string"},
                "choice": {"type": "array", "items": {"type": "string"}},
                "grammar": {"type": "string"},
            },
        ),
        "guided_json": one_of("vLLM: a JSON schema.", {"type": ["object", "boolean", "string"]}),
        "guided_regex": string("vLLM: a regular expression the output matches."),
        "guided_choice": one_of(
            "vLLM: the output is one of these strings.",
            {"type": "array", "items": {"type": "string"}},
        ),
        "guided_grammar": string("vLLM: an EBNF grammar (rule root)."),
    }


def _tool_fields() -> dict[str, Schema]:
    """Tool calling (tools.py): OpenAI's tools, tool_choice and parallel_tool_calls."""
    function = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "parameters": {"type": "object"},
            "strict": {"type": ["boolean", "null"]},
        },
    }
    tool = {
        "type": "object",
        "required": ["type", "function"],
        "properties": {"type": {"const": "function"}, "function": function},
    }
    named = {
        "type": "object",
        "required": ["type", "function"],
        "properties": {
            "type": {"const": "function"},
            "function": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}},
            },
        },
    }
    return {
        "tools": one_of("Functions the model may call.", {"type": "array", "items": tool}),
        "tool_choice": one_of(
            "none, auto, required, or one named function (needs tools).",
            {"enum": ["none", "auto", "required"]},
            named,
        ),
        "parallel_tool_calls": boolean("Several calls in one answer (default true)."),
    }


def _completion_fields(limits: Limits) -> dict[str, Schema]:
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    text = {"type": "string", "minLength": 1}
    return {
        "prompt": {
            "description": "One prompt: text or token ids (or a batch of exactly one of them).",
            "anyOf": [
                text,
                token_ids,
                {"type": "array", "prefixItems": [text], "minItems": 1, "maxItems": 1},
                {"type": "array", "prefixItems": [token_ids], "minItems": 1, "maxItems": 1},
            ],
        },
        "echo": boolean("Return the prompt before the completion (with its logprobs)."),
        "logprobs": integer(
            0, min(5, limits.max_top_logprobs), "Logprobs with this many alternatives per token."
        ),
        "best_of": integer(1, limits.max_n, "Only equal to n (no server-side reranking)."),
    }


def _request(required: list[str], fields: dict[str, Schema]) -> Schema:
    # Unknown fields are ignored, as OpenAI's API does: no additionalProperties: false.
    return {"type": "object", "required": required, "properties": fields}


# ----- responses -----


def _obj(required: list[str], properties: dict[str, Schema], **extra: Any) -> Schema:
    return {"type": "object", "required": required, "properties": properties, **extra}


INT: Schema = {"type": "integer"}
STR: Schema = {"type": "string"}
NULL: Schema = {"type": "null"}


# vLLM's prompt_logprobs: null for the first prompt token, then token id -> its entry.
PROMPT_LOGPROBS: Schema = {
    "type": "array",
    "items": {
        "type": ["object", "null"],
        "additionalProperties": _obj(
            ["logprob", "rank", "decoded_token"],
            {"logprob": {"type": "number"}, "rank": INT, "decoded_token": STR},
        ),
    },
}


def _envelope(object_name: str, choice: str) -> Schema:
    """chat.completion(.chunk) / text_completion: what every body and every chunk carries."""
    return _obj(
        ["id", "object", "created", "model", "choices"],
        {
            "id": STR,
            "object": {"const": object_name},
            "created": INT,
            "model": STR,
            "system_fingerprint": STR,
            "choices": {"type": "array", "items": ref(choice)},
            "usage": {"anyOf": [ref("Usage"), NULL]},
            "prompt_logprobs": PROMPT_LOGPROBS,  # chat (vLLM: at the top level)
        },
    )


def _response_schemas() -> dict[str, Schema]:
    finish = {"enum": [*FINISH_REASONS, None]}
    logprob_entry = _obj(
        ["token", "logprob", "bytes"],
        {
            "token": STR,
            "logprob": {"type": "number"},
            "bytes": {"type": ["array", "null"], "items": {"type": "integer", "minimum": 0}},
        },
    )
    return {
        "Error": _obj(
            ["error"],
            {
                "error": _obj(
                    ["message", "type", "param", "code"],
                    {
                        "message": STR,
                        "type": STR,
                        "param": {"type": ["string", "null"]},
                        "code": {"type": ["string", "null"]},
                    },
                )
            },
        ),
        "Usage": _obj(
            ["prompt_tokens", "completion_tokens", "total_tokens"],
            {
                "prompt_tokens": INT,
                "completion_tokens": INT,
                "total_tokens": INT,
                "prompt_tokens_details": _obj(["cached_tokens"], {"cached_tokens": INT}),
                "completion_tokens_details": _obj(["reasoning_tokens"], {"reasoning_tokens": INT}),
            },
        ),
        "ChatLogprob": _obj(
            [*logprob_entry["required"], "top_logprobs"],
            {
                **logprob_entry["properties"],
                "top_logprobs": {"type": "array", "items": logprob_entry},
            },
        ),
        "ChatLogprobs": _obj(
            ["content"],
            {
                "content": {"type": ["array", "null"], "items": ref("ChatLogprob")},
                "refusal": {"type": ["array", "null"]},
            },
        ),
        "CompletionLogprobs": _obj(
            ["tokens", "token_logprobs", "top_logprobs", "text_offset"],
            {
                "tokens": {"type": "array", "items": STR},
                # null: an echoed prompt's first token, which nothing predicts.
                "token_logprobs": {"type": "array", "items": {"type": ["number", "null"]}},
                "top_logprobs": {
                    "type": "array",
                    "items": {
                        "type": ["object", "null"],
                        "additionalProperties": {"type": "number"},
                    },
                },
                "text_offset": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            },
        ),
        "ChatMessage": _chat_message(),
        "ChatChoice": _obj(
            ["index", "message", "finish_reason"],
            {
                "index": INT,
                "message": _obj(
                    ["role", "content"],
                    {
                        "role": {"const": "assistant"},
                        "content": {"type": ["string", "null"]},
                        "refusal": {"type": ["string", "null"]},
                        "tool_calls": {"type": "array", "items": {"type": "object"}},
                    },
                ),
                "logprobs": {"anyOf": [ref("ChatLogprobs"), NULL]},
                "finish_reason": finish,
            },
        ),
        "ChatChunkChoice": _obj(
            ["index", "delta", "finish_reason"],
            {
                "index": INT,
                "delta": _obj(
                    [],
                    {
                        "role": {"const": "assistant"},
                        "content": {"type": ["string", "null"]},
                        "tool_calls": {"type": "array", "items": {"type": "object"}},
                    },
                ),
                "logprobs": {"anyOf": [ref("ChatLogprobs"), NULL]},
                "finish_reason": finish,
            },
        ),
        "CompletionChoice": _obj(
            ["text", "index", "logprobs", "finish_reason"],
            {
                "text": STR,
                "index": INT,
                "logprobs": {"anyOf": [ref("CompletionLogprobs"), NULL]},
                "finish_reason": finish,
                "prompt_logprobs": PROMPT_LOGPROBS,  # completions (vLLM: per choice)
            },
        ),
        "ChatCompletion": _envelope("chat.completion", "ChatChoice"),
        "ChatCompletionChunk": _envelope("chat.completion.chunk", "ChatChunkChoice"),
        "Completion": _envelope("text_completion", "CompletionChoice"),
        "Model": _obj(
            ["id", "object", "created", "owned_by"],
            {
                "id": STR,
                "object": {"const": "model"},
                "created": INT,
                "owned_by": STR,
                "max_model_len": INT,
            },
        ),
        "ModelList": _obj(
            ["object", "data"],
            {"object": {"const": "list"}, "data": {"type": "array", "items": ref("Model")}},
        ),
        "Health": _obj(
            ["status"],
            {
                "status": {"enum": ["ok", "degraded", "loading", "executor unavailable"]},
                "model": STR,
                "models": {"type": "array", "items": STR},
                "executors": _obj(
                    ["total", "routable"],
                    {"total": INT, "routable": INT},
                ),
                "kvmanager": {"enum": ["serving", "unreachable"]},
                "redis": {"enum": ["connected", "unreachable", "off", "unknown"]},
            },
        ),
    }


# Every status a route may answer with an error object, and why.
ERROR_STATUSES = {
    "400": "The request is invalid (the error's `param` names the field).",
    "401": "A missing or wrong API key (when the gateway has keys).",
    "404": "Unknown model.",
    "413": "The body is larger than the gateway's limit.",
    "415": "The body is declared as something other than application/json.",
    "429": "Too many requests in flight; retry after Retry-After seconds.",
    "500": "An unexpected server error.",
    "503": "No executor can serve the model now; retry after Retry-After seconds.",
}
RETRY_AFTER: Schema = {
    "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
}


def error_response(status: str) -> Schema:
    out: Schema = {
        "description": ERROR_STATUSES[status],
        "content": {"application/json": {"schema": ref("Error")}},
    }
    if status in ("429", "503"):
        out["headers"] = RETRY_AFTER
    return out


def json_response(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def sse_event(*payloads: Schema) -> Schema:
    """One server-sent event of a stream (OpenAPI 3.1 has a text/event-stream `schema` describe
    each event; 3.2 calls it `itemSchema`): its data is one of `payloads` as JSON, or the
    `[DONE]` that ends the stream."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"const": "[DONE]"},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"anyOf": list(payloads)},
                    },
                ]
            }
        },
    }


def _generation(summary: str, request: str, body: str, chunk: str) -> Schema:
    """POST /v1/chat/completions or /v1/completions."""
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ref(request)}},
            },
            "responses": {
                "200": {
                    "description": "One JSON body, or with `stream: true` server-sent events:"
                    " `data: <chunk>` per event (an error object in-band if the generation"
                    " fails mid-stream), then `data: [DONE]`.",
                    "content": {
                        "application/json": {"schema": ref(body)},
                        "text/event-stream": {"schema": sse_event(ref(chunk), ref("Error"))},
                    },
                },
                **{s: error_response(s) for s in ERROR_STATUSES},
            },
        }
    }


def build_openapi(limits: Limits) -> dict[str, Any]:
    """The whole document for a gateway with these limits."""
    bearer: list[dict[str, list[str]]] = [
        {},
        {"apiKey": []},
    ]  # optional: a gateway runs with or without keys
    no_auth: list[dict[str, list[str]]] = []
    paths: dict[str, Any] = {
        "/v1/chat/completions": _generation(
            "Chat completion", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
        ),
        "/v1/completions": _generation(
            "Text completion", "CompletionRequest", "Completion", "Completion"
        ),
        "/v1/models": {
            "get": {
                "summary": "The served models",
                "responses": {
                    "200": json_response("Each served model once.", ref("ModelList")),
                    "401": error_response("401"),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One served model",
                "parameters": [
                    {"name": "model", "in": "path", "required": True, "schema": STR},
                ],
                "responses": {
                    "200": json_response("The model object.", ref("Model")),
                    "401": error_response("401"),
                    "404": error_response("404"),
                },
            }
        },
        "/health": {
            "get": {
                "summary": "Whether this gateway can serve",
                "security": no_auth,
                "responses": {
                    "200": json_response("Serving (status ok or degraded).", ref("Health")),
                    "503": {
                        **json_response("Not serving yet (loading, no executor).", ref("Health")),
                        "headers": RETRY_AFTER,
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "security": no_auth,
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": STR}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": no_auth,
                "responses": {
                    "200": json_response("OpenAPI 3.1.", {"type": "object"}),
                },
            }
        },
    }
    schemas = _response_schemas()
    schemas["ChatCompletionRequest"] = _request(
        ["model", "messages"], {**_sampling_fields(limits), **_chat_fields(limits)}
    )
    schemas["CompletionRequest"] = _request(
        ["model", "prompt"], {**_sampling_fields(limits), **_completion_fields(limits)}
    )
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "pagemesh gateway",
            "version": "1",
            "description": "OpenAI-compatible chat and text completions (with vLLM's extensions"
            " for sampling and beam search).",
        },
        "security": bearer,
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <key>`, when the gateway has keys.",
                }
            },
        },
    }
