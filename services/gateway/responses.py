"""OpenAI response objects: chat.completion(.chunk) and text_completion, field for field."""

from __future__ import annotations

import codecs
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagemesh.services.gateway.generation import ChoiceDelta, Generation, TokenInfo
from pagemesh.services.gateway.prompt_logprobs import (
    PromptView,
    echo_logprobs,
    join_logprobs,
    token_label,
    vllm_prompt_logprobs,
)
from pagemesh.services.gateway.tool_parsers import (
    ParsedCall,
    ToolStreamer,
    constrained_calls,
    parse_calls,
    tool_call_objects,
)
from pagemesh.services.gateway.tools import new_call_id

SYSTEM_FINGERPRINT = "pagemesh"


@dataclass(slots=True, frozen=True)
class ToolMode:
    """How a chat request's output becomes tool calls: `mode` auto (parsed with `parser`),
    required or function (constrained: the text is the calls' JSON; `function` the named one)."""

    mode: str
    parser: str
    function: str = ""

    def parse(self, text: str) -> tuple[str | None, list[ParsedCall]]:
        if self.mode == "auto":
            return parse_calls(self.parser, text)
        if self.mode == "function":
            return None, [ParsedCall(self.function, text)]
        calls = constrained_calls(self.mode, self.function, text)
        return (None if calls else text), calls


def tool_finish(reason: str | None, calls: list[ParsedCall]) -> str | None:
    """OpenAI's finish_reason for a choice that called tools: `tool_calls`, unless it was cut
    (length) first."""
    return "tool_calls" if calls and reason == "stop" else reason


@dataclass(slots=True)
class ResponseMeta:
    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseMeta:
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model)


def usage(gen: Generation) -> dict[str, Any]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": gen.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _shown(text: str, raw: bytes) -> tuple[str, list[int]]:
    """A chat logprob entry's `token` and `bytes`. OpenAI: bytes are "the UTF-8 bytes
    representation of the token. Useful in instances where characters are represented by
    multiple tokens and their byte representations must be combined to generate the correct
    text representation". So `bytes` are the token's own (concatenated, they rebuild the text),
    and `token` is those bytes as text, a byte that is only part of a character written as
    `\\xNN` (as OpenAI shows such tokens) rather than U+FFFD."""
    if not raw:  # no byte form known: the text's own bytes
        return text, list(text.encode("utf-8", errors="replace"))
    return raw.decode("utf-8", errors="backslashreplace"), list(raw)


def _entry(text: str, raw: bytes, logprob: float, label: str = "") -> dict[str, Any]:
    """`label`: return_tokens_as_token_ids' "token_id:<id>" in place of the text (the bytes
    stay the token's own, so the text can still be rebuilt)."""
    token, raw_list = _shown(text, raw)
    return {"token": label or token, "logprob": logprob, "bytes": raw_list}


def chat_logprobs(tokens: list[TokenInfo], as_ids: bool = False) -> dict[str, Any]:
    content = []
    for t in tokens:
        top_bytes = t.top_bytes or [b""] * len(t.top)
        top_ids = t.top_ids if as_ids else [-1] * len(t.top)
        entry = _entry(t.token, t.token_bytes, t.logprob, token_label(t.token_id) if as_ids else "")
        entry["top_logprobs"] = [
            _entry(s, raw, lp, token_label(i) if as_ids else "")
            for (s, lp), raw, i in zip(t.top, top_bytes, top_ids, strict=True)
        ]
        content.append(entry)
    return {"content": content, "refusal": None}


class TextOffsets:
    """One choice's `text_offset`s: where each token starts in the returned text, in
    characters. A token that is part of a character (an emoji over three tokens) starts at that
    character, so "🐵🐵" over six tokens has offsets 0,0,0,1,1,1 and none runs past the text."""

    def __init__(self, start: int) -> None:
        self.chars = start  # characters before the next token: the echo, then whole ones
        # Bytes of a character not complete yet wait here until it is.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, t: TokenInfo) -> int:
        offset = self.chars
        raw = t.token_bytes or t.token.encode("utf-8")
        self.chars += len(self._utf8.decode(raw))
        return offset


def completion_logprobs(
    tokens: list[TokenInfo], offsets: TextOffsets, text_end: int, as_ids: bool = False
) -> dict[str, Any]:
    """`text_end`: the returned text's length so far; an offset never goes past it (the tokens
    of a stop string the text was cut at count no characters in it). `as_ids`: vLLM's
    return_tokens_as_token_ids."""
    if as_ids:
        shown = [token_label(t.token_id) for t in tokens]
        tops = [
            {token_label(i): lp for (_, lp), i in zip(t.top, t.top_ids, strict=True)}
            for t in tokens
        ]
    else:
        shown = [t.token for t in tokens]
        tops = [dict(t.top) for t in tokens]
    return {
        "tokens": shown,
        "token_logprobs": [t.logprob for t in tokens],
        # logprobs: 0 still gives each position its entry: the sampled token's own logprob
        # (OpenAI and vLLM), not an empty object.
        "top_logprobs": [
            top or {label: t.logprob} for top, label, t in zip(tops, shown, tokens, strict=True)
        ],
        "text_offset": [min(offsets.take(t), text_end) for t in tokens],
    }


class _Extensions:
    """What both formatters show beyond OpenAI's fields, set by the handler once it knows:
    the prompt (echo, prompt_logprobs, return_tokens_as_token_ids) and, for vLLM's
    continuous_usage_stats, the usage so far on every chunk."""

    prompt: PromptView | None = None
    live_usage: Callable[[], dict[str, Any]] | None = None

    @property
    def as_ids(self) -> bool:
        return self.prompt is not None and self.prompt.as_ids

    def _chunk_usage(self) -> dict[str, Any] | None:
        return self.live_usage() if self.live_usage is not None else None


class ChatFormatter(_Extensions):
    """chat.completion.chunk events for a stream, or one chat.completion at the end."""

    def __init__(
        self,
        meta: ResponseMeta,
        include_usage: bool,
        want_logprobs: bool,
        tools: ToolMode | None = None,
    ) -> None:
        self.meta = meta
        self.include_usage = include_usage
        self.want_logprobs = want_logprobs
        self.tools = tools
        self._streamers: dict[int, ToolStreamer] = {}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.meta.id,
            "object": "chat.completion.chunk",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if self.include_usage or self.live_usage is not None:
            # OpenAI sends null on every chunk but the last; vLLM's continuous_usage_stats
            # the usage so far
            chunk["usage"] = self._chunk_usage()
        return chunk

    def role_chunks(self, n: int) -> list[dict[str, Any]]:
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(n)
        ]

    def _tool_chunks(self, delta: ChoiceDelta, tools: ToolMode) -> list[dict[str, Any]]:
        st = self._streamers.get(delta.index)
        if st is None:
            st = self._streamers[delta.index] = ToolStreamer(
                tools.mode, tools.parser, tools.function
            )
        deltas = st.push(delta.text) if delta.text else []
        finish = delta.finish_reason
        if finish is not None:
            deltas += st.finish()
            finish = tool_finish(finish, st.calls)
        lp = (
            chat_logprobs(delta.logprobs, self.as_ids)
            if self.want_logprobs and delta.logprobs
            else None
        )
        chunks = []
        for d in deltas:
            choice = {"index": delta.index, "delta": d, "logprobs": lp, "finish_reason": None}
            chunks.append(self._chunk([choice]))
            lp = None
        if finish is not None:
            choice = {"index": delta.index, "delta": {}, "logprobs": None, "finish_reason": finish}
            chunks.append(self._chunk([choice]))
        return chunks

    def delta_chunks(self, delta: ChoiceDelta) -> list[dict[str, Any]]:
        if self.tools is not None:
            return self._tool_chunks(delta, self.tools)
        chunks = []
        if delta.text or delta.logprobs:
            lp = chat_logprobs(delta.logprobs, self.as_ids) if self.want_logprobs else None
            chunks.append(
                self._chunk(
                    [
                        {
                            "index": delta.index,
                            "delta": {"content": delta.text},
                            "logprobs": lp,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        if delta.finish_reason is not None:
            chunks.append(
                self._chunk(
                    [
                        {
                            "index": delta.index,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": delta.finish_reason,
                        }
                    ]
                )
            )
        return chunks

    def usage_chunk(self, gen: Generation) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = usage(gen)
        return chunk

    def completion(self, gen: Generation, logprobs: list[list[TokenInfo]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.meta.id,
            "object": "chat.completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                self._choice(i, text, gen.finish_reasons[i], logprobs[i])
                for i, text in enumerate(gen.texts())
            ],
            "usage": usage(gen),
        }
        if self.prompt is not None and self.prompt.field_wanted:
            body["prompt_logprobs"] = vllm_prompt_logprobs(self.prompt)  # (vLLM: top level)
        return body

    def _choice(
        self, i: int, text: str, finish: str | None, logprobs: list[TokenInfo]
    ) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if self.tools is not None:
            content, calls = self.tools.parse(text)
            message["content"] = content
            if calls:
                ids = [new_call_id() for _ in calls]
                message["tool_calls"] = tool_call_objects(calls, ids)
            finish = tool_finish(finish, calls)
        return {
            "index": i,
            "message": message,
            "logprobs": chat_logprobs(logprobs, self.as_ids) if self.want_logprobs else None,
            "finish_reason": finish,
        }


class CompletionFormatter(_Extensions):
    """text_completion events for a stream, or one text_completion at the end."""

    def __init__(
        self, meta: ResponseMeta, include_usage: bool, want_logprobs: bool, echo: str
    ) -> None:
        self.meta = meta
        self.include_usage = include_usage
        self.want_logprobs = want_logprobs
        self.echo = echo
        self._offsets: dict[int, int] = {}  # characters sent per choice, echo included
        self._text_offsets: dict[int, TextOffsets] = {}
        self._echoed: set[int] = set()

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.meta.id,
            "object": "text_completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if self.include_usage or self.live_usage is not None:
            chunk["usage"] = self._chunk_usage()
        return chunk

    def role_chunks(self, n: int) -> list[dict[str, Any]]:
        # No role in completions; echo sends the prompt as each choice's first text.
        if not self.echo:
            return []
        self._echoed = set(range(n))
        lp = self._echo_logprobs()
        return [
            self._chunk([{"text": self.echo, "index": i, "logprobs": lp, "finish_reason": None}])
            for i in range(n)
        ]

    def _echo_logprobs(self) -> dict[str, Any] | None:
        """The echoed prompt's logprobs when logprobs are wanted (prompt_logprobs.py)."""
        if not (self.echo and self.want_logprobs and self.prompt is not None):
            return None
        return echo_logprobs(self.prompt, self.echo, TextOffsets(0))

    def delta_chunks(self, delta: ChoiceDelta) -> list[dict[str, Any]]:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return []
        offset = self._offsets.get(delta.index, len(self.echo))
        self._offsets[delta.index] = offset + len(delta.text)
        lp = None
        if self.want_logprobs:
            counter = self._text_offsets.setdefault(delta.index, TextOffsets(len(self.echo)))
            lp = completion_logprobs(
                delta.logprobs, counter, self._offsets[delta.index], self.as_ids
            )
        return [
            self._chunk(
                [
                    {
                        "text": delta.text,
                        "index": delta.index,
                        "logprobs": lp,
                        "finish_reason": delta.finish_reason,
                    }
                ]
            )
        ]

    def usage_chunk(self, gen: Generation) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = usage(gen)
        return chunk

    def completion(self, gen: Generation, logprobs: list[list[TokenInfo]]) -> dict[str, Any]:
        echo_lp = self._echo_logprobs()
        prompt_lp = None
        if self.prompt is not None and self.prompt.field_wanted:
            prompt_lp = vllm_prompt_logprobs(self.prompt)
        choices = []
        for i, text in enumerate(gen.texts()):
            lp = None
            if self.want_logprobs:
                end = len(self.echo + text)
                lp = completion_logprobs(logprobs[i], TextOffsets(len(self.echo)), end, self.as_ids)
                if echo_lp is not None:
                    lp = join_logprobs(echo_lp, lp)
            choice = {
                "text": self.echo + text,
                "index": i,
                "logprobs": lp,
                "finish_reason": gen.finish_reasons[i],
            }
            if prompt_lp is not None:
                choice["prompt_logprobs"] = prompt_lp  # (vLLM: per choice)
            choices.append(choice)
        return {
            "id": self.meta.id,
            "object": "text_completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": usage(gen),
        }
