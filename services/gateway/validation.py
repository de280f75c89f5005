"""Request bodies → typed requests, or a 400 that names the offending parameter.

Everything a client can get wrong is checked here, before any tokenization or executor work, so
a bad request never costs a block. Limits that depend on the prompt (context length) are checked
by the caller once the prompt is tokenized (`check_context`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from pagemesh.services.gateway.beam import BeamOptions, parse_beam
from pagemesh.services.gateway.errors import APIError, invalid
from pagemesh.services.gateway.structured import GuideOptions, parse_guide
from pagemesh.services.gateway.tools import ToolOptions, parse_tools, tool_calls_of, tool_guide

# Roles the chat template understands; "developer" is OpenAI's newer name for "system".
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(slots=True)
class Limits:
    """Operator-set bounds, applied before any work is done."""

    max_n: int = 8
    max_stop: int = 4
    max_stop_chars: int = 256
    max_top_logprobs: int = 20
    max_messages: int = 1024
    max_tokens: int = 1 << 20  # absolute bound; the context length is usually tighter
    max_beam_width: int = 8  # the executor's own limit is checked there too
    max_logit_bias: int = 1024  # entries; ids past the vocabulary: check_logit_bias, per model


@dataclass(slots=True)
class GenerationOptions:
    max_tokens: int | None = None  # None: up to the context length
    max_tokens_param: str = "max_tokens"  # the parameter it came from, for check_context's 400
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    cache_salt: str = ""
    user: str | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    beam: BeamOptions | None = None  # use_beam_search (beam.py)
    # vLLM's extensions: prompt_logprobs (alternatives per prompt token; None: off) and
    # return_tokens_as_token_ids ("token_id:<id>" for every token string in logprobs).
    prompt_logprobs: int | None = None
    tokens_as_ids: bool = False
    # completions: echo with logprobs scores the prompt too (its tokens lead the logprobs).
    echo_logprobs: bool = False
    guide: GuideOptions | None = None  # structured output (structured.py, tools.py)


@dataclass(slots=True)
class ChatRequest:
    model: str
    # role + plain-text content; assistant turns may carry `tool_calls` (arguments parsed),
    # tool turns `tool_call_id`
    messages: list[dict[str, Any]]
    stream: bool
    include_usage: bool
    options: GenerationOptions
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk
    tools: ToolOptions | None = None


@dataclass(slots=True)
class CompletionRequest:
    model: str
    prompt: str | list[int]
    stream: bool
    include_usage: bool
    echo: bool
    options: GenerationOptions
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: usage on every chunk


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: deep nesting
        raise invalid(
            f"We could not parse the JSON body of your request: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.", code="invalid_json")
    # JSON lets a string escape half a UTF-16 pair ("\ud800"); Python keeps it as a lone
    # surrogate that no tokenizer, regex or UTF-8 encoder downstream takes (they raised: a 500).
    # Only an escape can make one (raw UTF-8 bytes of a surrogate fail to decode above).
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(body):
        raise invalid(
            "The request body holds a string with an unpaired UTF-16 surrogate escape (such as"
            " \\ud800), which is not valid Unicode.",
            code="invalid_json",
        )
    return body


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def _type_error(name: str, expected: str, value: Any) -> APIError:
    return invalid(
        f"Invalid type for '{name}': expected {expected}, but got {_json_type(value)}.",
        param=name,
        code="invalid_type",
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _range_error(name: str, value: Any, lo: Any, hi: Any) -> APIError:
    return invalid(
        f"Invalid value for '{name}': {value!r} is out of range; it must be between {lo} and {hi}.",
        param=name,
        code="invalid_value",
    )


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but `true` is not a number in JSON.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(name, "a number", value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise _range_error(name, value, lo, hi)
    return float(value)


def _integer(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if not lo <= value <= hi:
        raise _range_error(name, value, lo, hi)
    return value


def _boolean(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _string(body: dict[str, Any], name: str, default: str | None) -> str | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise invalid("You must provide a model parameter.", param="model", code="missing_required")
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    return model


def _stop(body: dict[str, Any], limits: Limits) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(stops) > limits.max_stop:
        raise invalid(
            f"Invalid value for 'stop': at most {limits.max_stop} stop sequences are allowed.",
            param="stop",
            code="invalid_value",
        )
    for s in stops:
        if not s or len(s) > limits.max_stop_chars:
            raise invalid(
                f"Invalid value for 'stop': each stop sequence must be 1 to "
                f"{limits.max_stop_chars} characters long.",
                param="stop",
                code="invalid_value",
            )
    return list(dict.fromkeys(stops))


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise _type_error("stream_options", "an object", opts)
    if not stream:
        raise invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
            code="invalid_value",
        )
    value = opts.get("include_usage", False)
    if not isinstance(value, bool):
        raise _type_error("stream_options.include_usage", "a boolean", value)
    return value


def _continuous_usage(body: dict[str, Any]) -> bool:
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far
    (stream_options itself was checked by _stream_options)."""
    opts = body.get("stream_options")
    if not isinstance(opts, dict):
        return False
    value = opts.get("continuous_usage_stats", False)
    if not isinstance(value, bool):
        raise _type_error("stream_options.continuous_usage_stats", "a boolean", value)
    return value


def _vllm_logprob_options(
    body: dict[str, Any], options: GenerationOptions, stream: bool, limits: Limits
) -> None:
    """prompt_logprobs and return_tokens_as_token_ids (vLLM's extensions; evaluation harnesses
    use them). Prompt logprobs come whole with the response, so not with a stream (as vLLM)."""
    options.prompt_logprobs = _integer(body, "prompt_logprobs", None, 0, limits.max_top_logprobs)
    if options.prompt_logprobs is not None:
        if stream:
            raise invalid(
                "'prompt_logprobs' is not available when 'stream' is true.",
                param="prompt_logprobs",
            )
        if options.beam is not None:
            raise invalid(
                "'prompt_logprobs' is not supported with beam search.", param="prompt_logprobs"
            )
    options.tokens_as_ids = _boolean(body, "return_tokens_as_token_ids", False)


def _common_options(body: dict[str, Any], limits: Limits) -> GenerationOptions:
    # OpenAI: `max_tokens` is deprecated in favor of `max_completion_tokens`; when both are sent
    # the latter is the bound (as vLLM does), but each is still checked as what it claims to be.
    legacy = _integer(body, "max_tokens", None, 1, limits.max_tokens)
    max_tokens = _integer(body, "max_completion_tokens", None, 1, limits.max_tokens)
    max_tokens_param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_tokens_param = legacy, "max_tokens"
    # OpenAI and vLLM bound seed to a signed 64-bit integer; past that is a 400 naming `seed`.
    seed = _integer(body, "seed", None, -(1 << 63), (1 << 63) - 1)
    if seed is not None and seed < 0:  # the executor takes uint64; keep the caller's bits
        seed &= (1 << 64) - 1
    cache_salt = _string(body, "cache_salt", "") or ""
    options = GenerationOptions(
        max_tokens=max_tokens,
        max_tokens_param=max_tokens_param,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        top_k=_integer(body, "top_k", 0, -1, 1 << 20) or 0,
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        n=_integer(body, "n", 1, 1, limits.max_n) or 1,
        stop=_stop(body, limits),
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 10.0),
        ignore_eos=_boolean(body, "ignore_eos", False),
        cache_salt=cache_salt,
        user=_string(body, "user", None),
        logit_bias=_logit_bias(body, limits),
    )
    options.beam = parse_beam(body, options.n, limits.max_beam_width)
    options.guide = parse_guide(body)
    if options.guide is not None and options.beam is not None:
        raise invalid(
            f"'{options.guide.param}' (structured output) does not work with beam search.",
            param=options.guide.param,
        )
    return options


def _logit_bias(body: dict[str, Any], limits: Limits) -> dict[int, float]:
    """OpenAI's logit_bias: an object from token ids (as strings: JSON keys) to biases in
    [-100, 100]."""
    value = body.get("logit_bias")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _type_error("logit_bias", "an object mapping token ids to numbers", value)
    if len(value) > limits.max_logit_bias:
        raise invalid(
            f"'logit_bias' has {len(value)} entries; at most {limits.max_logit_bias} are allowed.",
            param="logit_bias",
            code="invalid_value",
        )
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if token < 0 or str(token) != str(key).strip():
            raise invalid(
                f"Invalid key {key!r} in 'logit_bias': keys are token ids (non-negative integers).",
                param="logit_bias",
                code="invalid_value",
            )
        out[token] = _number({"logit_bias": bias}, "logit_bias", 0.0, -100.0, 100.0)
    return out


def _message_text(content: Any, where: str) -> str:
    """Plain text of a message's content: a string or an array of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise invalid(
                    f"Invalid content part at '{where}[{j}]': only text parts are supported.",
                    param=f"{where}[{j}]",
                    code="invalid_value",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _type_error(f"{where}[{j}].text", "a string", text)
            texts.append(text)
        return "".join(texts)
    raise _type_error(where, "a string or an array of content parts", content)


def _messages(body: dict[str, Any], limits: Limits) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if messages is None:
        raise invalid(
            "Missing required parameter: 'messages'.", param="messages", code="missing_required"
        )
    if not isinstance(messages, list):
        raise _type_error("messages", "an array", messages)
    if not messages:
        raise invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            param="messages",
            code="empty_array",
        )
    if len(messages) > limits.max_messages:
        raise invalid(
            f"Invalid 'messages': at most {limits.max_messages} messages are allowed.",
            param="messages",
            code="invalid_value",
        )
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _type_error(where, "an object", message)
        role = message.get("role")
        if not isinstance(role, str):
            raise _type_error(f"{where}.role", "a string", role)
        if role not in CHAT_ROLES:
            raise invalid(
                f"Invalid value for '{where}.role': {role!r}. Supported values are: "
                + ", ".join(repr(r) for r in CHAT_ROLES)
                + ".",
                param=f"{where}.role",
                code="invalid_value",
            )
        if "content" not in message and role != "assistant":
            raise invalid(
                f"Missing required parameter: '{where}.content'.",
                param=f"{where}.content",
                code="missing_required",
            )
        text = _message_text(message.get("content"), f"{where}.content")
        turn: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        if role == "assistant":
            calls = tool_calls_of(message, where)
            if calls:
                turn["tool_calls"] = calls
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(
                    f"Missing required parameter: '{where}.tool_call_id'.",
                    param=f"{where}.tool_call_id",
                    code="missing_required",
                )
            turn["tool_call_id"] = call_id
        out.append(turn)
    return out


def _reject_unsupported(body: dict[str, Any]) -> None:
    # The deprecated `functions` / `function_call`: clients send `tools` instead.
    for name in ("functions", "function_call"):
        if body.get(name):
            raise invalid(f"'{name}' is not supported by this server; use 'tools'.", param=name)
    _reject_unhonoured(body)


def _reject_unhonoured(body: dict[str, Any]) -> None:
    """Request-level scheduling knobs this server would otherwise ignore silently: a client that
    sets a deadline or a priority must hear that it does not hold, not assume it does."""
    for name in ("priority", "timeout"):
        if body.get(name) is not None:
            raise invalid(
                f"'{name}' is not supported by this server; remove it from the request.",
                param=name,
                code="unsupported_parameter",
            )


def parse_chat(body: dict[str, Any], limits: Limits) -> ChatRequest:
    model = _model(body)
    messages = _messages(body, limits)
    _reject_unsupported(body)
    stream = _boolean(body, "stream", False)
    options = _common_options(body, limits)
    options.logprobs = _boolean(body, "logprobs", False)
    top = _integer(body, "top_logprobs", 0, 0, limits.max_top_logprobs) or 0
    if top and not options.logprobs:
        raise invalid("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
    options.top_logprobs = top
    _vllm_logprob_options(body, options, stream, limits)
    tools = parse_tools(body)
    if tools is not None:
        if options.beam is not None:
            raise invalid("'tools' do not work with beam search.", param="tools")
        guide = tool_guide(tools)
        if guide is not None:
            if options.guide is not None:
                raise invalid(
                    f"'tool_choice' {tools.choice!r} and '{options.guide.param}' both constrain "
                    "the output; send one of them.",
                    param="tool_choice",
                )
            options.guide = guide
    return ChatRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=_stream_options(body, stream),
        options=options,
        continuous_usage=_continuous_usage(body),
        tools=tools,
    )


def _prompt(body: dict[str, Any]) -> str | list[int]:
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid(
            "Missing required parameter: 'prompt'.", param="prompt", code="missing_required"
        )
    # A one-element batch is the same request; real batches would multiplex choices across
    # prompts, which this server does not do.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise invalid("Invalid 'prompt': empty string.", param="prompt", code="invalid_value")
        return prompt
    if isinstance(prompt, list):  # 5.0 is an integer in JSON, as for every integer field
        prompt = [int(t) if isinstance(t, float) and t.is_integer() else t for t in prompt]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        raise invalid(
            "Batched prompts are not supported; send one prompt per request.", param="prompt"
        )
    raise _type_error("prompt", "a string or an array of token ids", prompt)


def parse_completion(body: dict[str, Any], limits: Limits) -> CompletionRequest:
    model = _model(body)
    prompt = _prompt(body)
    _reject_unhonoured(body)
    stream = _boolean(body, "stream", False)
    options = _common_options(body, limits)
    if _string(body, "suffix", None):
        raise invalid("'suffix' (insertion) is not supported by this server.", param="suffix")
    best_of = _integer(body, "best_of", None, 1, limits.max_n)
    if best_of is not None and best_of != options.n:
        # best_of > n would generate more choices and return the best by log-probability.
        raise invalid(
            f"'best_of' ({best_of}) other than 'n' ({options.n}) is not supported by this server.",
            param="best_of",
        )
    top = _integer(body, "logprobs", None, 0, min(5, limits.max_top_logprobs))
    options.logprobs = top is not None
    options.top_logprobs = top or 0
    _vllm_logprob_options(body, options, stream, limits)
    echo = _boolean(body, "echo", False)
    if echo and options.logprobs:
        if options.beam is not None:
            raise invalid("'echo' with 'logprobs' is not supported with beam search.", param="echo")
        options.echo_logprobs = True
    return CompletionRequest(
        model=model,
        prompt=prompt,
        stream=stream,
        include_usage=_stream_options(body, stream),
        echo=echo,
        options=options,
        continuous_usage=_continuous_usage(body),
    )


def check_logit_bias(options: GenerationOptions, vocab_size: int) -> None:
    """A 400 naming `logit_bias` and every id in it past the model's vocabulary (not just the
    first), so the client fixes them all in one go."""
    bad = sorted(t for t in options.logit_bias if t >= vocab_size)
    if bad:
        ids = ", ".join(str(t) for t in bad)
        raise invalid(
            f"Invalid 'logit_bias': token ids {ids} are out of range; this model's vocabulary "
            f"has {vocab_size} tokens (ids 0 to {vocab_size - 1}).",
            param="logit_bias",
            code="invalid_value",
        )


def check_context(
    options: GenerationOptions, num_prompt_tokens: int, max_model_len: int, capacity: int = 0
) -> int:
    """The max_tokens to ask for, or a 400 when the prompt (plus max_tokens) does not fit.

    `capacity` is the executor's whole KV pool in tokens: a sequence longer than that could
    never run, so it bounds the context too (a small CPU pool is often below max_model_len).
    """
    if capacity:
        max_model_len = min(max_model_len, capacity)
    if num_prompt_tokens >= max_model_len:
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt has {num_prompt_tokens} tokens, which leaves no room for a completion.",
            param="messages",
            code="context_length_exceeded",
        )
    room = max_model_len - num_prompt_tokens
    if options.max_tokens is None:
        return room
    if options.max_tokens > room:
        raise invalid(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {num_prompt_tokens + options.max_tokens} tokens ({num_prompt_tokens} in "
            f"the prompt, {options.max_tokens} for the completion). Please reduce the prompt or "
            "max_tokens.",
            param=options.max_tokens_param,
            code="context_length_exceeded",
        )
    return options.max_tokens
