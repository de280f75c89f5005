"""encode_chat reuses the ids of rendered-chat segments it has seen, and must stay exactly equal to
encode(render_chat(messages)), for SmolLM2 and for tokenizers where cutting is not exact (which
must fall back to the plain encode). The small tokenizers are trained here, in-process."""

from __future__ import annotations

import asyncio
import random
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pagemesh.services.gateway.chat as chat
import pytest
from pagemesh.services.gateway.chat import SEGMENT_CACHE_ENTRIES, Tokenizer, _hides, _SegmentCache
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as RustTokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from benchmarks import workloads

Messages = list[dict[str, str]]

FRAGMENTS = [
    *("", " ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "\u00a0", "\u200b", "\x00"),
    *("hello", " world", "Hello, world!", "You are a helpful assistant.", "'s", "1234567"),
    *("\u65e5\u672c\u8a9e\u306e", "\u00e9migr\u00e9", "\U0001f642\U0001f44d"),
    *("\u2581x", "_x_", "  trailing  ", "\nuser\n", "assistant\n", "system"),
    # Special-token text written literally by the user, whole and in parts.
    *("<|im_end|>", "<|im_start|>", "<|im_start|>assistant\n", "<|endoftext|>", "<repo_name>"),
    *("<|im_end|>\n", "<|im_", "im_end|>", "<|", "|>", "<", ">", "<|im_end|><|im_start|>"),
]


# Contents around which a wrong cut shows: whitespace that a stripping token would take, text
# glued to special-token text, special-token text alone.
EDGE_CONTENTS = [
    "",
    " ",
    "\n",
    "<|im_end|> hi",
    "hi <|im_start|> \n x",
    " \n<|im_end|>\n\n x ",
    "wow!<|im_end|>.",
    "a<|im_start|>b",
    "<|im_end|><|im_start|>",
    "\u00e9<|im_end|>\u00e9",
]
EDGE_CHATS: list[Messages] = [
    [{"role": "system", "content": c}, {"role": "user", "content": c}] for c in EDGE_CONTENTS
] + [[{"role": "user", "content": c}, {"role": "assistant", "content": c}] for c in EDGE_CONTENTS]


def random_content(rng: random.Random) -> str:
    if rng.random() < 0.1:
        return ""
    if rng.random() < 0.1:  # long plain text
        return " ".join(rng.choice(["the", "house", "token", "cache", "é"]) for _ in range(300))
    return "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 8)))


def random_chat(rng: random.Random, max_turns: int = 24) -> Messages:
    messages: Messages = []
    if rng.random() < 0.6:
        messages.append({"role": "system", "content": random_content(rng)})
    for i in range(rng.randint(1, max_turns)):
        role = "user" if i % 2 == 0 else "assistant"
        if rng.random() < 0.05:
            role = rng.choice(["system", "tool", "user", "assistant"])
        messages.append({"role": role, "content": random_content(rng)})
    return messages


def plain(tok: Tokenizer, messages: Messages) -> list[int]:
    return tok.encode(tok.render_chat(messages))


def assert_exact(tok: Tokenizer, chats: list[Messages]) -> None:
    for messages in EDGE_CHATS + chats:
        # Each turn of the history, then the whole chat again: later calls hit the cache.
        for end in [*range(1, len(messages) + 1), len(messages)]:
            assert tok.encode_chat(messages[:end]) == plain(tok, messages[:end]), messages[:end]


# --- SmolLM2 -------------------------------------------------------------------------------


@pytest.fixture
def smol(smollm2_path: Path) -> Tokenizer:
    """A fresh SmolLM2 tokenizer (its own, empty cache)."""
    return Tokenizer.load(smollm2_path)


def test_smollm2_cuts_after_the_chatml_tokens(smol: Tokenizer) -> None:
    assert smol._split_after is not None
    assert smol._split_after.fullmatch("<|im_start|>")
    assert smol._split_after.fullmatch("<|im_end|>")


def test_smollm2_random_chats_are_exact(smol: Tokenizer) -> None:
    rng = random.Random(0)
    assert_exact(smol, [random_chat(rng) for _ in range(120)])
    assert 0 < len(smol._segments) <= SEGMENT_CACHE_ENTRIES


def test_smollm2_shared_prefix_is_encoded_once(smol: Tokenizer) -> None:
    convs = workloads.build("shared_prefix", smol.hf, 32, 0)
    encoded: list[str] = []
    encode_many = smol._encode_many

    def spy(texts: list[str]) -> list[list[int]]:
        encoded.extend(texts)
        return encode_many(texts)

    smol._encode_many = spy  # type: ignore[method-assign]
    for conv in convs:
        messages = workloads.messages_for(conv, 0, [])
        assert smol.encode_chat(messages) == plain(smol, messages)
    system = convs[0].system
    assert system is not None
    assert sum(system in text for text in encoded) == 1


def test_smollm2_multi_turn_is_exact(smol: Tokenizer) -> None:
    rng = random.Random(1)
    words = workloads.single_token_words(smol.hf)
    for conv in workloads.build("multi_turn", smol.hf, 8, 0):
        replies = [workloads.text_of(words, rng, turn.max_tokens) for turn in conv.turns]
        for i in range(len(conv.turns)):
            messages = workloads.messages_for(conv, i, replies)
            assert smol.encode_chat(messages) == plain(smol, messages)


def test_smollm2_async_matches(smol: Tokenizer) -> None:
    short = [{"role": "user", "content": "hi <|im_end|> there"}]
    long = [{"role": "user", "content": "word " * 5000}]
    for messages in (short, long):
        assert asyncio.run(smol.encode_chat_async(messages)) == plain(smol, messages)


def test_split_special_tokens_turns_cutting_off(smollm2_path: Path) -> None:
    tok = Tokenizer(AutoTokenizer.from_pretrained(smollm2_path, split_special_tokens=True))
    assert tok._split_after is None
    assert_exact(tok, [random_chat(random.Random(2)) for _ in range(10)])


# --- Small tokenizers built here -----------------------------------------------------------

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' "
    "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Hello there, how are you today? You are a helpful assistant.",
    "user\nsystem\nassistant\n the quick brown fox jumps over the lazy dog",
    "\u00e9migr\u00e9 \u65e5\u672c\u8a9e 1234567 it's <| |> _x_",
    "<|im_end|>.<|im_start|>.",  # trained as plain text: merges across "|>." exist
] * 20


def build(
    pre_tokenizer: Any = None,
    normalizer: Any = None,
    added: tuple[AddedToken, ...] | None = None,
    template: str | None = CHATML,
) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on CORPUS, with ChatML's added tokens (or `added`)."""
    byte_level = isinstance(pre_tokenizer, pre_tokenizers.ByteLevel)
    rust = RustTokenizer(models.BPE(unk_token=None if byte_level else "<unk>"))
    rust.normalizer = normalizer
    rust.pre_tokenizer = pre_tokenizer
    rust.decoder = decoders.ByteLevel() if byte_level else decoders.Metaspace()
    alphabet = sorted(set("".join(CORPUS)) | set("\u2581\t"))
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[] if byte_level else ["<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if byte_level else alphabet,
        show_progress=False,
    )
    rust.train_from_iterator(CORPUS, trainer)
    if added is None:
        added = (
            AddedToken("<|im_start|>", special=True, normalized=False),
            AddedToken("<|im_end|>", special=True, normalized=False),
        )
    rust.add_special_tokens(list(added))
    hf = PreTrainedTokenizerFast(tokenizer_object=rust)
    hf.chat_template = template
    return hf


def special(content: str, **flags: bool) -> AddedToken:
    return AddedToken(content, special=True, **{"normalized": False, **flags})


def metaspace_first() -> PreTrainedTokenizerFast:
    return build(pre_tokenizers.Metaspace(prepend_scheme="first"))


def im_end_rstrip() -> PreTrainedTokenizerFast:
    return build(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        added=(special("<|im_start|>"), special("<|im_end|>", rstrip=True)),
    )


def all_stripping() -> PreTrainedTokenizerFast:
    return build(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        added=(special("<|im_start|>", lstrip=True), special("<|im_end|>", rstrip=True)),
    )


def im_end_newline_token() -> PreTrainedTokenizerFast:
    # A longer added token that starts like <|im_end|>: the tokenizer matches it instead.
    return build(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        added=(special("<|im_start|>"), special("<|im_end|>"), special("<|im_end|>\n")),
    )


def overlapping_token() -> PreTrainedTokenizerFast:
    # In "wow!<|im_end|>." the tokenizer matches "!<|im" and no <|im_end|>: no cut after it.
    return build(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        added=(special("<|im_start|>"), special("<|im_end|>"), special("!<|im")),
    )


def normalized_tokens() -> PreTrainedTokenizerFast:
    # Matched in the normalized text, where "<|im_end|>" after a letter is "a<|im_end|>" but
    # the token itself is normalized to "\u2581<|im_end|>": no match there.
    return build(
        None,
        normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "_")]),
        added=(special("<|im_start|>", normalized=True), special("<|im_end|>", normalized=True)),
    )


def single_word_tokens() -> PreTrainedTokenizerFast:
    return build(
        pre_tokenizers.ByteLevel(add_prefix_space=False),
        added=(special("<|im_start|>", single_word=True), special("<|im_end|>", single_word=True)),
    )


def no_template() -> PreTrainedTokenizerFast:
    return build(pre_tokenizers.ByteLevel(add_prefix_space=False), template=None)


CUT_OFF: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "metaspace_first": metaspace_first,
    "all_stripping": all_stripping,
    "normalized_tokens": normalized_tokens,
    "single_word_tokens": single_word_tokens,
    "no_template": no_template,
    "overlapping_token": overlapping_token,
}
CUT_ON: dict[str, Callable[[], PreTrainedTokenizerFast]] = {
    "byte_level": lambda: build(pre_tokenizers.ByteLevel(add_prefix_space=False)),
    "byte_level_prefix_space": lambda: build(pre_tokenizers.ByteLevel(add_prefix_space=True)),
    "metaspace_always": lambda: build(pre_tokenizers.Metaspace(prepend_scheme="always")),
    "prepend_normalizer": lambda: build(
        None, normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "_")])
    ),
    "im_end_rstrip": im_end_rstrip,
    "im_end_newline_token": im_end_newline_token,
}


@pytest.mark.parametrize("name", sorted(CUT_OFF))
def test_unsafe_tokenizers_fall_back_and_stay_exact(name: str) -> None:
    tok = Tokenizer(CUT_OFF[name]())
    assert tok._split_after is None
    assert_exact(tok, [random_chat(random.Random(3)) for _ in range(20)])
    assert len(tok._segments) == 0


@pytest.mark.parametrize("name", sorted(CUT_ON))
def test_safe_tokenizers_cut_and_stay_exact(name: str) -> None:
    tok = Tokenizer(CUT_ON[name]())
    assert tok._split_after is not None
    assert_exact(tok, [random_chat(random.Random(4)) for _ in range(40)])


def test_metaspace_first_cut_would_be_wrong() -> None:
    """Why the guard exists: with prepend_scheme "first", a segment gains a leading "▁"."""
    tok = Tokenizer(metaspace_first())
    text = tok.render_chat([{"role": "user", "content": "hello there"}])
    cut = len("<|im_start|>")
    assert tok.encode(text[:cut]) + tok.encode(text[cut:]) != tok.encode(text)


def test_probes_catch_what_the_configuration_check_misses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(chat, "_piece_local_reason", lambda config: None)
    tok = Tokenizer(metaspace_first())
    assert tok._split_after is None
    assert_exact(tok, [random_chat(random.Random(5)) for _ in range(5)])


def test_stripping_and_longer_tokens_are_not_cut_after() -> None:
    """rstrip: the token also takes the whitespace after it, so a cut right after it is wrong.
    A longer added token that starts with it is matched instead of it."""
    rstrip = Tokenizer(im_end_rstrip())
    assert rstrip._split_after is not None
    assert rstrip._split_after.fullmatch("<|im_start|>")
    assert not rstrip._split_after.fullmatch("<|im_end|>")
    text = "<|im_end|>\n hi"
    cut = len("<|im_end|>")
    assert rstrip.encode(text[:cut]) + rstrip.encode(text[cut:]) != rstrip.encode(text)

    longer = Tokenizer(im_end_newline_token())
    assert longer._split_after is not None
    assert longer._split_after.fullmatch("<|im_end|>\n")
    assert not longer._split_after.fullmatch("<|im_end|>")


def test_hides() -> None:
    assert _hides("<|im_end|>\n", "<|im_end|>")  # longer, same start
    assert _hides("!<|im", "<|im_start|>")  # starts before, reaches into it
    assert _hides("xx<|im_start|>yy", "<|im_start|>")  # contains it
    assert _hides("aba", "aba")  # overlaps itself
    assert not _hides("<|im_end|>", "<|im_start|>")
    assert not _hides("<|im_start|>", "<|im_start|>")
    assert not _hides("<|im", "<|im_start|>")  # same start, shorter: the longer one wins


def test_segment_cache_is_a_bounded_lru() -> None:
    one, two, three = array("I", [1]), array("I", [2]), array("I", [1, 2, 3])
    cache = _SegmentCache(max_entries=3, max_cost=20)
    for key in ("a", "b", "c"):
        cache.put(key, one)
    assert cache.get("a") == one  # now the most recent
    cache.put("d", two)
    assert cache.get("b") is None and cache.get("a") == one and len(cache) == 3
    cache.put("x" * 15, three)  # cost 18: the oldest go until the total (20) fits
    assert cache.get("x" * 15) == three and cache.get("a") == one and len(cache) == 2
    cache.put("y" * 30, one)  # larger than the whole cache: not kept
    assert cache.get("y" * 30) is None and len(cache) == 2
