"""OpenAI response objects: chat.completion(.chunk) and text_completion, field for field."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from pagemesh.services.gateway.generation import ChoiceDelta, Generation, TokenInfo

SYSTEM_FINGERPRINT = "pagemesh"


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


def _token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: list[TokenInfo]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": _token_bytes(t.token),
                "top_logprobs": [
                    {"token": s, "logprob": lp, "bytes": _token_bytes(s)} for s, lp in t.top
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: list[TokenInfo], offset: int) -> dict[str, Any]:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [dict(t.top) for t in tokens],
        "text_offset": offsets,
    }


class ChatFormatter:
    """chat.completion.chunk events for a stream, or one chat.completion at the end."""

    def __init__(self, meta: ResponseMeta, include_usage: bool, want_logprobs: bool) -> None:
        self.meta = meta
        self.include_usage = include_usage
        self.want_logprobs = want_logprobs

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.meta.id,
            "object": "chat.completion.chunk",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None  # OpenAI sends null on every chunk but the last
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

    def delta_chunks(self, delta: ChoiceDelta) -> list[dict[str, Any]]:
        chunks = []
        if delta.text or delta.logprobs:
            lp = chat_logprobs(delta.logprobs) if self.want_logprobs else None
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
        return {
            "id": self.meta.id,
            "object": "chat.completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": chat_logprobs(logprobs[i]) if self.want_logprobs else None,
                    "finish_reason": gen.finish_reasons[i],
                }
                for i, text in enumerate(gen.texts())
            ],
            "usage": usage(gen),
        }


class CompletionFormatter:
    """text_completion events for a stream, or one text_completion at the end."""

    def __init__(
        self, meta: ResponseMeta, include_usage: bool, want_logprobs: bool, echo: str
    ) -> None:
        self.meta = meta
        self.include_usage = include_usage
        self.want_logprobs = want_logprobs
        self.echo = echo
        self._offsets: dict[int, int] = {}
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
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def role_chunks(self, n: int) -> list[dict[str, Any]]:
        # No role in completions; echo sends the prompt as each choice's first text.
        if not self.echo:
            return []
        self._echoed = set(range(n))
        return [
            self._chunk([{"text": self.echo, "index": i, "logprobs": None, "finish_reason": None}])
            for i in range(n)
        ]

    def delta_chunks(self, delta: ChoiceDelta) -> list[dict[str, Any]]:
        if not delta.text and delta.finish_reason is None and not delta.logprobs:
            return []
        offset = self._offsets.get(delta.index, len(self.echo))
        lp = completion_logprobs(delta.logprobs, offset) if self.want_logprobs else None
        self._offsets[delta.index] = offset + len(delta.text)
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
        return {
            "id": self.meta.id,
            "object": "text_completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "text": self.echo + text,
                    "index": i,
                    "logprobs": (
                        completion_logprobs(logprobs[i], len(self.echo))
                        if self.want_logprobs
                        else None
                    ),
                    "finish_reason": gen.finish_reasons[i],
                }
                for i, text in enumerate(gen.texts())
            ],
            "usage": usage(gen),
        }
