"""An admission round (Manager.allocate_many) reuses the previous prompt's hash chain for the
blocks two prompts share. It must allocate exactly what one `allocate` a prompt does: same
tables, same cached lengths, same index and stats, whatever the prompts share and where they
part (mid-block, at a block boundary, in the last block), with salts mixed in."""

from __future__ import annotations

import random

import pytest
from pagemesh.services.kvmanager import hashing
from pagemesh.services.kvmanager.api import InvalidRequest
from pagemesh.services.kvmanager.manager import Manager

BS = 4


def twin_managers(num_blocks: int) -> tuple[Manager, Manager, int]:
    a, b = Manager(), Manager()
    epoch = a.register("ex", num_blocks, BS, "fp")
    assert b.register("ex", num_blocks, BS, "fp") == epoch
    return a, b, epoch


def commit_prompt(m: Manager, epoch: int, sid: str, tokens: list[int], salt: str) -> None:
    m.allocate("ex", epoch, sid, tokens, salt)
    m.commit(
        "ex", epoch, [(sid, i, tokens[i * BS : (i + 1) * BS]) for i in range(len(tokens) // BS)]
    )


def mutate(rng: random.Random, base: list[int]) -> list[int]:
    """A prompt sharing some of `base`: cut anywhere, then new ids (or `base` itself)."""
    if rng.random() < 0.2:
        return list(base)
    cut = rng.randrange(0, len(base) + 1)
    return base[:cut] + [rng.randrange(50) for _ in range(rng.randrange(1, 3 * BS))]


@pytest.mark.parametrize("seed", range(40))
def test_round_allocates_as_one_call_a_prompt(seed: int) -> None:
    rng = random.Random(seed)
    one, many, epoch = twin_managers(num_blocks=400)
    bases = [[rng.randrange(50) for _ in range(rng.randrange(1, 8 * BS))] for _ in range(3)]
    salts = ["", "", "tenant-b"]
    # Some prefixes are cached before the round (committed and released: evictable, ref 0).
    for i, base in enumerate(bases):
        if rng.random() < 0.7:
            salt = rng.choice(salts)
            for m in (one, many):
                commit_prompt(m, epoch, f"warm{i}", base, salt)
                m.release("ex", epoch, [f"warm{i}"])
    entries = []
    for k in range(rng.randrange(1, 20)):
        prompt = mutate(rng, rng.choice(bases))
        as_bytes = rng.random() < 0.5
        entries.append(
            (f"s{k}", hashing.token_bytes(prompt) if as_bytes else prompt, rng.choice(salts), 2)
        )
    got, err = many.allocate_many("ex", epoch, entries)
    assert err is None
    want = [one.allocate("ex", epoch, sid, toks, salt, la) for sid, toks, salt, la in entries]
    assert got == want
    assert many.snapshot() == one.snapshot()
    assert many.stats.totals() == one.stats.totals()
    many.check()


def test_identical_prompts_share_every_cached_block() -> None:
    m, _, epoch = twin_managers(num_blocks=64)
    prompt = list(range(4 * BS + 1))
    commit_prompt(m, epoch, "w", prompt, "")
    m.release("ex", epoch, ["w"])
    got, err = m.allocate_many("ex", epoch, [(f"s{i}", prompt, "", 0) for i in range(3)])
    assert err is None
    assert [a.num_cached_tokens for a in got] == [4 * BS] * 3
    assert got[0].block_ids[:4] == got[1].block_ids[:4] == got[2].block_ids[:4]
    assert m.executors["ex"].pool.ref[got[0].block_ids[0]] == 3


def test_token_data_must_be_whole_ids() -> None:
    m, _, epoch = twin_managers(num_blocks=8)
    with pytest.raises(InvalidRequest, match="multiple of 4"):
        m.allocate("ex", epoch, "s", b"\x01\x00\x00\x00\x02")
    got, err = m.allocate_many("ex", epoch, [("s", b"\x01\x00", "", 0)])
    assert got == [] and isinstance(err, InvalidRequest)
    with pytest.raises(InvalidRequest, match="integers"):
        m.allocate("ex", epoch, "s", [1, -2])
    m.check()
