"""kvmanager's core: executors, block tables, ref counts, copy-on-write and the prefix index.

Synchronous and single-threaded on purpose: the gRPC server calls it from the event loop without
awaiting anything in between, so every call is atomic, and a call that fails changes nothing
(every method validates and counts what it needs before its first mutation).

Invariants (tests/kvmanager/test_properties.py checks them after random operation sequences):
- for each executor, the pool's ref[b] == number of live tables holding b;
- a table never holds a block twice; a block with ref > 0 is neither free nor cached;
- seq.hashes is the hash chain of seq.blocks[:len(seq.hashes)] (committed, in order);
- an executor's state belongs to one epoch; re-registering replaces it entirely.

With `Manager(track_changes=True)` every change is recorded as an event (events.py): per executor
in `ExecutorState.events` (shared with its pool), registrations in `Manager.events`. The core
keeps nothing else for whoever mirrors it (persistence.py takes the events and keeps its own
account of what Redis holds).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from pagemesh.proto import packed_ids
from pagemesh.services.kvmanager import hashing
from pagemesh.services.kvmanager.api import (
    Allocation,
    AllocatorError,
    InvalidRequest,
    OutOfBlocks,
    SequenceTooLarge,
    StaleEpoch,
    UnknownSequence,
)
from pagemesh.services.kvmanager.block_pool import BlockPool
from pagemesh.services.kvmanager.events import (
    EXECUTOR_REGISTERED,
    SEQ_REPLACED,
    SEQ_STORED,
    SEQS_GREW,
    SEQS_REMOVED,
    Event,
)
from pagemesh.services.kvmanager.load import Load
from pagemesh.services.kvmanager.stats import Residency, Stats

MAX_BLOCK_SIZE = 4096
MAX_NUM_BLOCKS = 1 << 24
MAX_NAME_LEN = 1024  # address and model: client-chosen strings kept in Redis and in metrics
# Spill ahead's defaults (Manager): a quarter of the GPU pool kept free or copied, 32 MiB a Step
# call (~0.6 ms of PCIe at 50 GB/s: what a token readback may wait behind), and the blocks a
# call when the executor did not give its block's bytes.
SPILL_AHEAD_WATERMARK = 0.25
SPILL_AHEAD_MIB = 32.0
SPILL_AHEAD_BLOCKS_UNSIZED = 8


@dataclass(slots=True)
class SeqState:
    extra: bytes  # extra-keys digest (model fingerprint + cache_salt), see hashing.py
    tenant: str  # salt digest, for stats
    blocks: list[int]
    hashes: list[bytes]  # chain hashes of blocks[:len(hashes)], the committed prefix


@dataclass(slots=True)
class ExecutorState:
    executor_id: str
    epoch: int
    num_blocks: int
    block_size: int
    model_fingerprint: str
    pool: BlockPool
    # What the fleet routes by (registration; persisted with the pool sizes). No model: never
    # a Route candidate.
    address: str = ""
    model: str = ""
    max_model_len: int = 0
    # Signs of life, for fleet.py's liveness: every call naming this executor and its current
    # epoch counts one (Manager.executor). A count, not a clock read: an increment is all the
    # per-call path pays (a time.monotonic() per call cost 3-4x as much); fleet.py's periodic
    # check turns a changed count into `last_seen`.
    calls: int = 0
    seen_calls: int = 0  # `calls` at fleet.py's last check
    # time.monotonic() of its registration or restore, or of the check that saw its last call.
    last_seen: float = 0.0
    load: Load = field(default_factory=Load)
    seqs: dict[str, SeqState] = field(default_factory=dict)
    age_at_hit: Residency = field(default_factory=Residency)
    age_at_eviction: Residency = field(default_factory=Residency)
    # The host tier (block_pool.py): its size (0: none), one block's bytes (all layers' K and
    # V, for bytes moved), prompt tokens hit per tier since start, ages at restore and at drop.
    num_host_blocks: int = 0
    kv_block_bytes: int = 0
    gpu_hit_tokens: int = 0
    host_hit_tokens: int = 0
    age_at_restore: Residency = field(default_factory=Residency)
    age_at_host_drop: Residency = field(default_factory=Residency)
    # Change events (events.py), the same list as pool.events; None: not recorded.
    events: list[Event] | None = None
    # salt -> (extra digest, tenant id): hashing the salt once per tenant, not per request.
    _extras: dict[str, tuple[bytes, str]] = field(default_factory=dict)

    def extra_for(self, cache_salt: str) -> tuple[bytes, str]:
        e = self._extras.get(cache_salt)
        if e is None:
            if len(self._extras) > 10000:  # bounded: salts are client-chosen
                self._extras.clear()
            e = self._extras[cache_salt] = (
                hashing.extra_digest(self.model_fingerprint, cache_salt),
                hashing.salt_id(cache_salt),
            )
        return e


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _token_data(token_ids: Sequence[int] | bytes) -> bytes:
    """The canonical u32 encoding of a prompt (bytes pass through, checked for whole ids)."""
    if isinstance(token_ids, bytes):
        if len(token_ids) % 4:
            raise InvalidRequest("token_data must be whole u32 ids (a multiple of 4 bytes)")
        return token_ids
    try:
        return hashing.token_bytes(token_ids)
    except (OverflowError, TypeError) as e:
        raise InvalidRequest("token ids must be integers in [0, 2**32)") from e


@dataclass(slots=True)
class _Chain:
    """A prompt's encoding and the hashes of its cached prefix, for the next prompt of an
    admission round to start from (Manager._prefix_hits)."""

    extra: bytes
    data: bytes
    hashes: list[bytes]


@dataclass(slots=True)
class CommitColumns:
    """Commit entries in the wire's columnar form (proto CommitRequest): entry i is sequence
    seq_ids[i], block block_indices[i], token ids token_ids[i*block_size:(i+1)*block_size]. The
    block size is the executor's, so `Manager.commit` splits them once it has checked the
    executor and epoch. Empty `seq_ids`: no entries (the other lists are not looked at)."""

    seq_ids: Sequence[str]
    block_indices: Sequence[int]
    token_ids: Sequence[int]

    def entries(self, block_size: int) -> list[tuple[str, int, Sequence[int]]]:
        n = len(self.seq_ids)
        if not n:
            return []
        toks = self.token_ids
        if len(toks) != block_size * n or len(self.block_indices) != n:
            raise InvalidRequest(
                "commit: columnar form needs one block index and block_size token ids per seq_id"
            )
        bs = block_size
        return [
            (s, i, toks[k * bs : (k + 1) * bs])
            for k, (s, i) in enumerate(zip(self.seq_ids, self.block_indices, strict=True))
        ]


class Manager:
    """All executors' logical KV state. `track_changes` records change events for persistence
    to take (off for a purely in-process allocator, so nothing grows unboundedly)."""

    def __init__(
        self,
        track_changes: bool = False,
        spill_ahead_watermark: float = SPILL_AHEAD_WATERMARK,
        spill_ahead_mib: float = SPILL_AHEAD_MIB,
    ) -> None:
        if not 0.0 <= spill_ahead_watermark <= 1.0:
            raise ValueError(
                f"spill_ahead_watermark must be in [0, 1], got {spill_ahead_watermark}"
            )
        if spill_ahead_mib < 0:
            raise ValueError(f"spill_ahead_mib must be >= 0, got {spill_ahead_mib}")
        # Spill ahead (block_pool.py): while an executor's free GPU blocks and cached ones with
        # a host copy are fewer than this fraction of its pool, each Step call that changes its
        # blocks copies at most this many MiB of its oldest cached blocks out (0: never).
        self.spill_ahead_watermark = spill_ahead_watermark
        self.spill_ahead_mib = spill_ahead_mib
        self.executors: dict[str, ExecutorState] = {}
        # Highest epoch ever handed to each executor: epochs never repeat (persisted too).
        self.last_epoch: dict[str, int] = {}
        self.stats = Stats()
        # Registrations (events.py); each executor's own changes are in its ExecutorState.
        self.events: list[Event] | None = [] if track_changes else None

    @property
    def track_changes(self) -> bool:
        return self.events is not None

    # -- executors ------------------------------------------------------------------------------
    def new_executor(
        self,
        executor_id: str,
        epoch: int,
        num_blocks: int,
        block_size: int,
        fingerprint: str,
        address: str = "",
        model: str = "",
        max_model_len: int = 0,
        num_host_blocks: int = 0,
        kv_block_bytes: int = 0,
    ) -> ExecutorState:
        events: list[Event] | None = [] if self.track_changes else None
        ex = ExecutorState(
            executor_id=executor_id,
            epoch=epoch,
            num_blocks=num_blocks,
            block_size=block_size,
            model_fingerprint=fingerprint,
            pool=BlockPool(num_blocks, events=events, host_blocks=num_host_blocks),
            address=address,
            model=model,
            max_model_len=max_model_len,
            last_seen=time.monotonic(),
            events=events,
            num_host_blocks=num_host_blocks,
            kv_block_bytes=kv_block_bytes,
        )
        ex.pool.on_evict = ex.age_at_eviction.record_ages
        ex.pool.on_restore = ex.age_at_restore.record_ages
        ex.pool.on_host_drop = ex.age_at_host_drop.record_ages
        return ex

    def register(
        self,
        executor_id: str,
        num_blocks: int,
        block_size: int,
        model_fingerprint: str,
        address: str = "",
        model: str = "",
        max_model_len: int = 0,
        num_host_blocks: int = 0,
        kv_block_bytes: int = 0,
    ) -> int:
        if not executor_id:
            raise InvalidRequest("executor_id must not be empty")
        if len(address) > MAX_NAME_LEN or len(model) > MAX_NAME_LEN:
            raise InvalidRequest(f"address and model must be at most {MAX_NAME_LEN} characters")
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise InvalidRequest(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")
        if not 1 <= num_blocks <= MAX_NUM_BLOCKS:
            raise InvalidRequest(f"num_blocks must be in [1, {MAX_NUM_BLOCKS}], got {num_blocks}")
        if not 0 <= num_host_blocks <= MAX_NUM_BLOCKS:
            raise InvalidRequest(
                f"num_host_blocks must be in [0, {MAX_NUM_BLOCKS}], got {num_host_blocks}"
            )
        if kv_block_bytes < 0:
            raise InvalidRequest(f"kv_block_bytes must be >= 0, got {kv_block_bytes}")
        epoch = self.last_epoch.get(executor_id, 0) + 1
        # The old epoch's state goes whole: its GPU memory is gone, so nothing of it may ever be
        # hit again.
        old = self.executors.get(executor_id)
        self.last_epoch[executor_id] = epoch
        self.executors[executor_id] = self.new_executor(
            executor_id,
            epoch,
            num_blocks,
            block_size,
            model_fingerprint,
            address,
            model,
            max_model_len,
            num_host_blocks,
            kv_block_bytes,
        )
        if self.events is not None:
            self.events.append((EXECUTOR_REGISTERED, (executor_id, old.epoch if old else 0)))
        return epoch

    def executor(self, executor_id: str, epoch: int) -> ExecutorState:
        ex = self.executors.get(executor_id)
        if ex is None:
            raise StaleEpoch(f"executor {executor_id!r} is not registered: register first")
        if epoch != ex.epoch:
            raise StaleEpoch(
                f"epoch {epoch} of executor {executor_id!r} is stale (current epoch {ex.epoch}):"
                " re-register"
            )
        ex.calls += 1
        return ex

    def report_load(
        self, executor_id: str, epoch: int, running: int, waiting: int, queued_prompt_tokens: int
    ) -> None:
        """The executor's load (a Step's load part): replaces its last report and what was
        routed to it since (load.py)."""
        if running < 0 or waiting < 0 or queued_prompt_tokens < 0:
            raise InvalidRequest("load: running, waiting and queued_prompt_tokens must be >= 0")
        self.executor(executor_id, epoch).load.report(running, waiting, queued_prompt_tokens)

    # -- allocation -----------------------------------------------------------------------------
    def _prefix_hits(
        self,
        ex: ExecutorState,
        extra: bytes,
        data: bytes,
        near: _Chain | None = None,
    ) -> tuple[list[int], list[bytes], list[tuple[int, int]]]:
        """Indexed blocks of the longest cached prefix of `data` (token_data's encoding), whole
        blocks only, never covering the last token (its logits are needed, so it is always
        recomputed). `near`: the chain of a prompt just allocated; its hashes serve for the
        blocks both prompts agree on (a memcmp instead of a SHA-256 a block: an admission round
        of 48 prompts behind one 1k-token system prompt hashed 64 blocks 48 times).
        The prefix spans both tiers: a block found in the host tier is (its position in the
        prefix, its host block) in the third list, and -1 stands for it in the first."""
        bs = ex.block_size
        index = ex.pool.index
        num_full = (len(data) // 4 - 1) // bs
        hits: list[int] = []
        hashes: list[bytes] = []
        start = 0
        if near is not None and near.extra == extra:
            start = packed_ids.common_prefix(
                data, near.data, 4 * bs, min(num_full, len(near.hashes))
            )
            hashes = near.hashes[:start]
            hits = [index[h] for h in hashes]  # near's hits: in use, so still indexed
        parent = hashes[-1] if hashes else hashing.ROOT
        host_hits: list[tuple[int, int]] = []
        host_index = ex.pool.host_index
        for h in hashing.iter_chain_data(extra, data, bs, start, num_full, parent):
            b = index.get(h)
            if b is None:
                hb = host_index.get(h) if host_index else None
                if hb is None:
                    break
                host_hits.append((len(hits), hb))
                b = -1
            hits.append(b)
            hashes.append(h)
        return hits, hashes, host_hits

    def allocate(
        self,
        executor_id: str,
        epoch: int,
        seq_id: str,
        token_ids: Sequence[int] | bytes,
        cache_salt: str = "",
        num_lookahead_tokens: int = 0,
    ) -> Allocation:
        """`token_ids`: the prompt, or its canonical encoding (hashing.token_bytes) as bytes."""
        return self._allocate(
            executor_id, epoch, seq_id, _token_data(token_ids), cache_salt, num_lookahead_tokens
        )[0]

    def _allocate(
        self,
        executor_id: str,
        epoch: int,
        seq_id: str,
        data: bytes,
        cache_salt: str,
        num_lookahead_tokens: int,
        near: _Chain | None = None,
    ) -> tuple[Allocation, _Chain]:
        ex = self.executor(executor_id, epoch)
        if not seq_id:
            raise InvalidRequest("seq_id must not be empty")
        if seq_id in ex.seqs:
            raise InvalidRequest(f"sequence {seq_id!r} already exists (release it first)")
        n = len(data) // 4
        if n == 0:
            raise InvalidRequest("token_ids must not be empty")
        if num_lookahead_tokens < 0:
            raise InvalidRequest("num_lookahead_tokens must be >= 0")
        total = _ceil_div(n + num_lookahead_tokens, ex.block_size)
        if total > ex.num_blocks:
            raise SequenceTooLarge(
                f"sequence needs {total} blocks ({n} tokens + {num_lookahead_tokens} look-ahead,"
                f" block size {ex.block_size}) but the pool has only {ex.num_blocks}"
            )
        extra, tenant = ex.extra_for(cache_salt)
        hits, hashes, host_hits = self._prefix_hits(ex, extra, data, near)
        pool = ex.pool
        ref = pool.ref
        gpu_hits = [b for b in hits if b >= 0] if host_hits else hits
        # Cached hit blocks leave the evictable queue, so they cannot also serve as fresh ones.
        reclaimed = sum(1 for b in gpu_hits if ref[b] == 0)
        # A host hit needs a fresh GPU block to come back into.
        fresh = total - len(hits) + len(host_hits)
        if fresh > pool.num_available - reclaimed:
            raise OutOfBlocks(
                f"sequence {seq_id!r} needs {fresh} fresh blocks, only"
                f" {pool.num_available - reclaimed} free or evictable of {ex.num_blocks}"
            )
        if gpu_hits:
            now, birth = time.time(), pool.birth
            ex.age_at_hit.record_ages([now - birth[b] for b in gpu_hits])
            pool.take_hits(gpu_hits)
        if host_hits:
            pool.pin_host([hb for _, hb in host_hits])
        new = pool.take_many(fresh)
        if host_hits:
            # Restores after this allocation's spills (pool.take_transfers keeps the order).
            blocks = list(hits)
            for k, (i, _) in enumerate(host_hits):
                blocks[i] = new[k]
            pool.restore_many([(hb, new[k]) for k, (_, hb) in enumerate(host_hits)], time.time())
            blocks += new[len(host_hits) :]
        else:
            blocks = hits + new
        ex.seqs[seq_id] = SeqState(extra, tenant, blocks, hashes)
        if ex.events is not None:
            ex.events.append((SEQ_STORED, seq_id))
        num_cached = len(hits) * ex.block_size
        host_cached = len(host_hits) * ex.block_size
        ex.gpu_hit_tokens += num_cached - host_cached
        ex.host_hit_tokens += host_cached
        self.stats.record(executor_id, tenant, n, num_cached)
        spills, restores = pool.take_transfers()
        return Allocation(blocks, num_cached, spills, restores), _Chain(extra, data, hashes)

    def allocate_many(
        self,
        executor_id: str,
        epoch: int,
        entries: Sequence[tuple[str, Sequence[int] | bytes, str, int]],
        token_budget: int = 0,
    ) -> tuple[list[Allocation], AllocatorError | None]:
        """Admission in one call: (seq_id, token_ids, cache_salt, num_lookahead_tokens) entries
        allocated in order while the uncached tokens of those allocated so far stay below
        `token_budget` (0: no limit), stopping at the first that fails. Returns the allocations
        (a prefix of `entries`) and that failure, if any. token_ids as in `allocate`."""
        out: list[Allocation] = []
        used = 0
        near: _Chain | None = None
        for seq_id, token_ids, cache_salt, lookahead in entries:
            if token_budget and used >= token_budget:
                break
            try:
                a, near = self._allocate(
                    executor_id, epoch, seq_id, _token_data(token_ids), cache_salt, lookahead, near
                )
            except AllocatorError as e:
                return out, e
            out.append(a)
            used += len(near.data) // 4 - a.num_cached_tokens
        return out, None

    def spill_ahead(self, executor_id: str) -> list[tuple[int, int]]:
        """Spills ahead of eviction (block_pool.py) for the executor's pool when its free and
        already copied GPU blocks are below the watermark: at most the per-call budget of its
        oldest cached blocks, (gpu block, host block) for the executor to copy out after the
        rest of the call's transfers. A burst of evictions then moves no bytes (issue 26: one
        285 MB spill copy queued a step's 1 KiB token readback for 5 ms)."""
        ex = self.executors.get(executor_id)
        if ex is None or not ex.num_host_blocks or not self.spill_ahead_mib:
            return []
        pool = ex.pool
        short = int(self.spill_ahead_watermark * ex.num_blocks) - pool.num_free - len(pool.ahead)
        if short <= 0:
            return []
        budget = (
            int(self.spill_ahead_mib * 2**20) // ex.kv_block_bytes
            if ex.kv_block_bytes
            else SPILL_AHEAD_BLOCKS_UNSIZED
        )
        pool.spill_ahead(min(short, max(1, budget)))
        # (every other transfer of the call was taken already: these are the spills ahead)
        return pool.take_transfers()[0]

    def take_spills(self, executor_id: str) -> list[tuple[int, int]]:
        """The spills (gpu block, host block) recorded since the executor's last allocation or
        take: what an `extend` evicted into the host tier, for its reply."""
        ex = self.executors.get(executor_id)
        return ex.pool.take_transfers()[0] if ex is not None else []

    def extend(
        self,
        executor_id: str,
        epoch: int,
        seq_ids: Sequence[str],
        num_computed: Sequence[int],
        num_tokens: Sequence[int],
    ) -> tuple[dict[str, tuple[int, list[int]]], list[tuple[int, int]]]:
        """Columnar batch (three parallel sequences, as they come off the wire). All or nothing:
        if the pool cannot satisfy the whole batch, OutOfBlocks and no change. Returns
        ({seq_id: (first_index, table[first_index:])} for changed tables, [(src, dst)] copies).
        The blocks it evicted into the host tier wait in the pool: `take_spills` right after."""
        ex = self.executor(executor_id, epoch)
        if not len(seq_ids) == len(num_computed) == len(num_tokens):
            raise InvalidRequest(
                "extend: seq_ids, num_computed_tokens, num_tokens differ in length"
            )
        bs = ex.block_size
        seqs = ex.seqs
        ref = ex.pool.ref
        # Pass 1: validate and count. `shared_drop` simulates ref drops by earlier CoWs of this
        # batch: of k sequences sharing a block, k-1 copy and the last writes in place. This loop
        # runs for every sequence of every decode step: keep it tight.
        need = 0
        shared_drop: dict[int, int] = {}
        plan: list[tuple[str, SeqState, list[int] | None, int]] = []
        get = seqs.get
        for sid, nc, nt in zip(seq_ids, num_computed, num_tokens, strict=True):
            seq = get(sid)
            if seq is None or nt < nc or nc < 0:
                self._bad_extend_entry(seq, sid, nc, nt)
            table = seq.blocks
            have = len(table)
            nb = -(-nt // bs)
            lo = nc // bs
            cows: list[int] | None = None
            if nt > nc and lo < have:  # this step writes into blocks the table already holds
                for j in range(lo, nb if nb < have else have):
                    b = table[j]
                    r = ref[b]
                    if r > 1 and shared_drop:
                        r -= shared_drop.get(b, 0)
                    if r > 1:  # shared: whoever writes first gets a private copy
                        if cows is None:
                            cows = []
                        cows.append(j)
                        shared_drop[b] = shared_drop.get(b, 0) + 1
                        need += 1
            if nb > have:
                if nb > ex.num_blocks:
                    raise SequenceTooLarge(
                        f"extend {sid!r}: {nt} tokens need {nb} blocks, the pool has"
                        f" {ex.num_blocks}"
                    )
                need += nb - have
                plan.append((sid, seq, cows, nb - have))
            elif cows is not None:
                plan.append((sid, seq, cows, 0))
        if len(plan) > 1 and len({p[0] for p in plan}) != len(plan):
            raise InvalidRequest("extend: a sequence appears twice in one batch")
        pool = ex.pool
        if need > pool.num_available:
            raise OutOfBlocks(
                f"extend needs {need} fresh blocks, only {pool.num_available} free or evictable"
                f" of {ex.num_blocks}"
            )
        # Pass 2: apply. All fresh blocks in one take (the same blocks, in the same order, as
        # taking them one by one: a CoW's decref never frees its source).
        fresh = pool.take_many(need) if need else []
        o = 0
        updates: dict[str, tuple[int, list[int]]] = {}
        copies: list[tuple[int, int]] = []
        events = ex.events
        grown: list[str] | None = [] if events is not None else None
        for sid, seq, cows, grow in plan:
            table = seq.blocks
            if cows is None:  # the common case: the table only grows
                first = len(table)
                new = fresh[o : o + grow]
                o += grow
                table.extend(new)
                updates[sid] = (first, new)
                if grown is not None:
                    grown.append(sid)
            else:
                first = cows[0]
                for j in cows:
                    src = table[j]
                    dst = fresh[o]
                    o += 1
                    table[j] = dst
                    pool.decref(src)  # stays >= 1: it was shared
                    copies.append((src, dst))
                if grow:
                    table.extend(fresh[o : o + grow])
                    o += grow
                updates[sid] = (first, table[first:])
                if events is not None:
                    events.append((SEQ_REPLACED, (sid, first)))
        if events is not None and grown:
            events.append((SEQS_GREW, grown))
        return updates, copies

    @staticmethod
    def _bad_extend_entry(seq: SeqState | None, sid: str, nc: int, nt: int) -> NoReturn:
        if seq is None:
            raise UnknownSequence(f"extend: unknown sequence {sid!r}")
        raise InvalidRequest(
            f"extend {sid!r}: need 0 <= num_computed_tokens ({nc}) <= num_tokens ({nt})"
        )

    def commit(
        self,
        executor_id: str,
        epoch: int,
        entries: Iterable[tuple[str, int, Sequence[int]]] | CommitColumns,
    ) -> int:
        """Publishes full, written blocks: (seq_id, block_index, token_ids) entries, or their
        columnar form. Re-committing an already committed index is a no-op; skipping one is an
        error. Returns how many hashes entered the index."""
        ex = self.executor(executor_id, epoch)
        bs = ex.block_size
        if isinstance(entries, CommitColumns):
            entries = entries.entries(bs)
        pool = ex.pool
        new_hashes: dict[str, list[bytes]] = {}
        plan: list[tuple[int, bytes]] = []
        for sid, idx, tokens in entries:
            seq = ex.seqs.get(sid)
            if seq is None:
                raise UnknownSequence(f"commit: unknown sequence {sid!r}")
            if len(tokens) != bs:
                raise InvalidRequest(
                    f"commit {sid!r} block {idx}: {len(tokens)} token ids, expected {bs}"
                )
            if idx >= len(seq.blocks):
                raise InvalidRequest(
                    f"commit {sid!r}: block index {idx} beyond its table ({len(seq.blocks)})"
                )
            pending = new_hashes.get(sid)
            done = len(seq.hashes) + (len(pending) if pending else 0)
            if idx < done:
                continue
            if idx > done:
                raise InvalidRequest(
                    f"commit {sid!r}: block {idx} before block {done} (commit in order)"
                )
            parent = pending[-1] if pending else (seq.hashes[-1] if seq.hashes else hashing.ROOT)
            try:
                h = hashing.block_hash(parent, seq.extra, tokens)
            except OverflowError as e:
                raise InvalidRequest("commit: token ids must be in [0, 2**32)") from e
            b = seq.blocks[idx]
            held = pool.hash[b]
            if held is not None and held != h:
                raise InvalidRequest(
                    f"commit {sid!r} block {idx}: block {b} is already committed with other"
                    " contents"
                )
            if pending is None:
                new_hashes[sid] = [h]
            else:
                pending.append(h)
            plan.append((b, h))
        now = time.time()
        for sid, hs in new_hashes.items():
            ex.seqs[sid].hashes.extend(hs)
        if new_hashes and ex.events is not None:
            ex.events.append((SEQS_GREW, list(new_hashes)))
        return sum(pool.publish(b, h, now) for b, h in plan)

    def fork(
        self,
        executor_id: str,
        epoch: int,
        parent_seq_id: str,
        child_seq_ids: Sequence[str],
        num_tokens: int,
    ) -> dict[str, list[int]]:
        ex = self.executor(executor_id, epoch)
        parent = ex.seqs.get(parent_seq_id)
        if parent is None:
            raise UnknownSequence(f"fork: unknown parent sequence {parent_seq_id!r}")
        if not child_seq_ids:
            raise InvalidRequest("fork: no child sequence ids")
        if len(set(child_seq_ids)) != len(child_seq_ids):
            raise InvalidRequest("fork: duplicate child sequence ids")
        for c in child_seq_ids:
            if not c:
                raise InvalidRequest("fork: empty child sequence id")
            if c in ex.seqs:
                raise InvalidRequest(f"fork: sequence {c!r} already exists")
        nb = _ceil_div(num_tokens, ex.block_size)
        if num_tokens < 0 or nb > len(parent.blocks):
            raise InvalidRequest(
                f"fork: {num_tokens} tokens need {nb} blocks, parent {parent_seq_id!r} holds"
                f" {len(parent.blocks)}"
            )
        shared = parent.blocks[:nb]
        hashes = parent.hashes[:nb]
        pool = ex.pool
        out: dict[str, list[int]] = {}
        for c in child_seq_ids:
            for b in shared:
                pool.incref(b)
            ex.seqs[c] = SeqState(parent.extra, parent.tenant, list(shared), list(hashes))
            if ex.events is not None:
                ex.events.append((SEQ_STORED, c))
            out[c] = list(shared)
        return out

    def release(self, executor_id: str, epoch: int, seq_ids: Sequence[str]) -> int:
        ex = self.executor(executor_id, epoch)
        seqs = ex.seqs
        for sid in seq_ids:
            if sid not in seqs:
                raise UnknownSequence(f"release: unknown sequence {sid!r} (already released?)")
        if len(set(seq_ids)) != len(seq_ids):
            raise InvalidRequest("release: a sequence id appears twice")
        pool = ex.pool
        for sid in seq_ids:
            seq = seqs.pop(sid)
            # Tail first: the LRU queue then evicts a chain from its end, keeping shared
            # prefixes (more likely reused) longest.
            for b in reversed(seq.blocks):
                pool.decref(b)
        if seq_ids and ex.events is not None:
            ex.events.append((SEQS_REMOVED, list(seq_ids)))
        return len(seq_ids)

    def reconcile(
        self,
        executor_id: str,
        epoch: int,
        tables: Mapping[str, Sequence[int]],
        num_transfers: int | None = None,
    ) -> tuple[int, list[str]]:
        """After an outage (a restart that restored from Redis may have lost the calls answered
        last): `tables` is every sequence the executor holds, with its whole table. Releases the
        sequences held here that the executor does not hold (a lost release); a sequence of
        `tables` held here with another table (a lost Extend) is released too, and it is
        reported lost with those not held at all (a lost allocation): the executor drops their
        blocks and recomputes them. Returns (number released, lost ids).
        The host tier is kept only when `num_transfers` (the spills and restores the executor
        received) is what this side counts: otherwise an outage lost replies that carried some,
        or a restart from Redis lost the last of them, and no host block can be trusted."""
        ex = self.executor(executor_id, epoch)
        pool = ex.pool
        if num_transfers != pool.num_spills + pool.num_restores:
            pool.drop_host_tier()
        lost = [
            sid
            for sid, table in tables.items()
            if sid not in ex.seqs or ex.seqs[sid].blocks != list(table)
        ]
        gone = [sid for sid in ex.seqs if sid not in tables or sid in lost]
        if lost and ex.num_host_blocks:
            self._unhash_lost(ex, [sid for sid in lost if sid in ex.seqs])
        released = self.release(executor_id, epoch, gone) if gone else 0
        return released, lost

    @staticmethod
    def _unhash_lost(ex: ExecutorState, lost: list[str]) -> None:
        """The blocks only lost sequences hold lose their hashes before they are released: a
        block restored from the host tier is hashed when it is allocated, and the executor that
        never got the reply never copied it in (its other blocks lose little: only what the
        lost sequences alone held)."""
        held: dict[int, int] = {}
        for sid in lost:
            for b in ex.seqs[sid].blocks:
                held[b] = held.get(b, 0) + 1
        pool = ex.pool
        for b, n in held.items():
            if pool.ref[b] == n and pool.hash[b] is not None:
                pool.unhash(b)

    def cached_tokens(
        self, executors: Sequence[ExecutorState], data: bytes, cache_salt: str = ""
    ) -> list[int]:
        """`match`'s figure (the cached prefix of the prompt `data`, token_data's encoding, that
        an allocation would hit: whole blocks, never the last token) for each of `executors`,
        for routing. Executors that share a block size and extra keys (one model's fingerprint,
        one salt) share a hash chain: it is computed once, and only as far as the longest hit
        among them, instead of once per executor."""
        out = [0] * len(executors)
        groups: dict[tuple[int, bytes], list[int]] = {}
        for i, ex in enumerate(executors):
            groups.setdefault((ex.block_size, ex.extra_for(cache_salt)[0]), []).append(i)
        for (bs, extra), members in groups.items():
            num_full = (len(data) // 4 - 1) // bs
            if num_full <= 0:
                continue
            alive = members
            for h in hashing.iter_chain_data(extra, data, bs, 0, num_full, hashing.ROOT):
                alive = [
                    i
                    for i in alive
                    if h in executors[i].pool.index or h in executors[i].pool.host_index
                ]
                if not alive:
                    break
                for i in alive:
                    out[i] += bs
        return out

    def match(
        self, token_ids: Sequence[int], cache_salt: str = "", executor_id: str = ""
    ) -> dict[str, int]:
        """Cached prefix length (tokens) per executor, without taking references."""
        if executor_id:
            ex = self.executors.get(executor_id)
            if ex is None:
                raise InvalidRequest(f"match: executor {executor_id!r} is not registered")
            targets = [ex]
        else:
            targets = list(self.executors.values())
        data = _token_data(token_ids)
        out = {}
        for ex in targets:
            hits, _, _ = self._prefix_hits(ex, ex.extra_for(cache_salt)[0], data)
            out[ex.executor_id] = len(hits) * ex.block_size
        return out

    # -- inspection -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything that defines the state (not timings): tests compare these for identity."""
        out = {}
        for eid, ex in sorted(self.executors.items()):
            p = ex.pool
            out[eid] = {
                "epoch": ex.epoch,
                "num_blocks": ex.num_blocks,
                "block_size": ex.block_size,
                "fingerprint": ex.model_fingerprint,
                "address": ex.address,
                "model": ex.model,
                "max_model_len": ex.max_model_len,
                "ref": list(p.ref),
                "hash": list(p.hash),
                "free": list(p.free),
                "cached": list(p.cached),
                "index": dict(p.index),
                "evictions": p.evictions,
                "num_host_blocks": ex.num_host_blocks,
                "kv_block_bytes": ex.kv_block_bytes,
                "host_hash": list(p.host_hash),
                "host_free": list(p.host_free),
                "host_cached": list(p.host_cached),
                "host_index": dict(p.host_index),
                "transfers": (p.num_spills, p.num_restores, p.host_drops),
                "host_copies": dict(sorted(p.ahead.items())),
                "seqs": {
                    sid: (s.extra, s.tenant, list(s.blocks), list(s.hashes))
                    for sid, s in sorted(ex.seqs.items())
                },
            }
        return {"executors": out, "last_epoch": dict(self.last_epoch)}

    def check(self) -> None:
        """Asserts the module invariants (tests; O(total blocks))."""
        for ex in self.executors.values():
            ex.pool.check()
            counts = [0] * ex.num_blocks
            for sid, s in ex.seqs.items():
                assert len(set(s.blocks)) == len(s.blocks), f"{sid} holds a block twice"
                assert len(s.hashes) <= len(s.blocks)
                for b in s.blocks:
                    counts[b] += 1
            assert counts == ex.pool.ref, "ref counts differ from the tables holding the blocks"
