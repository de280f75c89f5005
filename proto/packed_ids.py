"""Token ids in the bytes fields of the gRPC messages (GenerateRequest.prompt_token_data,
AllocateRequest.token_data), one encoding for every end: u32 little-endian, 4 bytes an id. It is
also the encoding kvmanager's hash chain reads (services/kvmanager/hashing.py), so a prompt
packed once by the executor is hashed as it arrives."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

_LITTLE = sys.byteorder == "little"


def pack(ids: Iterable[int]) -> bytes:
    """The ids' bytes (array('I') is 4 bytes on every CPython target). Raises OverflowError
    for an id outside [0, 2**32), TypeError for a non-integer."""
    arr = array("I", ids)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def unpack(data: bytes) -> array:
    """The ids of `data` as array('I'). Raises ValueError when it is not whole ids."""
    if len(data) % 4:
        raise ValueError("must be whole u32 ids (a multiple of 4 bytes)")
    arr = array("I", data)
    if not _LITTLE:
        arr.byteswap()
    return arr


def common_prefix(a: bytes, b: bytes, unit: int, limit: int | None = None) -> int:
    """How many leading `unit`-byte pieces (4: ids; 4 x block size: KV blocks) two packed
    prompts share, at most `limit`: bytes comparisons (memcmp), a binary search once they
    part. Both kvmanager (a prompt's hash chain from the previous one's) and the executor (a
    prompt's ids from the previous one's) start from what the prompt before had in common."""
    k = min(len(a), len(b)) // unit
    if limit is not None:
        k = min(k, limit)
    if a[: k * unit] == b[: k * unit]:
        return k
    lo, hi = 0, k  # pieces [0, lo) agree, [0, hi) do not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[: mid * unit] == b[: mid * unit]:
            lo = mid
        else:
            hi = mid
    return lo
