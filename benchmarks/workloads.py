"""The benchmark workloads of DESIGN.md, as chat conversations with exact token lengths.

Prompts are built from words that the model's tokenizer encodes as one token each (" the",
" house", ...), so a prompt of N words is N tokens plus the chat template's own. Each workload
is a list of `Conversation`s; single-turn workloads have one turn each. Fixed seeds throughout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

WORKLOADS = ("mixed", "shared_prefix", "multi_turn", "parallel")
MAX_TOKENS_CAP: int | None = None  # smoke runs cap every output length


@dataclass(slots=True)
class Turn:
    user: str
    max_tokens: int

    def __post_init__(self) -> None:
        if MAX_TOKENS_CAP is not None:
            self.max_tokens = min(self.max_tokens, MAX_TOKENS_CAP)


@dataclass(slots=True)
class Conversation:
    turns: list[Turn]
    system: str | None = None
    n: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def single_token_words(tokenizer: Any, limit: int = 2000) -> list[str]:
    """Words w such that ' w' is exactly one token, and stays one token after another word."""
    words: list[str] = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if not token.startswith("Ġ") or not token[1:].isalpha() or not token[1:].islower():
            continue
        word = token[1:]
        if len(word) < 3 or len(tokenizer.encode(" " + word, add_special_tokens=False)) != 1:
            continue
        words.append(word)
        if len(words) >= limit:
            break
    if len(words) < 100:
        raise RuntimeError("tokenizer has too few single-token words for the workloads")
    return words


def text_of(words: list[str], rng: random.Random, num_tokens: int) -> str:
    return " " + " ".join(rng.choice(words) for _ in range(num_tokens))


def build(
    name: str, tokenizer: Any, num_requests: int | None = None, seed: int = 0
) -> list[Conversation]:
    rng = random.Random(seed)
    words = single_token_words(tokenizer)
    if name == "mixed":
        count = num_requests or 256
        return [
            Conversation([Turn(text_of(words, rng, rng.randint(128, 1024)), rng.randint(64, 512))])
            for _ in range(count)
        ]
    if name == "shared_prefix":
        count = num_requests or 128
        system = text_of(words, rng, 1024)
        return [
            Conversation([Turn(text_of(words, rng, rng.randint(64, 256)), 32)], system=system)
            for _ in range(count)
        ]
    if name == "multi_turn":
        count = num_requests or 32
        return [
            Conversation(
                [
                    Turn(text_of(words, rng, rng.randint(64, 256)), rng.randint(32, 128))
                    for _ in range(4)
                ],
                system=text_of(words, rng, 128),
            )
            for _ in range(count)
        ]
    if name == "parallel":
        count = num_requests or 64
        return [
            Conversation(
                [Turn(text_of(words, rng, rng.randint(128, 512)), rng.randint(64, 256))],
                n=4,
                extra={"temperature": 1.0, "seed": rng.randint(0, 2**31)},
            )
            for _ in range(count)
        ]
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def messages_for(conv: Conversation, turn_index: int, replies: list[str]) -> list[dict[str, str]]:
    """The whole history up to and including turn `turn_index` (multi-turn re-sends it all)."""
    messages: list[dict[str, str]] = []
    if conv.system is not None:
        messages.append({"role": "system", "content": conv.system})
    for i in range(turn_index + 1):
        messages.append({"role": "user", "content": conv.turns[i].user})
        if i < turn_index:
            messages.append({"role": "assistant", "content": replies[i]})
    return messages


def theoretical_hit_tokens(prompts: list[list[int]], block_size: int) -> tuple[int, int]:
    """(hit tokens, query tokens) if every earlier prompt's full blocks were cached when a prompt
    arrives, at block granularity, never covering a prompt's last token (it is recomputed)."""
    cached: set[tuple[int, ...]] = set()
    hits = 0
    total = 0
    for ids in prompts:
        total += len(ids)
        limit = (len(ids) - 1) // block_size
        matched = 0
        while matched < limit and tuple(ids[: (matched + 1) * block_size]) in cached:
            matched += 1
        hits += matched * block_size
        for b in range(len(ids) // block_size):
            cached.add(tuple(ids[: (b + 1) * block_size]))
    return hits, total
