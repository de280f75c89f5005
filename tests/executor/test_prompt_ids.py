"""PromptIds: the engine's prompt conversion, with a shared prefix's int objects reused."""

from __future__ import annotations

import random
from array import array

import numpy as np
import pytest
from pagemesh.proto import packed_ids
from pagemesh.services.executor.engine_api import PackedIds
from pagemesh.services.executor.prompt_ids import MIN_SHARED_IDS, PromptIds


def _expect(ids: list[int]) -> tuple[list[int], bytes, int, int]:
    return list(ids), packed_ids.pack(ids), min(ids), max(ids)


def test_random_prompts_with_and_without_common_prefixes() -> None:
    rng = random.Random(7)
    conv = PromptIds()
    system = [rng.randrange(50_000) for _ in range(300)]
    previous: list[int] = []
    for _ in range(300):
        kind = rng.randrange(5)
        if kind == 0:  # unrelated
            ids = [rng.randrange(1 << 32) for _ in range(rng.randrange(1, 400))]
        elif kind == 1:  # the shared system prompt and a user part
            ids = system + [rng.randrange(50_000) for _ in range(rng.randrange(0, 200))]
        elif kind == 2:  # a prefix of the previous prompt
            ids = previous[: rng.randrange(1, len(previous) + 1)]
        elif kind == 3:  # the previous prompt grown (a conversation's next turn)
            ids = previous + [rng.randrange(50_000) for _ in range(rng.randrange(1, 100))]
        else:  # the previous prompt with one id changed somewhere
            ids = list(previous)
            ids[rng.randrange(len(ids))] ^= 1
        form = rng.randrange(3)
        arg = (
            ids
            if form == 0
            else packed_ids.unpack(packed_ids.pack(ids))
            if form == 1
            else (np.asarray(ids, np.int64))
        )
        got = conv.convert(arg)
        assert got == _expect(ids)
        assert all(type(t) is int for t in got[0])
        # The engine appends outputs to the list it got: later prompts must not see them.
        got[0].extend(rng.randrange(50_000) for _ in range(rng.randrange(0, 50)))
        previous = ids


def test_common_prefix_shares_int_objects() -> None:
    conv = PromptIds()
    system = list(range(100_000, 100_000 + 2 * MIN_SHARED_IDS))
    first = conv.convert([*system, 5, 6, 7])[0]
    second = conv.convert(packed_ids.unpack(packed_ids.pack([*system, 8, 9])))[0]
    assert second == [*system, 8, 9]
    assert all(a is b for a, b in zip(first[: len(system)], second[: len(system)], strict=True))
    assert first is not second

    # Below the threshold a prompt is converted on its own.
    short = list(range(200_000, 200_000 + MIN_SHARED_IDS - 1))
    a = conv.convert([*short, 1])[0]
    b = conv.convert([*short, 2])[0]
    assert b == [*short, 2]
    assert not any(x is y for x, y in zip(a[:-1], b[:-1], strict=True))


def test_edge_inputs() -> None:
    conv = PromptIds()
    assert conv.convert([]) == ([], b"", 0, 0)
    assert conv.convert(array("I")) == ([], b"", 0, 0)
    # Out of the u32 range: the range tells the caller to refuse it, nothing is packed.
    ids, data, lo, hi = conv.convert([3, -1, 2])
    assert (ids, data, lo, hi) == ([3, -1, 2], b"", -1, 3)
    assert conv.convert([1 << 32])[3] == 1 << 32
    assert conv.convert([0, (1 << 32) - 1]) == _expect([0, (1 << 32) - 1])
    with pytest.raises(ValueError, match="integers"):
        conv.convert([1, 2.5])
    with pytest.raises(ValueError, match="integers"):
        conv.convert(["1"])
    with pytest.raises(ValueError, match="integers"):
        conv.convert([1 << 70])


def test_packed_prompts_are_kept_as_they_came() -> None:
    """The wire's bytes (PackedIds) give the same ids and range as any other form, and are the
    packed prompt themselves: not unpacked and packed again."""
    rng = random.Random(3)
    conv = PromptIds()
    system = [rng.randrange(1 << 32) for _ in range(2 * MIN_SHARED_IDS)]
    for _ in range(50):
        ids = (system if rng.random() < 0.5 else []) + [
            rng.randrange(1 << 32) for _ in range(rng.randrange(1, 100))
        ]
        data = packed_ids.pack(ids)
        got = conv.convert(PackedIds(data))
        assert got == _expect(ids)
        assert got[1] is data
        assert all(type(t) is int for t in got[0])
    assert conv.convert(PackedIds(b"")) == ([], b"", 0, 0)
    packed = PackedIds(packed_ids.pack([5, 6, 7]))
    assert len(packed) == 3 and list(packed) == [5, 6, 7]
    with pytest.raises(ValueError, match="whole u32 ids"):
        PackedIds(b"\x01\x02\x03")
