"""Write-behind persistence of kvmanager's state in Redis, and its restore on start.

Nothing on the allocation path awaits Redis: the core marks what changed in dirty sets (block
ids, index hashes, sequence ids, executors); a background task wakes every `interval` seconds,
swaps the dirty sets out, reads the *current* values of what they name and writes them in one
MULTI/EXEC pipeline. Reading and swapping happen with no await in between, so each batch is a
consistent snapshot of one moment, and since it is atomic Redis always holds such a snapshot.
Changes coalesce: a block touched 50 times between flushes is written once.

If a batch fails (Redis down, timeout), its dirty sets are gone, so the next successful flush
rewrites everything (a full snapshot, stale keys deleted, in one MULTI/EXEC). That also covers a
Redis that restarted and lost its last second of AOF. Meanwhile serving goes on; `connected` is
False and the pending counter grows.

Keys (P = the prefix, default "pagemesh:kv:"; E = executor id; N = its epoch):
  P executors          HASH  E -> JSON {epoch, num_blocks, block_size, model_fingerprint}
  P epochs             HASH  E -> highest epoch ever handed out (epochs never repeat)
  P stats              HASH  "*" | "ex:E" | "tenant:<salt digest>" -> "qtok,htok,qreq,hreq"
  P ex:E:N:meta        HASH  next_stamp, evictions
  P ex:E:N:blocks      HASH  block id -> <u32 ref, i64 stamp, f64 birth> + hash (0 or 32 bytes)
  P ex:E:N:index       HASH  hash (32 bytes) -> block id: the prefix index
  P ex:E:N:seqs        HASH  seq id -> extra digest (32 bytes) + tenant digest (ASCII)
  P ex:E:N:tables      HASH  "<seq id>|t<k>" -> block ids [16k, 16k+16) of its table, u32 each
                             "<seq id>|h<k>" -> its chain hashes [4k, 4k+4), 32 bytes each
Tables only grow (or have blocks replaced by copy-on-write) and hash chains only grow, so a
flush rewrites a changed sequence's chunks from its first changed entry on (tens of bytes,
not its whole table), and every sequence of a batch goes into one HSET: a batch is a constant
number of commands however many sequences changed. Blocks never touched since registration (free,
initial order) have no record. No prompt text,
no salt and no token id is stored: only hashes, digests and block ids. Keys of an epoch are
dropped when its executor registers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
import sys
import time
from array import array
from dataclasses import dataclass

import redis.asyncio as aioredis
from pagemesh.services.kvmanager import hashing
from pagemesh.services.kvmanager.manager import ExecutorState, Manager, SeqState
from redis.exceptions import RedisError

log = logging.getLogger("pagemesh.kvmanager.persistence")

DEFAULT_PREFIX = "pagemesh:kv:"
PING_INTERVAL = 1.0  # seconds: how soon an idle kvmanager notices Redis going or coming back
# A flush builds its batch on the event loop that serves the RPCs (3-6 ms after an admission
# round of ~50 prompts). Started right after a call, it held whatever came next: in an H200 trace
# an executor's follow-up admission round waited 4-5 ms behind one, on the step's critical path.
# So a flush waits until no call came for QUIET_S, for at most MAX_DEFER_S in a row.
QUIET_S = 0.002
MAX_DEFER_S = 0.025
_BLOCK = struct.Struct("<Iqd")


def encode_block(ref: int, stamp: int, birth: float, h: bytes | None) -> bytes:
    return _BLOCK.pack(ref, stamp, birth) + (h or b"")


def decode_block(raw: bytes) -> tuple[int, int, float, bytes | None]:
    ref, stamp, birth = _BLOCK.unpack_from(raw)
    h = raw[_BLOCK.size :]
    return ref, stamp, birth, (h if h else None)


TABLE_CHUNK = 16  # block ids per tables field (64 bytes: what an append rewrites)
HASH_CHUNK = 4  # chain hashes per tables field (128 bytes)


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
            saved=True,
            saved_blocks=len(blocks),
            saved_hashes=len(hs) // 32,
        )
    return out


def _count(parts: dict[bytes, bytes], kind: bytes) -> int:
    n = 0
    while kind + b"%d" % n in parts:
        n += 1
    return n


def _num(v: bytes | str) -> int:
    return int(v)


@dataclass(slots=True)
class Counters:
    flushes: int = 0
    full_resyncs: int = 0
    errors: int = 0
    written: int = 0  # records written (HSET fields / HDELs)


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


def _b(v: int | str) -> bytes:
    return v.encode() if isinstance(v, str) else b"%d" % v


class Persistence:
    def __init__(
        self,
        manager: Manager,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        interval: float = 0.002,
        timeout: float = 1.0,
    ) -> None:
        assert manager.track_changes, "persistence needs Manager(track_changes=True)"
        self.m = manager
        self.url = url
        self.prefix = prefix
        self.interval = interval
        self.redis = aioredis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=0,
            retry_on_timeout=False,
        )
        self.connected = False
        self.full_resync = True  # until a full snapshot has been written
        self.in_flight = 0
        self.counters = Counters()
        self._stats_version = -1
        self.restored = False
        self._conn = None  # the write connection (see _connection)
        self._run_id: bytes | None = None
        self._task: asyncio.Task | None = None
        self.on_status_change = None  # callable(connected: bool), for health
        self._last_call = 0.0  # monotonic time of the last RPC that may have changed state
        self._waiting_since: float | None = None  # when a due flush began waiting for quiet

    def touch(self) -> None:
        """An RPC was just answered: the next flush waits for a quiet moment (QUIET_S)."""
        self._last_call = time.monotonic()

    def _should_wait(self) -> bool:
        """Whether a due flush waits for a quiet moment (a call came within QUIET_S), until it
        has waited MAX_DEFER_S."""
        now = time.monotonic()
        if now - self._last_call >= QUIET_S:
            return False
        if self._waiting_since is None:
            self._waiting_since = now
        return now - self._waiting_since < MAX_DEFER_S

    # -- keys -----------------------------------------------------------------------------------
    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def ex_key(self, eid: str, epoch: int, what: str) -> str:
        return f"{self.prefix}ex:{eid}:{epoch}:{what}"

    # -- pending --------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Changes not yet in Redis (0 means Redis holds the current state)."""
        m = self.m
        n = len(m.dirty_executors) + len(m.dropped_epochs) + self.in_flight
        for ex in m.executors.values():
            n += len(ex.pool.dirty_blocks) + len(ex.pool.dirty_hashes) + len(ex.dirty_seqs)  # type: ignore[arg-type]
        if self.m.stats.version != self._stats_version:
            n += 1
        if self.full_resync:
            n += 1 + sum(
                len(ex.seqs) + ex.pool.num_in_use + ex.pool.num_cached
                for ex in m.executors.values()
            )
        return n

    # -- restore --------------------------------------------------------------------------------
    async def restore(self) -> bool:
        """Loads the state Redis holds into the manager. Reads everything first, then applies it
        with no await in between; if executors registered meanwhile (a restore retried after a
        Redis outage at start), their state wins and Redis gets a full rewrite instead."""
        r = self.redis
        executors = await r.hgetall(self.k("executors"))
        epochs = await r.hgetall(self.k("epochs"))
        stats = await r.hgetall(self.k("stats"))
        per_ex = {}
        for eid_b, raw in executors.items():
            d = json.loads(raw)
            eid = eid_b.decode()
            keys = [self.ex_key(eid, d["epoch"], w) for w in ("blocks", "seqs", "meta")]
            blocks, seqs, meta = [await r.hgetall(k) for k in keys]
            seq_states = decode_seqs(seqs, await r.hgetall(self.ex_key(eid, d["epoch"], "tables")))
            per_ex[eid] = (d, blocks, seq_states, meta)
        self.restored = True
        m = self.m
        if m.executors:
            log.warning("executors registered before Redis answered: rewriting Redis from memory")
            self.full_resync = True
            self._set_connected(True)
            return False
        for eid_b, n in epochs.items():
            m.last_epoch[eid_b.decode()] = _num(n)
        for eid, (d, blocks, seqs, meta) in per_ex.items():
            ex = m.new_executor(
                eid, d["epoch"], d["num_blocks"], d["block_size"], d["model_fingerprint"]
            )
            self._restore_executor(ex, blocks, seqs, meta)
            m.executors[eid] = ex
            m.last_epoch[eid] = max(m.last_epoch.get(eid, 0), ex.epoch)
        totals = {k.decode(): tuple(int(x) for x in v.split(b",")) for k, v in stats.items()}
        m.stats.restore_totals(totals)  # type: ignore[arg-type]
        self._stats_version = m.stats.version
        # What was just read is what Redis holds: nothing to write back.
        m.dirty_executors.clear()
        m.dropped_epochs.clear()
        self.full_resync = False
        self._set_connected(True)
        log.info(
            "restored %d executor(s) from %s%s",
            len(m.executors),
            self.url,
            "".join(
                f"; {e.executor_id} epoch {e.epoch}: {len(e.seqs)} seqs, {len(e.pool.index)} hashes"
                for e in m.executors.values()
            ),
        )
        return True

    def _restore_executor(self, ex: ExecutorState, blocks: dict, seqs: dict, meta: dict) -> None:
        records = []
        for b_raw, raw in blocks.items():
            b = int(b_raw)
            if b < ex.num_blocks:
                ref, stamp, birth, h = decode_block(raw)
                records.append((b, ref, h, birth, stamp))
        ex.pool.restore(records, _num(meta.get(b"next_stamp", 0)))
        ex.pool.evictions = _num(meta.get(b"evictions", 0))
        ex.seqs.update(seqs)
        # Ref counts are persisted, and they agree with the tables (each batch is atomic); if
        # they ever did not, the tables are the truth.
        counts = [0] * ex.num_blocks
        for s in ex.seqs.values():
            for b in s.blocks:
                counts[b] += 1
        if counts != ex.pool.ref:
            log.error(
                "executor %s: persisted ref counts disagree with tables; using tables",
                ex.executor_id,
            )
            records = [
                (b, counts[b], ex.pool.hash[b], ex.pool.birth[b], ex.pool.stamp[b])
                for b in range(ex.num_blocks)
            ]
            ex.pool.index.clear()
            ex.pool.restore(records, ex.pool.next_stamp)
            self.full_resync = True
        for s in (ex.pool.dirty_blocks, ex.pool.dirty_hashes, ex.dirty_seqs):
            s.clear()  # type: ignore[union-attr]

    # -- write-behind ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kvmanager-write-behind")

    async def stop(self, flush: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if flush:
            try:
                await asyncio.wait_for(self.flush(), 2.0)
            except (RedisError, OSError, TimeoutError) as e:
                log.warning("final flush failed: %s", e)
        if self._conn is not None:
            await self._conn.disconnect()
        await self.redis.aclose()

    def _set_connected(self, ok: bool) -> None:
        if ok != self.connected:
            self.connected = ok
            if ok:
                log.info("redis %s: connected", self.url)
            else:
                log.error(
                    "redis %s: unreachable; serving on, will resync when it returns", self.url
                )
            if self.on_status_change is not None:
                self.on_status_change(ok)

    async def _run(self) -> None:
        backoff = 0.05
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            idle = self.restored and not self.full_resync and self.pending == 0
            if idle and time.monotonic() - last_ok < PING_INTERVAL:
                continue
            try:
                if not self.restored:  # Redis was down at start: load what it holds first
                    await self.restore()
                if idle:
                    await self.ping()  # notices an outage, or a restarted Redis, while idle
                elif self._should_wait():
                    continue
                else:
                    self._waiting_since = None
                    await self.flush()
                last_ok = time.monotonic()
                backoff = 0.05
            except (RedisError, OSError, TimeoutError) as e:
                self.counters.errors += 1
                self.full_resync = True
                if self.connected:
                    log.warning("redis write failed (%s: %s)", type(e).__name__, e)
                self._set_connected(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    async def _connection(self):
        """The dedicated write connection. On every (re)connect the server's run_id is checked:
        a different one means Redis restarted and may have lost recent writes (AOF fsyncs once a
        second), or came back empty, so the next flush rewrites everything."""
        conn = self._conn
        if conn is None:
            conn = self._conn = self.redis.connection_pool.make_connection()
        if not conn.is_connected:
            try:
                await conn.connect()
                await conn.send_packed_command(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
                info = await conn.read_response()
            except BaseException:
                await conn.disconnect()
                raise
            run_id = next(
                (
                    ln.split(b":", 1)[1].strip()
                    for ln in info.splitlines()
                    if ln.startswith(b"run_id:")
                ),
                b"",
            )
            if run_id != self._run_id:
                if self._run_id is not None:
                    log.warning("redis restarted (new run_id): rewriting the full state")
                    self.full_resync = True
                self._run_id = run_id
        return conn

    async def ping(self) -> None:
        conn = await self._connection()
        try:
            await conn.send_packed_command(b"*1\r\n$4\r\nPING\r\n", check_health=False)
            await conn.read_response()
        except BaseException:
            await conn.disconnect()
            raise
        self._set_connected(True)

    async def wait_flushed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.pending} writes still pending")
            await asyncio.sleep(0.002)

    async def flush(self) -> None:
        """Writes one batch (incremental, or a full snapshot after an error) in MULTI/EXEC.
        Any failure, cancellation included, leaves a full rewrite for the next flush: the
        failed batch's dirty sets are gone."""
        try:
            conn = await self._connection()  # may ask for a full rewrite
            if self.full_resync:
                await self._flush_full(conn)
            else:
                await self._flush_incremental(conn)
        except BaseException:
            self.full_resync = True
            raise
        self.counters.flushes += 1
        self._set_connected(True)

    def _epoch_keys(self, eid: str, epoch: int) -> list[str]:
        return [self.ex_key(eid, epoch, w) for w in ("meta", "blocks", "index", "seqs", "tables")]

    @staticmethod
    def _seq_writes(sid: str, seq: SeqState, metas: dict, fields: dict) -> None:
        """A new sequence whole; a known one from its first changed chunk on."""
        sid_b = sid.encode()
        if not seq.saved:
            metas[sid_b] = encode_seq_meta(seq)
            seq_fields(sid_b, seq, 0, 0, fields)
        else:
            lo = min(seq.replaced_from, seq.saved_blocks)
            seq_fields(sid_b, seq, lo, seq.saved_hashes, fields)
        seq.saved = True
        seq.saved_blocks = len(seq.blocks)
        seq.saved_hashes = len(seq.hashes)
        seq.replaced_from = 1 << 62

    def _stats_fields(self) -> dict[bytes, bytes]:
        return {
            k.encode(): ",".join(map(str, v)).encode() for k, v in self.m.stats.totals().items()
        }

    def _executor_fields(self, ex: ExecutorState) -> bytes:
        return json.dumps(
            {
                "epoch": ex.epoch,
                "num_blocks": ex.num_blocks,
                "block_size": ex.block_size,
                "model_fingerprint": ex.model_fingerprint,
            }
        ).encode()

    def _meta(self, ex: ExecutorState) -> dict[bytes, bytes]:
        return {b"next_stamp": _b(ex.pool.next_stamp), b"evictions": _b(ex.pool.evictions)}

    async def _execute(self, conn, batch: Batch) -> None:
        """Sends MULTI, the batch and EXEC in one write; raises on any error reply."""
        try:
            await conn.send_packed_command(
                [b"*1\r\n$5\r\nMULTI\r\n", *batch.parts, b"*1\r\n$4\r\nEXEC\r\n"],
                check_health=False,
            )
            replies = [await conn.read_response() for _ in range(batch.n + 2)]
        except BaseException:
            await conn.disconnect()
            raise
        result = replies[-1]
        if result is None:
            raise RedisError("MULTI/EXEC aborted")
        for r in (*replies[:-1], *result):
            if isinstance(r, Exception):
                raise r

    async def _flush_incremental(self, conn) -> None:
        m = self.m
        batch = Batch()
        for eid, epoch in m.dropped_epochs:
            batch.delete(*self._epoch_keys(eid, epoch))
        m.dropped_epochs = []
        for eid in m.dirty_executors:
            ex = m.executors[eid]
            e = eid.encode()
            batch.hset(self.k("executors"), {e: self._executor_fields(ex)})
            batch.hset(self.k("epochs"), {e: _b(m.last_epoch[eid])})
            batch.hset(self.ex_key(eid, ex.epoch, "meta"), self._meta(ex))
        m.dirty_executors = set()
        for ex in m.executors.values():
            pool = ex.pool
            blocks, hashes, seqs = pool.dirty_blocks, pool.dirty_hashes, ex.dirty_seqs
            if not (blocks or hashes or seqs):
                continue
            pool.dirty_blocks, pool.dirty_hashes, ex.dirty_seqs = set(), set(), set()
            eid, epoch = ex.executor_id, ex.epoch
            if blocks:
                ref, stamp, birth, hsh = pool.ref, pool.stamp, pool.birth, pool.hash
                batch.hset(
                    self.ex_key(eid, epoch, "blocks"),
                    {b"%d" % b: encode_block(ref[b], stamp[b], birth[b], hsh[b]) for b in blocks},
                )
            if hashes:
                index = pool.index
                key = self.ex_key(eid, epoch, "index")
                batch.hset(key, {h: b"%d" % index[h] for h in hashes if h in index})
                batch.hdel(key, [h for h in hashes if h not in index])
            released, ex.released = ex.released, {}
            if seqs:
                live = ex.seqs
                metas: dict[bytes, bytes] = {}
                fields: dict[bytes, bytes] = {}
                stale: list[bytes] = []
                for sid, (nb, nh) in released.items():  # type: ignore[union-attr]
                    sid_b = sid.encode()
                    stale += [b"%s|t%d" % (sid_b, c) for c in range(-(-nb // TABLE_CHUNK))]
                    stale += [b"%s|h%d" % (sid_b, c) for c in range(-(-nh // HASH_CHUNK))]
                for sid in seqs:
                    seq = live.get(sid)
                    if seq is not None:
                        self._seq_writes(sid, seq, metas, fields)
                key = self.ex_key(eid, epoch, "seqs")
                batch.hdel(key, [s.encode() for s in seqs if s not in live])
                batch.hset(key, metas)
                key = self.ex_key(eid, epoch, "tables")
                batch.hdel(key, stale)  # before the HSET: a re-used id rewrites its fields
                batch.hset(key, fields)
            batch.hset(self.ex_key(eid, epoch, "meta"), self._meta(ex))
        if m.stats.version != self._stats_version:
            self._stats_version = m.stats.version
            batch.hset(self.k("stats"), self._stats_fields())
        if not batch.n:
            return
        self.in_flight = batch.records
        try:
            await self._execute(conn, batch)
        finally:
            self.in_flight = 0
        self.counters.written += batch.records

    async def _flush_full(self, conn) -> None:
        """Rewrites everything: stale keys (old epochs, unknown executors) go, in one batch."""
        m = self.m
        r = self.redis
        found = [k async for k in r.scan_iter(match=self.prefix + "ex:*", count=1000)]
        # From here to the batch's execution nothing awaits: the snapshot is of one moment.
        keep = {
            k.encode()
            for ex in m.executors.values()
            for k in self._epoch_keys(ex.executor_id, ex.epoch)
        }
        m.dropped_epochs = []
        m.dirty_executors = set()
        batch = Batch()
        batch.delete(*[k for k in found if k not in keep])
        batch.delete(self.k("executors"), self.k("stats"))
        batch.hset(self.k("epochs"), {e.encode(): _b(n) for e, n in m.last_epoch.items()})
        for ex in m.executors.values():
            pool = ex.pool
            pool.dirty_blocks, pool.dirty_hashes, ex.dirty_seqs = set(), set(), set()
            eid, epoch = ex.executor_id, ex.epoch
            keys = self._epoch_keys(eid, epoch)
            batch.delete(*keys)
            batch.hset(self.k("executors"), {eid.encode(): self._executor_fields(ex)})
            batch.hset(keys[0], self._meta(ex))
            batch.hset(
                keys[1],
                {
                    b"%d" % b: encode_block(pool.ref[b], pool.stamp[b], pool.birth[b], pool.hash[b])
                    for b in range(ex.num_blocks)
                    if pool.ref[b] or pool.stamp[b] >= 0 or pool.hash[b] is not None
                },
            )
            batch.hset(keys[2], {h: b"%d" % b for h, b in pool.index.items()})
            metas: dict[bytes, bytes] = {}
            fields: dict[bytes, bytes] = {}
            for sid, seq in ex.seqs.items():
                seq.saved = False  # written whole
                self._seq_writes(sid, seq, metas, fields)
            batch.hset(keys[3], metas)
            batch.hset(keys[4], fields)
            ex.released = {}
        self._stats_version = m.stats.version
        batch.hset(self.k("stats"), self._stats_fields())
        self.full_resync = False
        self.in_flight = batch.records + 1
        try:
            await self._execute(conn, batch)
        except BaseException:
            self.full_resync = True
            raise
        finally:
            self.in_flight = 0
        self.counters.full_resyncs += 1
        self.counters.written += batch.records
        log.info("redis: full snapshot written (%d records)", batch.records)
