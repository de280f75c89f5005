"""Write-behind persistence of kvmanager's state in Redis, and its restore on start.

Nothing on the allocation path awaits Redis: the core records what changed as events
(events.py); a background task wakes every `interval` seconds, folds them into the sets of what
changed (changes.py: block ids, index hashes, sequence ids, executors), swaps those out, reads the
*current* values of what they name and writes them in one MULTI/EXEC pipeline. Reading and
swapping happen with no await in between, so each batch is a consistent snapshot of one moment,
and since it is atomic Redis always holds such a snapshot. Changes coalesce: a block touched 50
times between flushes is written once.

If a batch fails (Redis down, timeout), its changes are gone, so the next successful flush
rewrites everything (a full snapshot, stale keys deleted, in one MULTI/EXEC). That also covers a
Redis that restarted and lost its last second of AOF. Meanwhile serving goes on; `connected` is
False and the pending counter grows.

The keys and the encoding of every record are in redis_records.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis
from pagemesh.services.kvmanager.changes import NOT_REPLACED, PendingChanges
from pagemesh.services.kvmanager.manager import ExecutorState, Manager, SeqState
from pagemesh.services.kvmanager.redis_records import (
    DEFAULT_PREFIX,
    Batch,
    Keys,
    block_records,
    decode_block,
    decode_host_block,
    decode_seqs,
    decode_stats,
    encode_seq_meta,
    encode_stats,
    executor_record,
    host_block_records,
    int_bytes,
    meta_record,
    seq_fields,
    stale_seq_fields,
)
from redis.exceptions import RedisError

log = logging.getLogger("pagemesh.kvmanager.persistence")

PING_INTERVAL = 1.0  # seconds: how soon an idle kvmanager notices Redis going or coming back
# A flush builds its batch on the event loop that serves the RPCs (3-6 ms after an admission
# round of ~50 prompts). Started right after a call, it held whatever came next: in an H200 trace
# an executor's follow-up admission round waited 4-5 ms behind one, on the step's critical path.
# So a flush waits until no call came for QUIET_S, for at most MAX_DEFER_S in a row.
QUIET_S = 0.002
MAX_DEFER_S = 0.025


@dataclass(slots=True)
class Counters:
    flushes: int = 0
    full_resyncs: int = 0
    errors: int = 0
    written: int = 0  # records written (HSET fields / HDELs)


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
        self.keys = Keys(prefix)
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
        self.changes = PendingChanges()
        self._stats_version = -1
        self.restored = False
        self._conn: aioredis.Connection | None = None  # the write connection (see _connection)
        self._run_id: bytes | None = None
        self._task: asyncio.Task | None = None
        self.on_status_change: Callable[[bool], None] | None = None  # for health
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

    # -- pending --------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Changes not yet in Redis (0 means Redis holds the current state)."""
        m = self.m
        n = self.changes.count(m) + self.in_flight
        if m.stats.version != self._stats_version:
            n += 1
        if self.full_resync:
            n += 1 + sum(
                len(ex.seqs) + ex.pool.num_in_use + ex.pool.num_cached
                for ex in m.executors.values()
            )
        return n

    # -- restore --------------------------------------------------------------------------------
    async def _hgetall(self, key: str) -> dict[bytes, bytes]:
        # The client decodes nothing (no decode_responses): keys and values are bytes.
        return cast("dict[bytes, bytes]", await self.redis.hgetall(key))

    async def restore(self) -> bool:
        """Loads the state Redis holds into the manager. Reads everything first, then applies it
        with no await in between; if executors registered meanwhile (a restore retried after a
        Redis outage at start), their state wins and Redis gets a full rewrite instead."""
        keys = self.keys
        executors = await self._hgetall(keys.top("executors"))
        epochs = await self._hgetall(keys.top("epochs"))
        stats = await self._hgetall(keys.top("stats"))
        per_ex = {}
        for eid_b, raw in executors.items():
            d = json.loads(raw)
            eid = eid_b.decode()
            blocks, seqs, meta, tables, host = [
                await self._hgetall(keys.epoch(eid, d["epoch"], w))
                for w in ("blocks", "seqs", "meta", "tables", "host")
            ]
            per_ex[eid] = (d, blocks, decode_seqs(seqs, tables), meta, host)
        self.restored = True
        m = self.m
        if m.executors:
            log.warning("executors registered before Redis answered: rewriting Redis from memory")
            self.full_resync = True
            self._set_connected(True)
            return False
        for eid_b, n in epochs.items():
            m.last_epoch[eid_b.decode()] = int(n)
        for eid, (d, blocks, seq_states, meta, host) in per_ex.items():
            ex = m.new_executor(
                eid,
                d["epoch"],
                d["num_blocks"],
                d["block_size"],
                d["model_fingerprint"],
                d.get("address", ""),
                d.get("model", ""),
                d.get("max_model_len", 0),
                d.get("num_host_blocks", 0),
                d.get("kv_block_bytes", 0),
            )
            self._restore_executor(ex, blocks, seq_states, meta, host)
            m.executors[eid] = ex
            m.last_epoch[eid] = max(m.last_epoch.get(eid, 0), ex.epoch)
        m.stats.restore_totals(decode_stats(stats))
        self._stats_version = m.stats.version
        # What was just read is what Redis holds: nothing to write back, every sequence held.
        self.changes.reset(m)
        for ex in m.executors.values():
            self.changes.of(ex).held = {
                sid: (len(s.blocks), len(s.hashes)) for sid, s in ex.seqs.items()
            }
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

    def _restore_executor(
        self,
        ex: ExecutorState,
        blocks: dict[bytes, bytes],
        seqs: dict[str, SeqState],
        meta: dict[bytes, bytes],
        host: dict[bytes, bytes],
    ) -> None:
        records = []
        for b_raw, raw in blocks.items():
            b = int(b_raw)
            if b < ex.num_blocks:
                ref, stamp, birth, h = decode_block(raw)
                records.append((b, ref, h, birth, stamp))
        ex.pool.restore(records, int(meta.get(b"next_stamp", b"0")))
        ex.pool.evictions = int(meta.get(b"evictions", b"0"))
        ex.pool.num_spills = int(meta.get(b"spills", b"0"))
        ex.pool.num_restores = int(meta.get(b"restores", b"0"))
        ex.pool.host_drops = int(meta.get(b"host_drops", b"0"))
        host_records = []
        for hb_raw, raw in host.items():
            hb = int(hb_raw)
            if hb < ex.num_host_blocks:
                host_records.append((hb, *self._host_fields(raw)))
        ex.pool.restore_host(host_records)
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
            ex.pool.restore_host(host_records)  # (a copy made ahead needs its block idle)
            self.full_resync = True

    @staticmethod
    def _host_fields(raw: bytes) -> tuple[bytes | None, float, int]:
        stamp, birth, h = decode_host_block(raw)
        return h, birth, stamp

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
        task = asyncio.current_task()
        while True:
            # A cancel (stop) that lands while a flush awaits Redis does not always come out of
            # redis-py as a CancelledError: seen with Python 3.11, the flush returned normally,
            # this loop slept again and stop() waited on it forever. The request to cancel
            # stays recorded on the task, so it is honoured here.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
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

    async def _connection(self) -> aioredis.Connection:
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
        failed batch's changes are gone."""
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

    @staticmethod
    def _seq_writes(
        sid: str,
        seq: SeqState,
        held: dict[str, tuple[int, int]],
        replaced_from: int,
        metas: dict[bytes, bytes],
        fields: dict[bytes, bytes],
    ) -> None:
        """A sequence Redis does not hold whole; one it holds from its first changed chunk on
        (the lowest copy-on-write replacement, or where its table and chain grew from)."""
        sid_b = sid.encode()
        h = held.get(sid)
        if h is None:
            metas[sid_b] = encode_seq_meta(seq)
            seq_fields(sid_b, seq, 0, 0, fields)
        else:
            seq_fields(sid_b, seq, min(replaced_from, h[0]), h[1], fields)
        held[sid] = (len(seq.blocks), len(seq.hashes))

    async def _execute(self, conn: aioredis.Connection, batch: Batch) -> None:
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

    async def _flush_incremental(self, conn: aioredis.Connection) -> None:
        m, keys, changes = self.m, self.keys, self.changes
        changes.collect(m)
        batch = Batch()
        registered: set[str] = set()
        if changes.executors or changes.dropped_epochs:
            registered, dropped = changes.take_registrations()
            for eid, epoch in dropped:
                batch.delete(*keys.epoch_keys(eid, epoch))
        for eid in registered:
            ex = m.executors[eid]
            e = eid.encode()
            batch.hset(keys.top("executors"), {e: executor_record(ex)})
            batch.hset(keys.top("epochs"), {e: int_bytes(m.last_epoch[eid])})
            batch.hset(keys.epoch(eid, ex.epoch, "meta"), meta_record(ex))
        for ex in m.executors.values():
            ch = changes.of(ex)
            if not ch.count:
                continue
            blocks, hashes = ch.take_blocks()
            host_blocks = ch.take_host_blocks()
            seqs = ch.take_seqs()
            eid, epoch = ex.executor_id, ex.epoch
            if blocks:
                batch.hset(keys.epoch(eid, epoch, "blocks"), block_records(ex, blocks))
            if host_blocks:
                batch.hset(
                    keys.epoch(ex.executor_id, ex.epoch, "host"),
                    host_block_records(ex, host_blocks),
                )
            if hashes:
                index = ex.pool.index
                key = keys.epoch(eid, epoch, "index")
                batch.hset(key, {h: b"%d" % index[h] for h in hashes if h in index})
                batch.hdel(key, [h for h in hashes if h not in index])
            if seqs.seqs:
                live = ex.seqs
                metas: dict[bytes, bytes] = {}
                fields: dict[bytes, bytes] = {}
                stale: list[bytes] = []
                for sid, (nb, nh) in seqs.released.items():
                    stale += stale_seq_fields(sid, nb, nh)
                for sid in seqs.seqs:
                    seq = live.get(sid)
                    if seq is not None:
                        replaced = seqs.replaced_from.get(sid, NOT_REPLACED)
                        self._seq_writes(sid, seq, ch.held, replaced, metas, fields)
                key = keys.epoch(eid, epoch, "seqs")
                batch.hdel(key, [s.encode() for s in seqs.seqs if s not in live])
                batch.hset(key, metas)
                key = keys.epoch(eid, epoch, "tables")
                batch.hdel(key, stale)  # before the HSET: a re-used id rewrites its fields
                batch.hset(key, fields)
            batch.hset(keys.epoch(eid, epoch, "meta"), meta_record(ex))
        if m.stats.version != self._stats_version:
            self._stats_version = m.stats.version
            batch.hset(keys.top("stats"), encode_stats(m.stats.totals()))
        if not batch.n:
            return
        self.in_flight = batch.records
        try:
            await self._execute(conn, batch)
        finally:
            self.in_flight = 0
        self.counters.written += batch.records

    async def _flush_full(self, conn: aioredis.Connection) -> None:
        """Rewrites everything: stale keys (old epochs, unknown executors) go, in one batch."""
        m, keys = self.m, self.keys
        found = [k async for k in self.redis.scan_iter(match=self.prefix + "ex:*", count=1000)]
        # From here to the batch's execution nothing awaits: the snapshot is of one moment.
        keep = {
            k.encode()
            for ex in m.executors.values()
            for k in keys.epoch_keys(ex.executor_id, ex.epoch)
        }
        self.changes.reset(m)  # all of it is written below, every sequence whole
        batch = Batch()
        batch.delete(*[k for k in found if k not in keep])
        batch.delete(keys.top("executors"), keys.top("stats"))
        batch.hset(keys.top("epochs"), {e.encode(): int_bytes(n) for e, n in m.last_epoch.items()})
        for ex in m.executors.values():
            pool = ex.pool
            eid, epoch = ex.executor_id, ex.epoch
            meta_key, blocks_key, index_key, seqs_key, tables_key, host_key = keys.epoch_keys(
                eid, epoch
            )
            batch.delete(meta_key, blocks_key, index_key, seqs_key, tables_key, host_key)
            batch.hset(keys.top("executors"), {eid.encode(): executor_record(ex)})
            batch.hset(meta_key, meta_record(ex))
            touched = (
                b
                for b in range(ex.num_blocks)
                if pool.ref[b] or pool.stamp[b] >= 0 or pool.hash[b] is not None
            )
            batch.hset(blocks_key, block_records(ex, touched))
            batch.hset(index_key, {h: b"%d" % b for h, b in pool.index.items()})
            touched_host = (
                hb
                for hb in range(ex.num_host_blocks)
                if pool.host_stamp[hb] >= 0 or pool.host_hash[hb] is not None
            )
            batch.hset(host_key, host_block_records(ex, touched_host))
            metas: dict[bytes, bytes] = {}
            fields: dict[bytes, bytes] = {}
            held = self.changes.of(ex).held
            for sid, seq in ex.seqs.items():
                self._seq_writes(sid, seq, held, NOT_REPLACED, metas, fields)
            batch.hset(seqs_key, metas)
            batch.hset(tables_key, fields)
        self._stats_version = m.stats.version
        batch.hset(keys.top("stats"), encode_stats(m.stats.totals()))
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
