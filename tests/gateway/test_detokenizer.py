"""Incremental detokenization with the real SmolLM2 tokenizer: byte-level BPE splits multi-byte
characters across tokens, so this is where broken UTF-8 and leaked stop strings would show."""

from __future__ import annotations

import random

import pytest
from pagemesh.services.gateway.chat import Tokenizer
from pagemesh.services.gateway.detokenizer import Detokenizer, StopStringFilter

TEXTS = [
    "The capital of France is Paris. It is known for the Eiffel Tower.",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🎉🚀👩‍👩‍👧 done",
    "  leading spaces and\nnew\n\nlines\ttabs  ",
    "Ünïcödé: ∑∫√∞ ≠ ≤ ≥ — “quotes” ‘single’ … €100",
]


def stream(detok: Detokenizer, ids: list[int], chunks: list[int]) -> list[str]:
    deltas, i = [], 0
    for size in chunks:
        deltas.append(detok.push(ids[i : i + size]))
        i += size
        if detok.stopped:
            break
    deltas.append(detok.finish())
    return deltas


def chunkings(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    one_by_one = [1] * n
    randomly = []
    left = n
    while left:
        k = min(left, rng.randint(1, 4))
        randomly.append(k)
        left -= k
    return [one_by_one, randomly]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode_and_never_split_a_character(
    tokenizer: Tokenizer, text: str
) -> None:
    ids = tokenizer.encode(text)
    expected = tokenizer.decode(ids)
    assert expected == text
    for chunks in chunkings(len(ids), seed=len(text)):
        deltas = stream(Detokenizer(tokenizer), ids, chunks)
        assert "".join(deltas) == expected
        for d in deltas:
            assert "\ufffd" not in d
            d.encode("utf-8")  # every delta is valid on its own


def test_multibyte_character_spans_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🎉")
    assert len(ids) > 1  # the premise: one character, several byte-level tokens
    detok = Detokenizer(tokenizer)
    assert [detok.push([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1:]) == "🎉"


def test_prompt_context_does_not_leak_into_output(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Say hi"}])
    out = tokenizer.encode("Hi there! 👋")
    detok = Detokenizer(tokenizer, prompt_ids=prompt)
    assert "".join(stream(detok, out, [1] * len(out))) == "Hi there! 👋"


def test_special_tokens_are_not_output(tokenizer: Tokenizer) -> None:
    eos = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    ids = [*tokenizer.encode("Paris."), eos]
    assert "".join(stream(Detokenizer(tokenizer), ids, [1] * len(ids))) == "Paris."


def test_truncated_character_at_the_end_is_flushed(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ok 🎉")[:-1]  # max_tokens cut the emoji short
    deltas = stream(Detokenizer(tokenizer), ids, [1] * len(ids))
    assert "".join(deltas) == "ok "  # the partial character is dropped, never sent broken
    assert all("\ufffd" not in d for d in deltas)


STOP_CASES = [
    # (text, stops, expected output)
    ("The capital of France is Paris. It is big.", ["."], "The capital of France is Paris"),
    ("The capital of France is Paris. It is big.", ["Paris"], "The capital of France is "),
    ("The capital of France is Paris. It is big.", ["is Par"], "The capital of France "),
    ("The capital of France is Paris. It is big.", [" It is"], "The capital of France is Paris."),
    ("The capital of France is Paris. It is big.", ["nope", "ance i"], "The capital of Fr"),
    ("abc abd abe", ["abe"], "abc abd "),  # false starts are released once they fail
    ("日本語のテキスト", ["のテ"], "日本語"),  # multi-byte stop string spanning tokens
    ("emoji 🎉🚀 rocket", ["🚀"], "emoji 🎉"),
    ("line one\n\nline two", ["\n\n"], "line one"),
    ("no stop here", ["zzz"], "no stop here"),
    ("ends with a partial sto", ["stop"], "ends with a partial sto"),  # held, then released
    ("the end", ["the end"], ""),
]


@pytest.mark.parametrize(("text", "stops", "expected"), STOP_CASES)
def test_stop_strings_cut_exactly_and_never_leak(
    tokenizer: Tokenizer, text: str, stops: list[str], expected: str
) -> None:
    ids = tokenizer.encode(text)
    for chunks in chunkings(len(ids), seed=len(text)):
        detok = Detokenizer(tokenizer, stop=stops)
        deltas = stream(detok, ids, chunks)
        assert "".join(deltas) == expected
        assert detok.text == expected
        assert detok.stopped == (expected != text)
        # Never leaked: no prefix of what was sent ever contained a stop string.
        sent = ""
        for d in deltas:
            sent += d
            assert not any(s in sent for s in stops)
            assert "\ufffd" not in d


def test_stop_filter_holds_only_possible_prefixes() -> None:
    f = StopStringFilter(["STOP"])
    assert f.push("abc S") == "abc "
    assert f.push("T") == ""
    assert f.push("x") == "STx"  # "STx" can no longer become "STOP"
    assert f.push("ST") == ""
    assert f.push("OP tail") == ""
    assert f.stopped
    assert f.push("more") == "" and f.flush() == ""
