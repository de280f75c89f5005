"""proto/packed_ids: the packed u32 form and the common-prefix search both services use."""

from __future__ import annotations

import random

from pagemesh.proto import packed_ids


def _naive(a: bytes, b: bytes, unit: int, limit: int | None) -> int:
    n = 0
    while (n + 1) * unit <= min(len(a), len(b)) and a[n * unit : (n + 1) * unit] == b[
        n * unit : (n + 1) * unit
    ]:
        n += 1
    return n if limit is None else min(n, limit)


def test_common_prefix_matches_a_piece_by_piece_scan() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        base = [rng.randrange(1 << 32) for _ in range(rng.randrange(0, 300))]
        other = base[: rng.randrange(0, len(base) + 1)]
        if rng.random() < 0.7:
            other += [rng.randrange(1 << 32) for _ in range(rng.randrange(0, 80))]
        if other and rng.random() < 0.3:
            other[rng.randrange(len(other))] ^= 1 << rng.randrange(32)
        a, b = packed_ids.pack(base), packed_ids.pack(other)
        unit = 4 * rng.choice((1, 1, 2, 16))
        limit = rng.choice((None, rng.randrange(0, 100)))
        assert packed_ids.common_prefix(a, b, unit, limit) == _naive(a, b, unit, limit)
        assert packed_ids.common_prefix(b, a, unit, limit) == _naive(a, b, unit, limit)


def test_pack_unpack_round_trip() -> None:
    ids = [0, 1, 2**31, 2**32 - 1]
    assert list(packed_ids.unpack(packed_ids.pack(ids))) == ids
    assert len(packed_ids.pack(ids)) == 16
