"""Tool calls out of the model's text: the parsers of the tool-call syntaxes (Hermes/Qwen
`<tool_call>` JSON, Llama 3.1/3.2 JSON, Mistral `[TOOL_CALLS]`), and the per-choice streamer
that turns text deltas into OpenAI's tool-call deltas.

The parser is chosen from the chat template (`parser_for_template`), `--tool-call-parser`
overrides it. A constrained call (tool_choice `required` or a named function, tools.py) needs
no parser: its text is the JSON the grammar allowed.

Streaming follows OpenAI: a call's first delta carries index, id, type and the function name
with empty arguments, the next ones argument fragments; the final chunk's finish_reason is
`tool_calls`. Text before a call is content, sent as it comes; from the call's start marker on,
the text is held until the call can be parsed (a named call streams its arguments as they come).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pagemesh.services.gateway.tools import new_call_id

PARSERS = ("hermes", "llama3_json", "mistral")

_HERMES_START = "<tool_call>"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_MISTRAL_START = "[TOOL_CALLS]"
_LLAMA_TAG = "<|python_tag|>"


def parser_for_template(template: str, override: str = "") -> str:
    """The tool-call syntax the model's template teaches it (hermes when it teaches none: the
    gateway then describes the tools in the Hermes format itself, tools.py)."""
    if override:
        return override
    if _MISTRAL_START in template:
        return "mistral"
    if _LLAMA_TAG in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


@dataclass(slots=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


def _call(obj: Any, args_key: str = "arguments") -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("parameters", obj.get("arguments", {})))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in `text`, one after the other (separated by whitespace or `;`), or
    None when it is not only JSON."""
    decoder = json.JSONDecoder()
    values = []
    i = 0
    text = text.strip()
    while i < len(text):
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        values.append(value)
        i = end
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
    return values


def parse_calls(parser: str, text: str) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a whole output. No call: the text is the content."""
    if parser == "hermes":
        start = text.find(_HERMES_START)
        if start < 0:
            return text, []
        calls = []
        for m in _HERMES_CALL.finditer(text, start):
            values = _json_values(m.group(1))
            call = _call(values[0]) if values and len(values) == 1 else None
            if call is None:
                return text, []
            calls.append(call)
        content = text[:start].strip()
        return (content or None), calls
    if parser == "mistral":
        start = text.find(_MISTRAL_START)
        body = text[start + len(_MISTRAL_START) :] if start >= 0 else text
        if start < 0 and not body.lstrip().startswith("[{"):
            return text, []
        values = _json_values(body)
        if not values or not isinstance(values[0], list):
            return text, []
        calls = [c for v in values[0] if (c := _call(v)) is not None]
        if len(calls) != len(values[0]):
            return text, []
        content = text[:start].strip() if start > 0 else ""
        return (content or None), calls
    if parser == "llama3_json":
        body = text.replace(_LLAMA_TAG, "").strip()
        if not body.startswith("{"):
            return text, []
        values = _json_values(body)
        calls = [c for v in values or [] if (c := _call(v, "parameters")) is not None]
        if not values or len(calls) != len(values):
            return text, []
        return None, calls
    raise ValueError(f"unknown tool-call parser {parser!r}")


def constrained_calls(mode: str, name: str, text: str) -> list[ParsedCall]:
    """The calls of a constrained output: a named function's arguments, or `required`'s
    array of {name, arguments}. Text cut short (max_tokens) gives what parses."""
    values = _json_values(text)
    if not values:
        if mode == "required":  # cut short: the calls written in full
            return [c for v in _array_prefix(text) if (c := _call(v)) is not None]
        return []
    if mode == "function":
        args = values[0]
        return (
            [ParsedCall(name, json.dumps(args, ensure_ascii=False))]
            if isinstance(args, dict)
            else []
        )
    if not isinstance(values[0], list):
        return []
    return [c for v in values[0] if (c := _call(v)) is not None]


def _array_prefix(text: str) -> list[Any]:
    """The whole items of a JSON array cut short (max_tokens): `[{...}, {...}, {"na` gives
    the first two."""
    decoder = json.JSONDecoder()
    items: list[Any] = []
    i = text.find("[") + 1
    if i == 0:
        return items
    while i < len(text):
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
        items.append(value)
    return items


def tool_call_objects(calls: list[ParsedCall], ids: list[str]) -> list[dict[str, Any]]:
    return [
        {"id": i, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c, i in zip(calls, ids, strict=True)
    ]


def _held_prefix(text: str, marker: str) -> int:
    """How many trailing characters of `text` could begin `marker` (held back from content)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


@dataclass(slots=True)
class ToolStreamer:
    """One choice's streamed output in tool mode: text deltas in, chat delta objects out."""

    mode: str  # "auto" | "required" | "function"
    parser: str
    function: str = ""  # the named function
    _text: str = ""  # everything so far
    _sent: int = 0  # characters of _text sent as content (auto)
    _in_calls: bool = False  # auto: a call has started: hold the rest
    _named_started: bool = False
    ids: list[str] = field(default_factory=list)
    calls: list[ParsedCall] = field(default_factory=list)

    def push(self, text: str) -> list[dict[str, Any]]:
        self._text += text
        if self.mode == "function":
            deltas = []
            if not self._named_started:
                self._named_started = True
                self.ids = [new_call_id()]
                deltas.append(_call_delta(0, self.ids[0], self.function, ""))
            if text:
                deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": text}}]})
            return deltas
        if self.mode == "required" or self._in_calls:
            return []
        return self._auto_content()

    def _auto_content(self) -> list[dict[str, Any]]:
        text = self._text
        if self.parser == "hermes":
            start = text.find(_HERMES_START, self._sent)
            if start >= 0:
                self._in_calls = True
                end = start
            else:
                end = len(text) - _held_prefix(text, _HERMES_START)
        else:
            # Llama 3 and Mistral write a call as the whole output: JSON (or the tag) first.
            head = text.lstrip()
            marker = _MISTRAL_START if self.parser == "mistral" else _LLAMA_TAG
            if self._sent == 0:
                if head.startswith(("{", "[", marker)):
                    self._in_calls = True
                    return []
                if not head or marker.startswith(head):
                    return []  # nothing yet, or it could still become the marker
            end = len(text)
        if end <= self._sent:
            return []
        piece = text[self._sent : end]
        self._sent = end
        return [{"content": piece}]

    def finish(self) -> list[dict[str, Any]]:
        """At the choice's end: the held text as calls (or as content when it does not parse)."""
        if self.mode == "function":
            if not self._named_started:
                self._named_started = True
                self.ids = [new_call_id()]
                self.calls = [ParsedCall(self.function, self._text)]
                return [_call_delta(0, self.ids[0], self.function, self._text)]
            self.calls = [ParsedCall(self.function, self._text)]
            return []
        if self.mode == "required":
            calls = constrained_calls("required", "", self._text)
            content = None if calls else self._text
        else:
            held = self._text[self._sent :]
            content, calls = parse_calls(self.parser, held)
            if not calls:
                content = held
        self.calls = calls
        self.ids = [new_call_id() for _ in calls]
        deltas: list[dict[str, Any]] = []
        if content:
            deltas.append({"content": content})
        for i, (call, call_id) in enumerate(zip(calls, self.ids, strict=True)):
            deltas.append(_call_delta(i, call_id, call.name, ""))
            deltas.append({"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]})
        return deltas


def _call_delta(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {
        "tool_calls": [
            {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ]
    }
