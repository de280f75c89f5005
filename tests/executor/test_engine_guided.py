"""Structured output in LLMEngine on CPU with the real SmolLM2-135M-Instruct: guided outputs
follow their grammar (JSON schema, regex, choice), with n > 1, under preemption, in both
scheduling modes; unconstrained greedy requests in the same batch are unchanged token for
token; a guide that does not compile is refused with a rejected output before any block."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pagemesh.services.executor.engine_api import FinishReason, Guide, GuideKind, SamplingParams

from tests.executor.engine_support import (
    assert_all_free_or_cached,
    blocks_in_use,
    greedy,
    hf_greedy,
    make_engine,
    run_all,
    tokenizer,
)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PERSON_GUIDE = Guide(GuideKind.JSON_SCHEMA, json.dumps(PERSON))


def _chat(path: Path, text: str) -> list[int]:
    tok = tokenizer(path)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def _text(path: Path, ids: list[int]) -> str:
    return tokenizer(path).decode(ids, skip_special_tokens=True)


def _valid_person(path: Path, ids: list[int]) -> dict:
    # Imported here, not at the top: with jsonschema imported at collection, the in-process
    # xgrammar compile errors of test_bad_guide (tvm-ffi builds their tracebacks with ast)
    # left CPython 3.11's AST state off, and pytest's session end raised SystemError.
    import jsonschema

    doc = json.loads(_text(path, ids))
    jsonschema.validate(doc, PERSON)
    return doc


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_json_schema_n2_and_unconstrained_greedy_unchanged(
    smollm2_path: Path, async_scheduling: bool
) -> None:
    engine = await make_engine(smollm2_path, async_scheduling=async_scheduling)
    plain = _chat(smollm2_path, "What is the capital of France?")
    guided = _chat(smollm2_path, "Describe a person as JSON.")
    engine.add_request("plain", plain, greedy(12))
    engine.add_request("g", guided, greedy(48, guide=PERSON_GUIDE))
    engine.add_request(
        "n2",
        guided,
        SamplingParams(temperature=1.0, seed=7, n=2, max_tokens=48, guide=PERSON_GUIDE),
    )
    run = await run_all(engine)
    # The unconstrained request, in the same batches as the constrained ones: unchanged.
    assert run.tokens[("plain", 0)] == hf_greedy(smollm2_path, tuple(plain), 12)
    for key in [("g", 0), ("n2", 0), ("n2", 1)]:
        assert run.finish[key] == FinishReason.STOP, key
        _valid_person(smollm2_path, run.tokens[key])
    # (Each child has its own matcher: a shared one would take both children's tokens and
    # leave its grammar, which ends a choice with an error.)
    assert engine.grammars.stats.misses == 1  # one compile for the three sequences
    assert_all_free_or_cached(engine)


async def test_matcher_survives_preemption(smollm2_path: Path) -> None:
    # 4 sequences of ~40 + up to 48 tokens need more than the pool's 10 blocks together.
    engine = await make_engine(smollm2_path, num_blocks=10, num_lookahead_tokens=0)
    prompts = [
        _chat(smollm2_path, f"Describe person number {i} as JSON, with many details.")
        for i in range(4)
    ]
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0.8, seed=i, max_tokens=48, guide=PERSON_GUIDE)
        engine.add_request(f"p{i}", prompt, params)
    run = await run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for i in range(4):
        assert run.finish[(f"p{i}", 0)] == FinishReason.STOP
        _valid_person(smollm2_path, run.tokens[(f"p{i}", 0)])
    assert_all_free_or_cached(engine)


async def test_regex_and_choice(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path)
    prompt = _chat(smollm2_path, "Give me a code and pick a color.")
    engine.add_request("re", prompt, greedy(16, guide=Guide(GuideKind.REGEX, "[A-Z]{3}-[0-9]{2}")))
    choices = ["red", "green", "blue"]
    engine.add_request("ch", prompt, greedy(8, guide=Guide(GuideKind.CHOICE, json.dumps(choices))))
    run = await run_all(engine)
    import re

    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", _text(smollm2_path, run.tokens[("re", 0)]))
    assert _text(smollm2_path, run.tokens[("ch", 0)]) in choices


async def test_bad_guide_is_rejected_before_any_block(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path)
    prompt = _chat(smollm2_path, "Hi")
    bad = Guide(GuideKind.JSON_SCHEMA, json.dumps({"type": "nonsense"}))
    engine.add_request("bad", prompt, greedy(8, guide=bad))
    engine.add_request("ebnf", prompt, greedy(8, guide=Guide(GuideKind.GRAMMAR, "root ::= (")))
    run = await run_all(engine)
    rejected = {o.request_id: o for o in run.outputs if o.rejected}
    assert set(rejected) == {"bad", "ebnf"}
    assert all(o.finish_reason == FinishReason.ERROR and o.error for o in rejected.values())
    assert "nonsense" in rejected["bad"].error and ".cc" not in rejected["bad"].error
    assert blocks_in_use(engine) == 0 and engine.scheduler.num_preemptions == 0
    assert_all_free_or_cached(engine)
