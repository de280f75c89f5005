"""Tool calling on the request side: `tools`, `tool_choice` and `parallel_tool_calls` checked
(a 400 naming the parameter), the conversation's tool turns made renderable by the model's chat
template, and the guide that makes `required` and named calls always valid.

- `auto`: the model decides; its tool-call syntax is parsed out of the text (tool_parsers.py).
- `required`: the output is constrained to a JSON array of calls, each `{"name": <one of the
  tools>, "arguments": <that tool's parameters>}` (one call unless parallel_tool_calls).
- a named function: the output is constrained to that function's parameters; it is the call's
  arguments.
- `none`: the tools are shown to the model but no call is parsed.

A chat template that knows tools (it mentions `tools`) gets them as `tools=`; one that does not
(SmolLM2's) gets them described in the system prompt, in the Hermes format its parser reads.
Assistant turns carrying `tool_calls` are written the way the model writes calls when the
template does not render `tool_calls` itself.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.gateway.errors import invalid
from pagemesh.services.gateway.structured import GuideOptions, check_schema

MAX_TOOLS = 128


@dataclass(slots=True)
class ToolOptions:
    tools: list[dict[str, Any]]  # OpenAI tool objects, normalised
    choice: str  # "none" | "auto" | "required" | "function"
    function: str = ""  # the named function when choice == "function"
    parallel: bool = True
    names: list[str] = field(default_factory=list)

    def parameters(self, name: str) -> dict[str, Any]:
        for t in self.tools:
            if t["function"]["name"] == name:
                return t["function"].get("parameters") or {"type": "object", "properties": {}}
        raise KeyError(name)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _tool(value: Any, i: int) -> dict[str, Any]:
    where = f"tools[{i}]"
    if not isinstance(value, dict):
        raise invalid(f"Invalid type for '{where}': expected an object.", param=where)
    if value.get("type", "function") != "function":
        raise invalid(
            f"Invalid value for '{where}.type': only 'function' tools are supported.",
            param=f"{where}.type",
            code="invalid_value",
        )
    fn = value.get("function")
    if not isinstance(fn, dict):
        raise invalid(
            f"Missing required parameter: '{where}.function'.",
            param=f"{where}.function",
            code="missing_required",
        )
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise invalid(
            f"Missing required parameter: '{where}.function.name'.",
            param=f"{where}.function.name",
            code="missing_required",
        )
    if not all(c.isalnum() or c in "_-" for c in name) or len(name) > 64:
        raise invalid(
            f"Invalid '{where}.function.name': {name!r}; names are 1 to 64 letters, digits, "
            "underscores and dashes.",
            param=f"{where}.function.name",
            code="invalid_value",
        )
    params = fn.get("parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise invalid(
                f"Invalid type for '{where}.function.parameters': expected a JSON schema object.",
                param=f"{where}.function.parameters",
                code="invalid_type",
            )
        check_schema(params, f"{where}.function.parameters")
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise invalid(
            f"Invalid type for '{where}.function.description': expected a string.",
            param=f"{where}.function.description",
            code="invalid_type",
        )
    out: dict[str, Any] = {"name": name}
    if desc:
        out["description"] = desc
    out["parameters"] = params if params is not None else {"type": "object", "properties": {}}
    return {"type": "function", "function": out}


def parse_tools(body: dict[str, Any]) -> ToolOptions | None:
    """`tools`, `tool_choice`, `parallel_tool_calls`; None when the request has no tools."""
    raw = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid(
            "Invalid type for 'parallel_tool_calls': expected a boolean.",
            param="parallel_tool_calls",
            code="invalid_type",
        )
    if raw is None or raw == []:
        if choice is not None and choice != "none":
            raise invalid(
                "'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice"
            )
        return None
    if not isinstance(raw, list):
        raise invalid("Invalid type for 'tools': expected an array.", param="tools")
    if len(raw) > MAX_TOOLS:
        raise invalid(f"'tools' has more than {MAX_TOOLS} tools.", param="tools")
    tools = [_tool(t, i) for i, t in enumerate(raw)]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise invalid("Tool names must be unique within 'tools'.", param="tools")
    opts = ToolOptions(tools, "auto", parallel=parallel is not False, names=names)
    if choice is None or choice == "auto":
        return opts
    if choice in ("none", "required"):
        opts.choice = choice
        return opts
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise invalid(
                "Invalid 'tool_choice': expected 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": ...}}.',
                param="tool_choice",
                code="invalid_value",
            )
        if name not in names:
            raise invalid(
                f"Invalid 'tool_choice': function {name!r} is not among 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
        opts.choice, opts.function = "function", name
        return opts
    raise invalid(
        "Invalid 'tool_choice': expected 'none', 'auto', 'required' or a function.",
        param="tool_choice",
        code="invalid_value",
    )


def tool_guide(opts: ToolOptions) -> GuideOptions | None:
    """The grammar that makes `required` and named calls valid; None for auto and none."""
    if opts.choice == "function":
        return GuideOptions(
            pb.GUIDE_JSON_SCHEMA, json.dumps(opts.parameters(opts.function)), "tool_choice"
        )
    if opts.choice != "required":
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": opts.parameters(name)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name in opts.names
    ]
    array: dict[str, Any] = {"type": "array", "items": {"anyOf": calls}, "minItems": 1}
    if not opts.parallel:
        array["maxItems"] = 1
    return GuideOptions(pb.GUIDE_JSON_SCHEMA, json.dumps(array), "tool_choice")


# -- the conversation -----------------------------------------------------------------------


def tool_calls_of(message: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`, checked: id, type function, name, arguments (a JSON
    string, as OpenAI sends them back)."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list):
        raise invalid(f"Invalid type for '{where}.tool_calls': expected an array.", param=where)
    out = []
    for j, call in enumerate(calls):
        w = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(
                f"Missing required parameter: '{w}.function.name'.",
                param=f"{w}.function.name",
                code="missing_required",
            )
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                raise invalid(
                    f"Invalid '{w}.function.arguments': not valid JSON.",
                    param=f"{w}.function.arguments",
                    code="invalid_value",
                ) from None
        call_id = call.get("id")
        out.append(
            {
                "id": call_id if isinstance(call_id, str) else new_call_id(),
                "type": "function",
                "function": {"name": fn["name"], "arguments": args},
            }
        )
    return out


def _hermes_call(call: dict[str, Any]) -> str:
    fn = call["function"]
    payload = {"name": fn["name"], "arguments": fn["arguments"]}
    return f"<tool_call>\n{json.dumps(payload, ensure_ascii=False)}\n</tool_call>"


def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The Hermes tool prompt, for templates that do not render tools themselves."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )


def template_knows_tools(template: str) -> bool:
    return "tools" in template


def template_knows_tool_calls(template: str) -> bool:
    return "tool_calls" in template


def prepare_messages(
    messages: list[dict[str, Any]], tools: ToolOptions | None, template: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages for the chat template, tools= for it or None). A template that renders
    neither tools nor tool calls gets plain-text turns: the tools in the system prompt,
    assistant calls written as the model writes them, tool results as `tool` turns."""
    knows_calls = template_knows_tool_calls(template)
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls and not knows_calls:
            text = m.get("content") or ""
            written = "\n".join(_hermes_call(c) for c in calls)
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + written})
        elif m["role"] == "tool" and not knows_calls:
            out.append({"role": "tool", "content": m.get("content") or ""})
        else:
            out.append(m)
    if tools is None:
        return out, None
    if template_knows_tools(template):
        return out, tools.tools
    prompt = tools_system_prompt(tools.tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None
