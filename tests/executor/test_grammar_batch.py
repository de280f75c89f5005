"""grammar.GrammarBatch with SmolLM2's tokenizer and real xgrammar matchers: a step's masks
equal each matcher's own, rows left out (finished, unconstrained) allow everything, a refused
token is reported, a matcher that took its stop token is dropped, and the masks reach only
their rows of the logits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from pagemesh.services.executor.engine_api import Guide, GuideKind
from pagemesh.services.executor.grammar import GrammarBatch, GrammarCompiler

from tests.executor.engine_support import tokenizer

VOCAB = 49152
WORDS = VOCAB // 32


@dataclass
class _Request:
    beam: Any = None


@dataclass
class _Seq:  # what GrammarBatch reads of a Sequence
    matcher: Any
    is_finished: bool = False
    request: _Request = field(default_factory=_Request)


@pytest.fixture(scope="module")
def setup(smollm2_path: Path) -> tuple[GrammarCompiler, Any, int]:
    eos = int(tokenizer(smollm2_path).eos_token_id)
    compiler = GrammarCompiler(str(smollm2_path), VOCAB, [eos])
    yield compiler, tokenizer(smollm2_path), eos
    compiler.close()


def _own_mask(matcher: Any) -> torch.Tensor:
    mask = torch.full((1, WORDS), -1, dtype=torch.int32)
    matcher.fill_next_token_bitmask(mask, 0)
    return mask[0]


def test_fill_accept_apply(setup: tuple[GrammarCompiler, Any, int]) -> None:
    compiler, tok, eos = setup
    choice = compiler.compile_now(Guide(GuideKind.CHOICE, json.dumps(["red", "green"])))
    schema = compiler.compile_now(Guide(GuideKind.JSON_SCHEMA, json.dumps({"type": "integer"})))
    seqs = [
        _Seq(compiler.matcher(choice)),
        _Seq(None),  # unconstrained
        _Seq(compiler.matcher(schema)),
        _Seq(compiler.matcher(schema), is_finished=True),
        _Seq(compiler.matcher(choice)),
    ]
    batch = GrammarBatch(VOCAB, {eos}, pin=False, threads=2)
    rows = [0, 2, 3, 4]
    masks = batch.fill(seqs, rows)
    assert masks.rows == rows and masks.bitmask.shape == (4, WORDS)
    assert torch.equal(masks.bitmask[0], _own_mask(seqs[0].matcher))
    assert torch.equal(masks.bitmask[1], _own_mask(seqs[2].matcher))
    assert torch.equal(masks.bitmask[2], torch.full((WORDS,), -1, dtype=torch.int32))
    assert torch.equal(masks.bitmask[3], _own_mask(seqs[4].matcher))
    assert not torch.equal(masks.bitmask[0], masks.bitmask[1])  # (not one mask for all)

    # Applied: only the constrained rows lose tokens, and only the ones their mask refuses.
    logits = torch.zeros(5, VOCAB)
    masks.apply(logits, VOCAB, None)
    red = tok.encode("red", add_special_tokens=False)
    assert logits[0, red[0]] == 0 and logits[1].isfinite().all() and logits[3].isfinite().all()
    assert torch.isinf(logits[0]).sum() > VOCAB - 10  # a choice allows a handful of tokens
    assert logits[2, tok.encode("7", add_special_tokens=False)[0]] == 0

    # Accepted: "red" then the stop token ends row 0's grammar (its matcher is dropped); row 2
    # refuses a letter; row 3 is finished and not advanced; row 4 takes the same token.
    tokens = [red[0], 0, tok.encode("x", add_special_tokens=False)[0], 0, red[0]]
    refused = batch.accept(seqs, tokens, rows)
    assert refused == {2}
    assert seqs[0].matcher is not None
    for t in red[1:]:
        assert batch.accept([seqs[0]], [t], [0]) == set()
    assert batch.accept([seqs[0]], [eos], [0]) == set()
    assert seqs[0].matcher is None  # complete and stopped: unconstrained from here on
    assert seqs[2].matcher is not None  # (a refused token leaves the matcher where it was)
    assert batch.times.steps == 1 and batch.times.rows == 4
