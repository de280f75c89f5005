"""The prefix-cache hash chain.

A full block's hash names its contents *and* everything before it, so two sequences share a block
only when their whole prefixes agree. The encoding is canonical (fixed byte order, explicit
lengths), so any implementation in any language reproduces it; tests/kvmanager/test_hashing.py
pins it with test vectors. Changing it invalidates every persisted index: bump the version tags.

Encoding (all integers unsigned little-endian; `||` is concatenation; H = SHA-256):

    extra_digest = H( b"pagemesh-kv-extra-v1"
                      || u32(len(fp)) || fp          # fp   = model fingerprint, UTF-8
                      || u32(len(salt)) || salt )    # salt = cache_salt, UTF-8 ("" = none)

    block_hash_i = H( b"pagemesh-kv-block-v1"
                      || parent                      # 32 bytes: block_hash_{i-1}; ROOT for i = 0
                      || extra_digest                # 32 bytes
                      || u32(n) || u32(t_0) || ... || u32(t_{n-1}) )   # the block's token ids

    ROOT = 32 zero bytes

Extra keys enter through their digest, so kvmanager stores (and persists) 32 opaque bytes per
sequence instead of a tenant's salt. Token ids are < 2**32 (they are uint32 on the wire).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence

from pagemesh.proto import packed_ids

ROOT = bytes(32)
HASH_SIZE = 32
_EXTRA_TAG = b"pagemesh-kv-extra-v1"
_BLOCK_TAG = b"pagemesh-kv-block-v1"
_U32 = struct.Struct("<I")


def extra_digest(model_fingerprint: str, cache_salt: str = "") -> bytes:
    fp = model_fingerprint.encode()
    salt = cache_salt.encode()
    return hashlib.sha256(
        _EXTRA_TAG + _U32.pack(len(fp)) + fp + _U32.pack(len(salt)) + salt
    ).digest()


def token_bytes(token_ids: Sequence[int]) -> bytes:
    """u32 little-endian encoding of the ids: the wire's packed form (proto/packed_ids.py).
    Raises OverflowError for ids outside [0, 2**32)."""
    return packed_ids.pack(token_ids)


def block_hash(parent: bytes, extra: bytes, token_ids: Sequence[int]) -> bytes:
    return hashlib.sha256(
        _BLOCK_TAG + parent + extra + _U32.pack(len(token_ids)) + token_bytes(token_ids)
    ).digest()


def iter_chain(
    extra: bytes, token_ids: Sequence[int], block_size: int, num_blocks: int, parent: bytes = ROOT
) -> Iterator[bytes]:
    """Lazily, the hashes of the first `num_blocks` full blocks of `token_ids`, chained from
    `parent` (block_hash's bytes exactly). The ids are encoded once for all blocks: per block,
    slicing the ids and encoding them was most of a long prompt's match cost (an Allocate of a
    1k-token cached prefix hashes 64 blocks)."""
    data = token_bytes(token_ids[: num_blocks * block_size])
    return iter_chain_data(extra, data, block_size, 0, num_blocks, parent)


def iter_chain_data(
    extra: bytes, data: bytes, block_size: int, start: int, stop: int, parent: bytes = ROOT
) -> Iterator[bytes]:
    """Lazily, the hashes of full blocks [start, stop) of `data` (token_bytes' encoding),
    chained from `parent`, the hash of block start - 1 (ROOT when start is 0)."""
    sha256 = hashlib.sha256
    head = _BLOCK_TAG
    tail = extra + _U32.pack(block_size)  # the same for every block: concatenated once
    step = 4 * block_size
    h = parent
    for off in range(start * step, stop * step, step):
        h = sha256(head + h + tail + data[off : off + step]).digest()
        yield h


def chain_data(
    extra: bytes, data: bytes, block_size: int, start: int, stop: int, parent: bytes = ROOT
) -> list[bytes]:
    """iter_chain_data's hashes as a list, without a generator's step per block (the router
    hashes a whole prompt, ~130 blocks for 2k tokens, on every routing call)."""
    sha256 = hashlib.sha256
    head = _BLOCK_TAG
    tail = extra + _U32.pack(block_size)
    step = 4 * block_size
    h = parent
    out: list[bytes] = []
    append = out.append
    for off in range(start * step, stop * step, step):
        h = sha256(head + h + tail + data[off : off + step]).digest()
        append(h)
    return out


# ChainMemo's bound: about 17 MiB when full (measured; a 132-byte key and a 32-byte hash an
# entry), the blocks of 512 contexts of 2k tokens.
MEMO_ENTRIES = 1 << 16


class ChainMemo:
    """chain_data from block 0, remembering each block's hash by its input (parent hash, extra
    digest, block size and token bytes: all of SHA-256's input but the constant tag), so that a
    prefix routed before (a tenant's shared context, a conversation's earlier turns) is looked
    up, not hashed again: a dict lookup costs a fraction of a SHA-256 call from Python, and
    routing hashes every block of every prompt. Exact: the same input always gives the same
    hash. Bounded: emptied when it would grow past `max_entries`."""

    def __init__(self, max_entries: int = MEMO_ENTRIES) -> None:
        self.max_entries = max_entries
        self._memo: dict[bytes, bytes] = {}

    def __len__(self) -> int:
        return len(self._memo)

    def chain(self, extra: bytes, data: bytes, block_size: int, stop: int) -> list[bytes]:
        """The hashes of full blocks [0, stop) of `data`, as chain_data(extra, data,
        block_size, 0, stop)."""
        memo = self._memo
        if len(memo) + stop > self.max_entries:
            memo.clear()
        sha256 = hashlib.sha256
        head = _BLOCK_TAG
        tail = extra + _U32.pack(block_size)
        step = 4 * block_size
        get = memo.get
        h = ROOT
        out: list[bytes] = []
        append = out.append
        for off in range(0, stop * step, step):
            key = h + tail + data[off : off + step]
            nxt = get(key)
            if nxt is None:
                nxt = memo[key] = sha256(head + key).digest()
            h = nxt
            append(h)
        return out


def chain(
    extra: bytes, token_ids: Sequence[int], block_size: int, num_blocks: int, parent: bytes = ROOT
) -> list[bytes]:
    """Hashes of the first `num_blocks` full blocks of `token_ids`, chained from `parent`."""
    return list(iter_chain(extra, token_ids, block_size, num_blocks, parent))


def salt_id(cache_salt: str) -> str:
    """A tenant's label in stats: a digest, never the salt itself ("" for no salt)."""
    if not cache_salt:
        return ""
    return hashlib.sha256(b"pagemesh-kv-tenant-v1" + cache_salt.encode()).hexdigest()[:16]
