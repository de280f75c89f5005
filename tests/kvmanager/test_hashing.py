"""Test vectors pinning the hash-chain encoding documented in services/kvmanager/hashing.py."""

import hashlib
import struct

import pytest
from pagemesh.services.kvmanager import hashing

FP = "smollm2-135m"
VECTORS = {
    "extra(fp, '')": "d8fbb20acd001a3a765625f401f110d7e5058e825745e250476fed4d08a0cabd",
    "extra(fp, 'tenant-a')": "05bb53162c1298e2edf3b6597cc431d6b9820df36ecd26662ce35a4d17b790f3",
    "h0 = block(ROOT, [1,2,3,4])": "0b0a1ee2a0ff286cc5e3bd74d37939121d34ecd45e7f9b2c42b045be174d6385",
    "h1 = block(h0, [5,6,7,8])": "dad094f18d302116d1528e43a0fdab3b2b04eff7a5391a9eeff6b35f9ed5399f",
    "salted block(ROOT, [1,2,3,4])": "9f4f4588263188ba03d1ec6be14c4f05c9319c4de3c8b7d16b2e85a91857374c",
    "block(ROOT, [0, 2**32-1, 65536, 7])": "9865570df14fe8e9b6d48cf133400331091fdf0bd75248f1001d08bd94457a61",
}


def test_vectors() -> None:
    e = hashing.extra_digest(FP)
    es = hashing.extra_digest(FP, "tenant-a")
    h0 = hashing.block_hash(hashing.ROOT, e, [1, 2, 3, 4])
    got = {
        "extra(fp, '')": e,
        "extra(fp, 'tenant-a')": es,
        "h0 = block(ROOT, [1,2,3,4])": h0,
        "h1 = block(h0, [5,6,7,8])": hashing.block_hash(h0, e, [5, 6, 7, 8]),
        "salted block(ROOT, [1,2,3,4])": hashing.block_hash(hashing.ROOT, es, [1, 2, 3, 4]),
        "block(ROOT, [0, 2**32-1, 65536, 7])": hashing.block_hash(
            hashing.ROOT, e, [0, 2**32 - 1, 65536, 7]
        ),
    }
    assert {k: v.hex() for k, v in got.items()} == VECTORS


def test_encoding_as_documented() -> None:
    """An independent spelling of the docstring's encoding gives the same bytes."""
    fp, salt = FP.encode(), b"tenant-a"
    extra = hashlib.sha256(
        b"pagemesh-kv-extra-v1"
        + struct.pack("<I", len(fp))
        + fp
        + struct.pack("<I", len(salt))
        + salt
    ).digest()
    assert extra == hashing.extra_digest(FP, "tenant-a")
    tokens = [9, 300, 70000]
    parent = bytes(range(32))
    expect = hashlib.sha256(
        b"pagemesh-kv-block-v1"
        + parent
        + extra
        + struct.pack("<I", 3)
        + struct.pack("<3I", *tokens)
    ).digest()
    assert hashing.block_hash(parent, extra, tokens) == expect


def test_chain_and_salt_id() -> None:
    e = hashing.extra_digest(FP)
    hs = hashing.chain(e, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4, 2)
    assert [h.hex() for h in hs] == [
        VECTORS["h0 = block(ROOT, [1,2,3,4])"],
        VECTORS["h1 = block(h0, [5,6,7,8])"],
    ]
    # The packed-bytes forms, lazy and as a list, from block 0 and from the middle of a chain.
    data = hashing.token_bytes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert list(hashing.iter_chain_data(e, data, 4, 0, 2)) == hs
    assert hashing.chain_data(e, data, 4, 0, 2) == hs
    assert hashing.chain_data(e, data, 4, 1, 2, hs[0]) == hs[1:]
    assert hashing.chain_data(e, data, 4, 2, 2) == []
    assert hashing.salt_id("") == ""
    assert hashing.salt_id("tenant-a") == "1d5ac8631f6771f5"
    assert "tenant" not in hashing.salt_id("tenant-a")


def test_out_of_range_token() -> None:
    with pytest.raises(OverflowError):
        hashing.block_hash(hashing.ROOT, bytes(32), [2**32])


def test_chain_memo_gives_chain_data_hashes() -> None:
    """Hits, misses, another extra digest or block size, a prompt diverging mid-way, and the
    bound (emptied, then filled again) all give exactly chain_data's hashes."""
    memo = hashing.ChainMemo(max_entries=40)
    e, es = hashing.extra_digest(FP), hashing.extra_digest(FP, "tenant-a")
    base = list(range(1000, 1100))  # 25 blocks of 4, 12 of 8
    fork = base[:50] + [7] * 50
    for extra, bs, tokens in [
        (e, 4, base),
        (e, 4, base),  # all hits
        (es, 4, base),  # another tenant: its own hashes (and the bound: emptied first)
        (e, 8, base),
        (e, 4, fork),  # the first 12 blocks hit, the rest diverge
        (e, 4, base[:9]),
    ]:
        data = hashing.token_bytes(tokens)
        n = len(tokens) // bs
        assert memo.chain(extra, data, bs, n) == hashing.chain_data(extra, data, bs, 0, n)
        assert len(memo) <= 40
    assert memo.chain(e, hashing.token_bytes(base), 4, 0) == []
