"""How kvmanager's state is laid out in Redis: the keys, the encoding of each record, and the
RESP packing of a write batch. No I/O here (persistence.py does the reading and writing).

Keys (P = the prefix, default "pagemesh:kv:"; E = executor id; N = its epoch):
  P executors          HASH  E -> JSON {epoch, num_blocks, block_size, model_fingerprint,
                                        address, model, max_model_len} (the last three absent
                                        in records written before the fleet: read as empty)
  P epochs             HASH  E -> highest epoch ever handed out (epochs never repeat)
  P stats              HASH  "*" | "ex:E" | "tenant:<salt digest>" -> "qtok,htok,qreq,hreq"
  P ex:E:N:meta        HASH  next_stamp, evictions, spills, restores, host_drops
  P ex:E:N:blocks      HASH  block id -> <u32 ref, i64 stamp, f64 birth> + hash (0 or 32 bytes)
  P ex:E:N:index       HASH  hash (32 bytes) -> block id: the prefix index
  P ex:E:N:seqs        HASH  seq id -> extra digest (32 bytes) + tenant digest (ASCII)
  P ex:E:N:host        HASH  host block id -> <i64 stamp, f64 birth> + hash (0 or 32 bytes): the
                             host tier (block_pool.py), its index rebuilt from these on restore
  P ex:E:N:tables      HASH  "<seq id>|t<k>" -> block ids [16k, 16k+16) of its table, u32 each
                             "<seq id>|h<k>" -> its chain hashes [4k, 4k+4), 32 bytes each
Tables only grow (or have blocks replaced by copy-on-write) and hash chains only grow, so a
write rewrites a changed sequence's chunks from its first changed entry on (tens of bytes, not
its whole table), and every sequence of a batch goes into one HSET: a batch is a constant number
of commands however many sequences changed. Blocks never touched since registration (free,
initial order) have no record. No prompt text, no salt and no token id is stored: only hashes,
digests and block ids. Keys of an epoch are dropped when its executor registers again.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Iterable

from pagemesh.services.kvmanager import hashing
from pagemesh.services.kvmanager.manager import ExecutorState, SeqState

DEFAULT_PREFIX = "pagemesh:kv:"
EPOCH_KEYS = (
    "meta",
    "blocks",
    "index",
    "seqs",
    "tables",
    "host",
)  # the per-epoch hashes, in that order
TABLE_CHUNK = 16  # block ids per tables field (64 bytes: what an append rewrites)
HASH_CHUNK = 4  # chain hashes per tables field (128 bytes)
_BLOCK = struct.Struct("<Iqd")
_HOST_BLOCK = struct.Struct("<qd")


class Keys:
    """The key names under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def top(self, name: str) -> str:
        """ "executors", "epochs" or "stats"."""
        return self.prefix + name

    def epoch(self, eid: str, epoch: int, what: str) -> str:
        return f"{self.prefix}ex:{eid}:{epoch}:{what}"

    def epoch_keys(self, eid: str, epoch: int) -> list[str]:
        return [self.epoch(eid, epoch, w) for w in EPOCH_KEYS]


def encode_block(ref: int, stamp: int, birth: float, h: bytes | None) -> bytes:
    return _BLOCK.pack(ref, stamp, birth) + (h or b"")


def decode_block(raw: bytes) -> tuple[int, int, float, bytes | None]:
    ref, stamp, birth = _BLOCK.unpack_from(raw)
    h = raw[_BLOCK.size :]
    return ref, stamp, birth, (h if h else None)


def block_records(ex: ExecutorState, blocks: Iterable[int]) -> dict[bytes, bytes]:
    """The blocks fields of `blocks`, from their current state."""
    p = ex.pool
    ref, stamp, birth, hsh = p.ref, p.stamp, p.birth, p.hash
    return {b"%d" % b: encode_block(ref[b], stamp[b], birth[b], hsh[b]) for b in blocks}


def host_block_records(ex: ExecutorState, host_blocks: Iterable[int]) -> dict[bytes, bytes]:
    """The host fields of `host_blocks`, from their current state."""
    p = ex.pool
    stamp, birth, hsh = p.host_stamp, p.host_birth, p.host_hash
    return {
        b"%d" % hb: _HOST_BLOCK.pack(stamp[hb], birth[hb]) + (hsh[hb] or b"") for hb in host_blocks
    }


def decode_host_block(raw: bytes) -> tuple[int, float, bytes | None]:
    stamp, birth = _HOST_BLOCK.unpack_from(raw)
    h = raw[_HOST_BLOCK.size :]
    return stamp, birth, (h if h else None)


def executor_record(ex: ExecutorState) -> bytes:
    return json.dumps(
        {
            "epoch": ex.epoch,
            "num_blocks": ex.num_blocks,
            "block_size": ex.block_size,
            "model_fingerprint": ex.model_fingerprint,
            "address": ex.address,
            "model": ex.model,
            "max_model_len": ex.max_model_len,
            "num_host_blocks": ex.num_host_blocks,
            "kv_block_bytes": ex.kv_block_bytes,
        }
    ).encode()


def meta_record(ex: ExecutorState) -> dict[bytes, bytes]:
    return {
        b"next_stamp": int_bytes(ex.pool.next_stamp),
        b"evictions": int_bytes(ex.pool.evictions),
        b"spills": int_bytes(ex.pool.num_spills),
        b"restores": int_bytes(ex.pool.num_restores),
        b"host_drops": int_bytes(ex.pool.host_drops),
    }


def encode_seq_meta(s: SeqState) -> bytes:
    return s.extra + s.tenant.encode()


def u32_bytes(ids: list[int]) -> bytes:
    return hashing.token_bytes(ids)  # the same canonical little-endian u32 encoding


def seq_fields(
    sid: bytes, seq: SeqState, blocks_from: int, hashes_from: int, out: dict[bytes, bytes]
) -> None:
    """The tables fields holding seq's blocks from `blocks_from` and hashes from `hashes_from`."""
    blocks, hashes = seq.blocks, seq.hashes
    for c in range(blocks_from // TABLE_CHUNK, -(-len(blocks) // TABLE_CHUNK)):
        out[b"%s|t%d" % (sid, c)] = u32_bytes(blocks[c * TABLE_CHUNK : (c + 1) * TABLE_CHUNK])
    for c in range(hashes_from // HASH_CHUNK, -(-len(hashes) // HASH_CHUNK)):
        out[b"%s|h%d" % (sid, c)] = b"".join(hashes[c * HASH_CHUNK : (c + 1) * HASH_CHUNK])


def stale_seq_fields(sid: str, num_blocks: int, num_hashes: int) -> list[bytes]:
    """The tables fields of a sequence of which Redis holds that many blocks and hashes."""
    sid_b = sid.encode()
    return [b"%s|t%d" % (sid_b, c) for c in range(-(-num_blocks // TABLE_CHUNK))] + [
        b"%s|h%d" % (sid_b, c) for c in range(-(-num_hashes // HASH_CHUNK))
    ]


def decode_seqs(metas: dict[bytes, bytes], tables: dict[bytes, bytes]) -> dict[str, SeqState]:
    chunks: dict[bytes, dict[bytes, bytes]] = {}
    for field, value in tables.items():
        sid, _, spec = field.rpartition(b"|")  # a seq id may hold "|"; the spec never does
        chunks.setdefault(sid, {})[spec] = value
    out = {}
    for sid, meta in metas.items():
        parts = chunks.get(sid, {})
        blocks = array("I")
        blocks.frombytes(b"".join(parts[b"t%d" % c] for c in range(_count(parts, b"t"))))
        if sys.byteorder != "little":
            blocks.byteswap()
        hs = b"".join(parts[b"h%d" % c] for c in range(_count(parts, b"h")))
        out[sid.decode()] = SeqState(
            meta[:32],
            meta[32:].decode(),
            blocks.tolist(),
            [hs[i : i + 32] for i in range(0, len(hs), 32)],
        )
    return out


def _count(parts: dict[bytes, bytes], kind: bytes) -> int:
    n = 0
    while kind + b"%d" % n in parts:
        n += 1
    return n


def encode_stats(totals: dict[str, tuple[int, int, int, int]]) -> dict[bytes, bytes]:
    return {k.encode(): ",".join(map(str, v)).encode() for k, v in totals.items()}


def decode_stats(raw: dict[bytes, bytes]) -> dict[str, tuple[int, int, int, int]]:
    out = {}
    for k, v in raw.items():
        q_tok, h_tok, q_req, h_req = (int(x) for x in v.split(b","))
        out[k.decode()] = (q_tok, h_tok, q_req, h_req)
    return out


def int_bytes(v: int) -> bytes:
    return b"%d" % v


class Batch:
    """Commands packed straight into RESP, sent as one MULTI/EXEC write. redis-py's pipeline
    packs every argument through several Python layers; for a few hundred records per batch
    that cost sits on the event loop that serves allocations, so it is done here in one pass."""

    __slots__ = ("n", "parts", "records")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.n = 0  # commands
        self.records = 0  # fields written or deleted, for the pending/written counters

    def cmd(self, *args: bytes) -> None:
        parts = self.parts
        parts.append(b"*%d\r\n" % len(args))
        for a in args:
            parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
        self.n += 1

    def hset(self, key: str, fields: dict[bytes, bytes]) -> None:
        if not fields:
            return
        parts = self.parts
        k = key.encode()
        parts.append(b"*%d\r\n$4\r\nHSET\r\n$%d\r\n%s\r\n" % (2 + 2 * len(fields), len(k), k))
        for f, v in fields.items():
            parts.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(f), f, len(v), v))
        self.n += 1
        self.records += len(fields)

    def hdel(self, key: str, fields: list[bytes]) -> None:
        if fields:
            self.cmd(b"HDEL", key.encode(), *fields)
            self.records += len(fields)

    def delete(self, *keys: str | bytes) -> None:
        if keys:
            self.cmd(b"DEL", *(k.encode() if isinstance(k, str) else k for k in keys))
