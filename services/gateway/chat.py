"""Prompts → token ids with the model's own tokenizer and chat template.

The gateway tokenizes (not the executor) so that the executor's CPU goes to the model, and so
that a prompt that does not fit is refused here before any executor work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import unicodedata
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("pagemesh.gateway.chat")

# Prompts longer than this are tokenized on a worker thread so that one huge body does not
# stall every other stream on the event loop.
INLINE_TOKENIZE_CHARS = 16_384

# Token ids of rendered-chat segments kept for reuse (see Tokenizer.encode_chat): at most this
# many segments, and at most this many characters plus token ids over all of them (at most
# ~8 MB: a character takes 1 to 4 bytes, an id 4).
SEGMENT_CACHE_ENTRIES = 256
SEGMENT_CACHE_COST = 1 << 21


class PromptError(ValueError):
    """The messages cannot be rendered by this model's chat template."""


class _SegmentCache:
    """A bounded LRU of segment text -> its token ids (4 bytes each, where a list of ints costs
    ~36). Keyed by the exact text, so a hit is always the encoding of that very text. Locked:
    long prompts are encoded on worker threads."""

    def __init__(self, max_entries: int, max_cost: int) -> None:
        self._max_entries = max_entries
        self._max_cost = max_cost
        self._entries: OrderedDict[str, array[int]] = OrderedDict()
        self._cost = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, text: str) -> array[int] | None:
        with self._lock:
            ids = self._entries.get(text)
            if ids is not None:
                self._entries.move_to_end(text)
            return ids

    def put(self, text: str, ids: array[int]) -> None:
        cost = len(text) + len(ids)
        if cost > self._max_cost:
            return
        with self._lock:
            old = self._entries.pop(text, None)
            if old is not None:
                self._cost -= len(text) + len(old)
            self._entries[text] = ids
            self._cost += cost
            while len(self._entries) > self._max_entries or self._cost > self._max_cost:
                key, value = self._entries.popitem(last=False)
                self._cost -= len(key) + len(value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._cost = 0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to the printable characters byte-level BPE pieces are
    written in (the same table as transformers' and tiktoken's)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class Tokenizer:
    """The model's tokenizer plus the bits of it the gateway needs."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        cleanup = getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = backend if backend is not None and not cleanup else None
        if not getattr(hf_tokenizer, "chat_template", None):
            # A base model without a template: plain role-prefixed turns still work.
            hf_tokenizer.chat_template = (
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}"
            )
        # encode_chat cuts the rendered text right after these added tokens (none: it never
        # cuts), when the tokenizer's configuration shows that this is exact and probe strings
        # confirm it. The hf tokenizer must not be reconfigured afterwards (added tokens,
        # split_special_tokens), or that no longer holds.
        # token_bytes: byte-level BPE pieces map back to raw bytes one character per byte.
        decoder = getattr(backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._bytes: dict[int, bytes] = {}
        self._segments = _SegmentCache(SEGMENT_CACHE_ENTRIES, SEGMENT_CACHE_COST)
        self._split_after: re.Pattern[str] | None = None
        split_tokens, reason = _split_tokens(self)
        if split_tokens:
            self._split_after = re.compile("|".join(re.escape(t) for t in split_tokens))
            probes = _probes(self, split_tokens)
            if any(self._encode_split(t, cache=False) != self.encode(t) for t in probes):
                self._split_after = None
                reason = "a probe string encodes differently when cut"
        log.debug("prompt segment reuse %s", f"off: {reason}" if reason else "on")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # The detokenizer decodes twice per token and choice: the Rust backend directly is
        # about 3x cheaper than the Python wrapper, and identical unless the tokenizer asks for
        # the wrapper's space clean-up.
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's own bytes, also when they are only part of a UTF-8 character (an emoji
        split over tokens), so that concatenating them rebuilds the text. Decoding one token
        alone cannot give them: a partial character decodes as U+FFFD."""
        cached = self._bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self.hf.convert_ids_to_tokens(token_id)
        out: bytes | None = None
        if isinstance(piece, str):
            if self._byte_level and all(c in _BYTE_DECODER for c in piece):
                out = bytes(_BYTE_DECODER[c] for c in piece)  # GPT-2 style byte-level BPE
            elif m := _BYTE_FALLBACK.fullmatch(piece):
                out = bytes([int(m.group(1), 16)])  # SentencePiece byte fallback: <0xE2>
        if out is None:
            out = self.token_text(token_id).encode("utf-8")
        self._bytes[token_id] = out
        return out

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> str:
        try:
            return self.hf.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:  # jinja raises its own errors (e.g. alternation checks)
            raise PromptError(f"The chat template rejected these messages: {exc}") from None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Chat: the template already holds any BOS the model wants, adding it again would
        # double it. Plain completions: the tokenizer's own BOS rule applies.
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Exactly `encode(render_chat(messages))`, reusing the ids of segments seen before."""
        return self._encode_split(self.render_chat(messages, tools))

    def _encode_split(self, text: str, cache: bool = True) -> list[int]:
        # The text is cut right after every match of a split token, each segment is encoded on
        # its own (or found in the cache) and the ids are concatenated. That is exact because
        # _split_tokens only picks tokens that the tokenizer itself splits its input on, the
        # pieces between them being tokenized independently (and the probes in __init__ agree).
        # A shared system prompt, or a chat history sent again, is one cache hit per message.
        if self._split_after is None:
            return self.encode(text)
        cuts = [m.end() for m in self._split_after.finditer(text)]
        if not cuts:
            return self.encode(text)
        if cuts[-1] != len(text):
            cuts.append(len(text))
        segments = [text[start:end] for start, end in zip([0, *cuts[:-1]], cuts, strict=True)]
        found: dict[str, array[int]] = {}
        missing: list[str] = []
        for segment in dict.fromkeys(segments):
            seg_ids = self._segments.get(segment) if cache else None
            if seg_ids is None:
                missing.append(segment)
            else:
                found[segment] = seg_ids
        for segment, new_ids in zip(missing, self._encode_many(missing), strict=True):
            found[segment] = array("I", new_ids)  # ids are u32 in tokenizers
            if cache:
                self._segments.put(segment, found[segment])
        ids: list[int] = []
        for segment in segments:
            ids.extend(found[segment])
        return ids

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        # One call for several texts: the Python wrapper costs ~20 us a call, which would add up
        # over a history of short messages. Per text, it is the very path of encode (which
        # hands the backend a batch of one).
        if len(texts) <= 1:
            return [self.encode(t) for t in texts]
        return [list(ids) for ids in self.hf(texts, add_special_tokens=False)["input_ids"]]

    async def encode_chat_async(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        if sum(len(m["content"]) for m in messages) < INLINE_TOKENIZE_CHARS and not tools:
            return self.encode_chat(messages, tools)
        return await asyncio.to_thread(self.encode_chat, messages, tools)

    @property
    def chat_template(self) -> str:
        template = getattr(self.hf, "chat_template", "") or ""
        return template if isinstance(template, str) else json.dumps(template)

    async def encode_async(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) < INLINE_TOKENIZE_CHARS:
            return self.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.encode, text, add_special_tokens)


# Configuration kinds whose work on one piece of the input (the text between two added-token
# matches) does not depend on what lies outside that piece, nor on where it starts. Anything else
# (a custom component, a type added in a later tokenizers release) turns segment reuse off.
# fmt: off
_PIECE_LOCAL = {
    "normalizer": {
        "BertNormalizer", "ByteLevel", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "Nmt",
        "Precompiled", "Prepend", "Replace", "Sequence", "Strip", "StripAccents",
    },
    "pre_tokenizer": {
        "BertPreTokenizer", "ByteLevel", "CharDelimiterSplit", "Digits", "Metaspace",
        "Punctuation", "Sequence", "Split", "UnicodeScripts", "Whitespace", "WhitespaceSplit",
    },
    # With add_special_tokens=False these change offsets and type ids, never the ids.
    "post_processor": {
        "BertProcessing", "ByteLevel", "RobertaProcessing", "Sequence", "TemplateProcessing",
    },
    "model": {"BPE", "Unigram", "WordLevel", "WordPiece"},
}
# fmt: on


def _components(node: Any) -> Iterator[dict[str, Any]]:
    """A component's config and those nested in it (Sequence holds a list of them)."""
    if isinstance(node, dict):
        if "type" in node:
            yield node
        for key in ("normalizers", "pretokenizers", "processors"):
            for child in node.get(key) or []:
                yield from _components(child)


def _piece_local_reason(config: dict[str, Any]) -> str | None:
    """Why this tokenizer.json's pipeline may treat a piece differently depending on where it
    starts, or None when it cannot."""
    if config.get("truncation") is not None or config.get("padding") is not None:
        return "truncation or padding is configured"
    for part, allowed in _PIECE_LOCAL.items():
        for component in _components(config.get(part)):
            kind = component["type"]
            if kind not in allowed:
                return f"{part} {kind} is not known to be piece-local"
            # Metaspace "first" prepends "▁" only to the piece at the very start of the input,
            # so a segment that starts a piece would gain one that the whole text does not have
            # (Llama 2, Mistral). "always" and the legacy add_prefix_space do it to every piece.
            if kind == "Metaspace" and component.get("prepend_scheme") == "first":
                return "Metaspace prepends only at the start of the input"
            if kind == "BPE" and component.get("dropout"):
                return "BPE dropout makes encoding random"
    return None


def _word_char(c: str) -> bool:
    # Conservative superset of Rust's char::is_alphanumeric, which single_word matching uses.
    return c == "_" or unicodedata.category(c)[0] in "LMN"


def _hides(t: str, b: str) -> bool:
    """Whether an occurrence of added token `t` could keep the tokenizer's leftmost-longest
    scan from matching an occurrence of `b`: t is longer and starts the same, or t starts
    before b and reaches into it (t == b included: b overlapping itself)."""
    if t != b and t.startswith(b):
        return True
    j = t.find(b[0], 1)
    while j != -1:
        rest = t[j:]
        if rest.startswith(b) or b.startswith(rest):
            return True
        j = t.find(b[0], j + 1)
    return False


def _probe_chats() -> list[list[dict[str, str]]]:
    shapes = (("system", "user", "assistant", "user"), ("user", "assistant", "user"), ("user",))
    return [[{"role": r, "content": f"Probe {r} {i}."} for i, r in enumerate(s)] for s in shapes]


def _render_all(tok: Tokenizer, chats: list[list[dict[str, str]]]) -> list[str]:
    """The chats the template accepts (some reject a system turn, ...), rendered."""
    rendered = []
    for chat in chats:
        try:
            rendered.append(tok.render_chat(chat))
        except PromptError:
            continue
    return rendered


def _split_tokens(tok: Tokenizer) -> tuple[list[str], str]:
    """The added tokens after which a rendered chat may be cut, longest first, or [] and why.

    HF fast tokenizers first find added-token matches in the raw input (leftmost-longest over
    all added tokens with normalized=False), then normalize, pre-tokenize and tokenize each piece
    between the matches on its own. So encode(a + b) == encode(a) + encode(b) when `a` ends with
    such a match, provided that: the token is really matched there (no other added token can be
    matched across or instead of it, see _hides); the match does not stretch beyond its text
    (rstrip, lstrip) or depend on its neighbours (single_word); special tokens are not being
    split (split_special_tokens); no pipeline step treats the start of the input specially; and
    the Python wrapper's encode is the library's own.
    """
    hf = tok.hf
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        return [], "not a fast tokenizer"
    from transformers import PreTrainedTokenizerFast

    if not isinstance(hf, PreTrainedTokenizerFast):
        return [], "not a PreTrainedTokenizerFast"
    for name in ("__call__", "encode", "encode_plus", "_encode_plus", "_batch_encode_plus"):
        if getattr(type(hf), name, None) is not getattr(PreTrainedTokenizerFast, name, None):
            return [], f"{type(hf).__name__} overrides {name}"
    if getattr(hf, "split_special_tokens", False) or getattr(backend, "encode_special_tokens", 0):
        return [], "special tokens are split"
    try:
        config = json.loads(backend.to_str())
    except Exception as exc:  # custom (Python) components cannot be serialized
        return [], f"cannot read the tokenizer's configuration: {exc}"
    reason = _piece_local_reason(config)
    if reason is not None:
        return [], reason

    added = list(backend.get_added_tokens_decoder().values())
    raw = [t.content for t in added if not t.normalized and t.content]
    rendered = "".join(_render_all(tok, _probe_chats()))
    split_tokens = [
        t.content
        for t in added
        if t.content
        and t.content in rendered  # the template writes it: worth cutting after
        and not (t.normalized or t.lstrip or t.rstrip or t.single_word)
        # A preceding rstrip token may not eat into it, and a following single_word token must
        # see a non-word left neighbour both in the whole text and at the start of a segment.
        and not t.content[0].isspace()
        and not _word_char(t.content[-1])
        and not any(_hides(other, t.content) for other in raw)
    ]
    if not split_tokens:
        return [], "no added token of the chat template is safe to cut after"
    return sorted(split_tokens, key=len, reverse=True), ""


_PROBE_FILLERS = (
    *("", " ", "  ", "\n", "\n\n", "\t", " \n ", "x", " x", "x ", "Hello world.", "'s"),
    *("_x_", "12 345", "<|", "|>", "\u2581a", "\u00e9", "\u65e5\u672c", "\U0001f642"),
)


def _probes(tok: Tokenizer, split_tokens: list[str]) -> list[str]:
    """Strings on which the cut encoding must equal the plain one before it is trusted."""
    probes = []
    for b in split_tokens:
        for f in _PROBE_FILLERS:
            probes += [b + f, f + b, f + b + f, b + f + b + f, "a" + f + b + f + "z"]
        for c in split_tokens:
            probes += [b + c, f"{b}\n{c}user\n hi {b}"]
    for f in _PROBE_FILLERS:
        chats = [[{**m, "content": f + m["content"] + f} for m in c] for c in _probe_chats()]
        probes += _render_all(tok, chats)
    return probes
