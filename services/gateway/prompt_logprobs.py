"""The prompt's logprobs in responses: completions' `echo` with `logprobs` (the prompt's tokens
lead the choice's logprobs, the first with a null logprob, as the legacy OpenAI API and vLLM
return them; evaluation harnesses score text this way) and vLLM's `prompt_logprobs` field.
Also vLLM's `return_tokens_as_token_ids`: a token shown as "token_id:<id>", so a client that
cannot detokenize still knows exactly which token it was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pagemesh.services.gateway.generation import TokenInfo


def token_label(token_id: int) -> str:
    """vLLM's return_tokens_as_token_ids form of a token."""
    return f"token_id:{token_id}"


@dataclass(slots=True)
class PromptView:
    """What a formatter needs to show the prompt's tokens: their ids and the tokenizer's text
    of one token; `scored`: the executor's entries for tokens 1.. (Generation.prompt_logprobs)."""

    ids: list[int]
    token_text: Callable[[int], str]
    token_bytes: Callable[[int], bytes]
    scored: list[TokenInfo] | None = None
    as_ids: bool = False
    # The response carries vLLM's prompt_logprobs (the request asked for it by name).
    field_wanted: bool = False
    echo_logprobs: bool = False  # completions: echo with logprobs

    def shown(self, token_id: int, text: str) -> str:
        return token_label(token_id) if self.as_ids else text


class Offsets(Protocol):
    def take(self, t: TokenInfo) -> int: ...


def echo_logprobs(view: PromptView, echo: str, offsets: Offsets) -> dict[str, Any]:
    """completions' logprobs for the echoed prompt: every prompt token, the first with null
    logprob and null top_logprobs (nothing precedes it), text_offset in characters of `echo`
    (responses.TextOffsets: a token inside a character starts at that character)."""
    scored = view.scored or []
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    for j, token_id in enumerate(view.ids):
        text = view.token_text(token_id)
        tokens.append(view.shown(token_id, text))
        where = offsets.take(TokenInfo(text, 0.0, [], view.token_bytes(token_id)))
        text_offset.append(min(where, len(echo)))
        if j == 0 or j - 1 >= len(scored):
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        info = scored[j - 1]
        token_logprobs.append(info.logprob)
        # Its own entry first (logprobs: 0 still has one), then the alternatives.
        top = {tokens[-1]: info.logprob}
        for (alt_text, lp), alt_id in zip(info.top, info.top_ids, strict=True):
            top[view.shown(alt_id, alt_text)] = lp
        top_logprobs.append(top)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


def join_logprobs(head: dict[str, Any], tail: dict[str, Any] | None) -> dict[str, Any]:
    """The echoed prompt's logprobs followed by the completion's."""
    if tail is None:
        return head
    return {k: head[k] + tail[k] for k in head}


def vllm_prompt_logprobs(view: PromptView) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: null for the first prompt token, then per token a map from
    token id (a JSON key) to {logprob, rank, decoded_token}: the prompt's own token with its
    rank in the distribution, and the top alternatives (rank 1, 2, ...)."""
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for info in view.scored or []:
        entry = {
            str(info.token_id): {
                "logprob": info.logprob,
                "rank": info.rank,
                "decoded_token": view.shown(info.token_id, info.token),
            }
        }
        for rank, ((text, lp), alt_id) in enumerate(zip(info.top, info.top_ids, strict=True), 1):
            entry.setdefault(
                str(alt_id),
                {"logprob": lp, "rank": rank, "decoded_token": view.shown(alt_id, text)},
            )
        out.append(entry)
    return out
