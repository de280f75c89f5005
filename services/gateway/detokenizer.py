"""Token ids → text, incrementally, for one choice.

Two things make this harder than `decode(new_ids)`:
- A character can span tokens (byte-level BPE splits multi-byte UTF-8), so a delta that would end
  in U+FFFD is held until the bytes that complete it arrive.
- Stop strings can span tokens, so text that might be the start of a stop string is held back
  until it either completes the stop string (then it and everything after it is dropped) or
  cannot anymore (then it is released). A stop string is therefore never leaked, and the text is
  cut exactly where it starts.
"""

from __future__ import annotations

from typing import Protocol

# Prompt tokens decoded along with the output: tokenizers that drop a token's leading space when
# it is decoded alone (SentencePiece) need a little left context to get spaces right.
PROMPT_CONTEXT_TOKENS = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDecoder:
    """Text deltas from growing token ids, never splitting a UTF-8 character."""

    def __init__(
        self, tokenizer: Decoder, prompt_ids: list[int] | None = None, skip_special: bool = True
    ) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._ids: list[int] = list((prompt_ids or [])[-PROMPT_CONTEXT_TOKENS:])
        # ids[prefix:read] were already turned into text; decoding from `prefix` (not `read`)
        # gives the tokenizer the context it needs to produce the same characters again.
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, new_ids: list[int]) -> str:
        self._ids.extend(new_ids)
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self._prefix = self._read
            self._read = len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held at the end. A character whose bytes were cut off (max_tokens
        in the middle of it) would decode as U+FFFD; it is dropped rather than sent broken."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        full_text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return full_text[len(prefix_text) :].rstrip("\ufffd")


def _held_suffix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class StopStringFilter:
    """Releases text that can no longer be part of a stop string; cuts at the first stop."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._pending + text
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            return buf[:cut]
        held = _held_suffix_len(buf, self._stops)
        self._pending = buf[len(buf) - held :] if held else ""
        return buf[: len(buf) - held]

    def flush(self) -> str:
        """At the end of generation a held prefix can no longer become a stop string."""
        out, self._pending = self._pending, ""
        return "" if self.stopped else out


class Detokenizer:
    """One choice's output text: UTF-8-safe deltas with stop strings applied.

    `push` returns the text to send now; `stopped` turns true when a stop string was met (the
    caller then finishes the choice with finish_reason "stop" and aborts its generation).
    """

    def __init__(
        self,
        tokenizer: Decoder,
        stop: list[str] | None = None,
        prompt_ids: list[int] | None = None,
    ) -> None:
        self._decoder = IncrementalDecoder(tokenizer, prompt_ids)
        self._filter = StopStringFilter(stop or [])
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self._filter.stopped

    def push(self, token_ids: list[int]) -> str:
        if self.stopped:
            return ""
        delta = self._filter.push(self._decoder.push(token_ids))
        self.text += delta
        return delta

    def finish(self) -> str:
        """The held-back tail, once the executor says the choice is finished."""
        if self.stopped:
            return ""
        delta = self._filter.push(self._decoder.flush())
        delta += self._filter.flush()
        self.text += delta
        return delta
