"""One executor's pool of logical blocks: ref counts, the free queue, the cached (evictable) LRU
queue and the prefix index (hash -> block). No tensors: block ids index the executor's memory.

States of a block (exactly one holds, and the counts add up to `num_blocks`):
  free    ref == 0, no hash           -> in `free` (FIFO)
  in use  ref >= 1 (hash or not)      -> in no queue
  cached  ref == 0, hashed            -> in `cached` (LRU: oldest first), reusable by a prefix hit
Invariants, checked by `check()`:
  index[h] == b  <=>  hash[b] == h    (a block holds at most one hash, a hash names one block)
  a block with ref > 0 is in no queue, so it can never be evicted or handed out again.
Every operation is O(1) (a bulk take is O(n) for n blocks); eviction pops the LRU end.

`stamp[b]` orders the queues: each block gets the next stamp when it enters `free` or `cached`,
so persistence can restore the exact queue order by sorting on it.

With an `events` list (events.py), every transition records what it changed (BLOCK, BLOCKS,
BLOCK_STORED, HASH_REMOVED, HOST_BLOCKS) for a consumer to take; None records nothing.

The host tier (DESIGN.md "Memory tiers"; `host_blocks` > 0): a second, larger pool in the
executor's host memory that only ever holds cached blocks. Its blocks are free or cached:
  host free    no hash                -> in `host_free` (FIFO)
  host cached  hashed                 -> in `host_cached` (its own LRU: oldest first)
A cached GPU block that is evicted moves its hash to a host block (a *spill*, recorded in
`spills` as (gpu block, host block) for the executor to copy out before the GPU block is
written again); when the host tier is full its oldest block is dropped to make room. A prefix
hit on a host block (a *restore*) moves the hash back onto a fresh GPU block (`restores`:
(host block, gpu block), copied in before the step that reads it) and frees the host block.
The tiers are exclusive, so one more invariant holds:
  host_index[h] == hb  <=>  host_hash[hb] == h, and no hash is in both `index` and `host_index`.
The transfers are listed in the order they happened: replayed in that order (each batch's
spills, then its restores), no copy reads a block a copy before it overwrote.

Spill ahead (`spill_ahead`): the oldest cached GPU blocks may be copied out before they are
evicted, a bounded number per call, so that the eviction itself moves no bytes (a burst of
hundreds of spills at once queues the step's own device-to-host copies behind it: issue 26).
Such a block is *cached with a host copy*: `ahead[b] == hb`, and host block hb is a third
host state besides free and cached:
  host copy    host_hash[hb] == hash[b] -> in no host queue, not in `host_index` (the hash is
               indexed on the GPU: the indexes stay exclusive)
  ahead[b] == hb  =>  ref[b] == 0, b in `cached`, hash[b] == host_hash[hb]; the blocks of
  `ahead` are the oldest of `cached` (copies are made oldest first; a block leaves `cached` from
  anywhere, and joins at its newest end), so eviction meets them first.
Evicting b then only moves its hash into host block hb (host cached, newest end), no spill. A
hit on b (it is in use again) frees its copy: a block in use never has one, so publishing,
unhashing and copy-on-write never need to know about copies, and the hit made b the most
recently used, the farthest from eviction; the host block is better spent on a block that is
not on the GPU at all. If b drifts back to the oldest end, it is copied again.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pagemesh.services.kvmanager.events import (
    BLOCK,
    BLOCK_STORED,
    BLOCKS,
    HASH_REMOVED,
    HOST_BLOCKS,
    Event,
)


def _free_then_oldest(
    free: deque[int], lru: OrderedDict[int, None], n: int
) -> tuple[list[int], list[int]]:
    """`n` blocks of one tier (n <= free + lru): free ones first, then the LRU's oldest, popped;
    returns (the free ones, the LRU's), for the caller to drop the latter's hashes."""
    k = n if n <= len(free) else len(free)
    popleft = free.popleft
    taken = [popleft() for _ in range(k)]
    popitem = lru.popitem
    return taken, [popitem(last=False)[0] for _ in range(n - k)]


def _unhash(
    blocks: list[int],
    hashes: list[bytes | None],
    index: dict[bytes, int],
    birth: list[float],
    now: float,
) -> tuple[list[bytes], list[float]]:
    """Blocks of one tier lose their hashes (out of `hashes` and the tier's `index`); returns
    the hashes and the blocks' ages (seconds since `birth`), in the blocks' order."""
    removed: list[bytes] = []
    ages: list[float] = []
    for b in blocks:
        h = hashes[b]
        assert h is not None and index[h] == b
        del index[h]
        hashes[b] = None
        removed.append(h)
        ages.append(now - birth[b])
    return removed, ages


@dataclass(slots=True)
class BlockPool:
    num_blocks: int
    # Called with the ages (seconds since their hashes were published) of the blocks one
    # allocation evicts.
    on_evict: Callable[[list[float]], None] | None = None
    # Change events for a consumer to take (events.py); None: not recorded.
    events: list[Event] | None = None
    ref: list[int] = field(init=False)
    hash: list[bytes | None] = field(init=False)
    birth: list[float] = field(init=False)  # wall-clock time the hash was published
    stamp: list[int] = field(init=False)
    free: deque[int] = field(init=False)
    cached: OrderedDict[int, None] = field(init=False)
    index: dict[bytes, int] = field(init=False)
    evictions: int = 0
    next_stamp: int = 0
    # -- the host tier (module docstring); 0 blocks: none, evicted blocks are dropped
    host_blocks: int = 0
    # Called with the ages (seconds since their spills) of the host blocks an allocation
    # restores, and of those it drops.
    on_restore: Callable[[list[float]], None] | None = None
    on_host_drop: Callable[[list[float]], None] | None = None
    host_hash: list[bytes | None] = field(init=False)
    host_birth: list[float] = field(init=False)  # wall-clock time of the spill
    host_stamp: list[int] = field(init=False)  # queue order, as `stamp`
    host_free: deque[int] = field(init=False)
    host_cached: OrderedDict[int, None] = field(init=False)
    host_index: dict[bytes, int] = field(init=False)
    # Transfers since the caller last took them (take_transfers): (gpu, host) and (host, gpu).
    spills: list[tuple[int, int]] = field(init=False)
    restores: list[tuple[int, int]] = field(init=False)
    # Cached GPU blocks with a copy in the host tier: block -> host block (module docstring).
    ahead: dict[int, int] = field(init=False)
    num_spills: int = 0  # spills recorded, those made ahead of eviction included
    num_restores: int = 0
    num_spills_ahead: int = 0  # spills made ahead of eviction
    num_evicted_ahead: int = 0  # evictions that moved no bytes: the block had its copy
    host_drops: int = 0  # host blocks whose hash was dropped to make room (the host LRU)

    def __post_init__(self) -> None:
        n = self.num_blocks
        self.ref = [0] * n
        self.hash = [None] * n
        self.birth = [0.0] * n
        # Untouched blocks sort before anything stamped later, in id order.
        self.stamp = list(range(-n, 0))
        self.free = deque(range(n))
        self.cached = OrderedDict()
        self.index = {}
        k = self.host_blocks
        self.host_hash = [None] * k
        self.host_birth = [0.0] * k
        self.host_stamp = list(range(-k, 0))
        self.host_free = deque(range(k))
        self.host_cached = OrderedDict()
        self.host_index = {}
        self.spills = []
        self.restores = []
        self.ahead = {}

    # -- counts ---------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - len(self.free) - len(self.cached)

    @property
    def num_host_cached(self) -> int:
        return len(self.host_cached)

    @property
    def num_host_free(self) -> int:
        return len(self.host_free)

    @property
    def num_host_copies(self) -> int:
        return len(self.ahead)

    @property
    def num_available(self) -> int:
        """Blocks a fresh allocation can get: free ones, then cached ones by eviction."""
        return len(self.free) + len(self.cached)

    # -- transitions ----------------------------------------------------------------------------
    def take(self) -> int:
        """A fresh block with ref 1. Free blocks go first, so cached prefixes survive as long as
        possible; then the least recently used cached block is evicted. The caller has checked
        `num_available`."""
        if self.free:
            b = self.free.popleft()
        else:
            b = self.cached.popitem(last=False)[0]
            self._evict_many([b])
        self.ref[b] = 1
        if self.events is not None:
            self.events.append((BLOCK, b))
        return b

    def take_many(self, n: int) -> list[int]:
        """`n` x take(), same blocks in the same order, without a call per block."""
        out, evicted = _free_then_oldest(self.free, self.cached, n)
        if evicted:
            self._evict_many(evicted)
            out += evicted
        ref = self.ref
        for b in out:
            ref[b] = 1
        if self.events is not None:
            self.events.append((BLOCKS, out[:]))  # a copy: `out` is the caller's
        return out

    def _evict_many(self, blocks: list[int]) -> None:
        """Cached blocks just taken off the LRU lose their hashes (oldest first), which spill
        to the host tier. One pass and one stats call for the lot: an allocation of a long
        prompt evicts hundreds of blocks on the executor's critical path (issue 26: per-block
        stats calls were most of a restored turn's admission time)."""
        now = time.time()
        evicted, ages = _unhash(blocks, self.hash, self.index, self.birth, now)
        self.evictions += len(blocks)
        if self.on_evict is not None:
            self.on_evict(ages)
        if self.events is not None:
            self.events.extend([(HASH_REMOVED, h) for h in evicted])
        if not self.host_blocks:
            return
        if self.ahead:
            blocks, evicted = self._evict_copied(blocks, evicted, now)
        self._spill_many(blocks, evicted, now)

    def _evict_copied(
        self, blocks: list[int], hashes: list[bytes], now: float
    ) -> tuple[list[int], list[bytes]]:
        """Evicted blocks whose host copy exists (spilled ahead) go on in it, no copy made;
        returns the others, to spill."""
        ahead = self.ahead
        host_hash, host_index, host_cached = self.host_hash, self.host_index, self.host_cached
        rest: list[int] = []
        rest_hashes: list[bytes] = []
        moved: list[int] = []
        stamp = self.next_stamp
        for b, h in zip(blocks, hashes, strict=True):
            hb = ahead.pop(b, -1)
            if hb < 0:
                rest.append(b)
                rest_hashes.append(h)
                continue
            assert host_hash[hb] == h
            host_index[h] = hb
            self.host_birth[hb] = now
            self.host_stamp[hb] = stamp
            stamp += 1
            host_cached[hb] = None  # most recently used end
            moved.append(hb)
        self.next_stamp = stamp
        if moved:
            self.num_evicted_ahead += len(moved)
            if self.events is not None:
                self.events.append((HOST_BLOCKS, moved))
        return rest, rest_hashes

    def spill_ahead(self, n: int) -> int:
        """Copies up to `n` of the oldest cached GPU blocks without a host copy out to the host
        tier (free host blocks first, then the host LRU's oldest, dropped), recorded as spills
        for the executor; the GPU blocks stay cached (module docstring). Returns how many."""
        if n <= 0 or not self.host_blocks:
            return 0
        ahead, host_free, host_cached = self.ahead, self.host_free, self.host_cached
        n = min(n, len(host_free) + len(host_cached))
        picked: list[int] = []
        if n > 0:
            for b in self.cached:  # oldest first; the copied ones are its oldest (docstring)
                if b not in ahead:
                    picked.append(b)
                    if len(picked) == n:
                        break
        if not picked:
            return 0
        n = len(picked)
        now = time.time()
        targets = self._take_host_blocks(n, now)
        hashes, host_hash, host_birth = self.hash, self.host_hash, self.host_birth
        for b, hb in zip(picked, targets, strict=True):
            host_hash[hb] = hashes[b]
            host_birth[hb] = now
            ahead[b] = hb
        self.spills.extend(zip(picked, targets, strict=True))
        self.num_spills += n
        self.num_spills_ahead += n
        if self.events is not None:
            self.events.append((HOST_BLOCKS, targets))
        return n

    def _take_host_blocks(self, n: int, now: float) -> list[int]:
        """`n` host blocks to copy into (n <= free + cached): free ones first, then the host
        LRU's oldest, whose hashes are dropped."""
        targets, dropped = _free_then_oldest(self.host_free, self.host_cached, n)
        if dropped:
            self._host_drop_many(dropped, now)
            targets += dropped
        return targets

    def _free_copies(self, blocks: list[int]) -> None:
        """The host copies of `blocks` (those that have one) are freed."""
        ahead = self.ahead
        freed = [hb for hb in (ahead.pop(b, -1) for b in blocks) if hb >= 0]
        if not freed:
            return
        stamp = self.next_stamp
        for hb in freed:
            self.host_hash[hb] = None
            self.host_stamp[hb] = stamp
            stamp += 1
            self.host_free.append(hb)
        self.next_stamp = stamp
        if self.events is not None:
            self.events.append((HOST_BLOCKS, freed))

    def _spill_many(self, blocks: list[int], hashes: list[bytes], now: float) -> None:
        """Evicted GPU blocks (oldest first) and their hashes go on in host blocks: free ones,
        then the host LRU's oldest, whose hashes are dropped. More blocks than the host tier can
        take (every other host block is being restored by the allocation that evicts): the
        oldest are dropped, as without a tier (block by block, they would have been spilled and
        then dropped again by the newer ones)."""
        host_free, host_cached = self.host_free, self.host_cached
        room = len(host_free) + len(host_cached)
        if len(blocks) > room:
            blocks, hashes = blocks[len(blocks) - room :], hashes[len(hashes) - room :]
        if not blocks:
            return
        targets = self._take_host_blocks(len(blocks), now)
        host_hash, host_index = self.host_hash, self.host_index
        host_birth, host_stamp = self.host_birth, self.host_stamp
        stamp = self.next_stamp
        for hb, h in zip(targets, hashes, strict=True):
            host_hash[hb] = h
            host_index[h] = hb
            host_birth[hb] = now
            host_stamp[hb] = stamp
            stamp += 1
            host_cached[hb] = None  # most recently used end
        self.next_stamp = stamp
        self.spills.extend(zip(blocks, targets, strict=True))
        self.num_spills += len(blocks)
        if self.events is not None:
            self.events.append((HOST_BLOCKS, targets))

    def _host_drop_many(self, host_blocks: list[int], now: float) -> None:
        """Host blocks just taken off the host LRU lose their hashes."""
        _, ages = _unhash(host_blocks, self.host_hash, self.host_index, self.host_birth, now)
        self.host_drops += len(host_blocks)
        if self.on_host_drop is not None:
            self.on_host_drop(ages)

    def unhash(self, b: int) -> None:
        """An in-use block's hash leaves the index (its contents cannot be trusted): it goes
        back to the free queue when released."""
        h = self.hash[b]
        assert h is not None and self.ref[b] > 0
        del self.index[h]
        self.hash[b] = None
        if self.events is not None:
            self.events.append((HASH_REMOVED, h))
            self.events.append((BLOCK, b))

    def pin_host(self, host_blocks: list[int]) -> None:
        """Host hits of an allocation leave the host LRU first, so that the spills of the same
        allocation's fresh blocks cannot drop them (`restore_many` follows in the same call)."""
        cached = self.host_cached
        for hb in host_blocks:
            del cached[hb]

    def restore_many(self, pairs: list[tuple[int, int]], now: float) -> None:
        """Each (host block hb, GPU block b): hb (pinned) comes back into fresh block b (ref 1,
        unhashed): the hash moves to b, hb is free again. The executor copies hb -> b before
        any step reads b (the transfers are replayed in order, so a later spill into hb comes
        after this copy). One call for an allocation's restores: a returning conversation
        restores hundreds of blocks on the allocation path, in its time to first token."""
        host_hash, host_index, host_birth = self.host_hash, self.host_index, self.host_birth
        host_stamp, host_free = self.host_stamp, self.host_free
        index, hashes, birth, ref = self.index, self.hash, self.birth, self.ref
        events = self.events
        ages: list[float] = []
        stamp = self.next_stamp
        for hb, b in pairs:
            h = host_hash[hb]
            assert h is not None and hashes[b] is None and ref[b] > 0
            ages.append(now - host_birth[hb])
            del host_index[h]
            host_hash[hb] = None
            host_stamp[hb] = stamp
            stamp += 1
            host_free.append(hb)
            index[h] = b
            hashes[b] = h
            birth[b] = now
            if events is not None:
                events.append((BLOCK_STORED, (b, h)))
                events.append((HOST_BLOCKS, [hb]))
        self.next_stamp = stamp
        self.restores.extend(pairs)
        self.num_restores += len(pairs)
        if self.on_restore is not None and ages:
            self.on_restore(ages)

    def take_transfers(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The spills and restores recorded since the last call, leaving none. Always lists of
        the caller's own: handing out the pool's (empty) ones would let a later transfer land
        in a reply already given (an admission round's first allocation, with none, got the
        second's spills too, and the executor ran them twice)."""
        out = self.spills, self.restores
        self.spills, self.restores = [], []
        return out

    def drop_host_tier(self) -> None:
        """Forgets every host-resident block (their hashes leave the index): after an outage
        kvmanager cannot know which spills the executor really made."""
        dropped = list(self.host_cached)
        self.host_cached.clear()
        self._host_drop_many(dropped, time.time())
        copies = list(self.ahead.values())
        self.ahead.clear()
        for hb in copies:
            self.host_hash[hb] = None
        for hb in dropped + copies:
            self.host_stamp[hb] = self.next_stamp
            self.next_stamp += 1
            self.host_free.append(hb)
        if self.events is not None and self.host_blocks:
            self.events.append((HOST_BLOCKS, list(range(self.host_blocks))))

    def take_hits(self, blocks: list[int]) -> None:
        """Prefix hits: one more reference on each indexed block (in use or cached)."""
        ref, cached = self.ref, self.cached
        for b in blocks:
            r = ref[b]
            if r == 0:
                del cached[b]
            ref[b] = r + 1
        if self.ahead:
            self._free_copies(blocks)  # in use again: no copy (module docstring)
        if self.events is not None:
            self.events.append((BLOCKS, blocks[:]))  # a copy: `blocks` is the caller's

    def incref(self, b: int) -> None:
        """Another table shares an in-use block (fork)."""
        assert self.ref[b] > 0
        self.ref[b] += 1
        if self.events is not None:
            self.events.append((BLOCK, b))

    def decref(self, b: int) -> None:
        r = self.ref[b] - 1
        assert r >= 0, f"block {b} released more often than referenced"
        self.ref[b] = r
        if r == 0:
            self.stamp[b] = self.next_stamp
            self.next_stamp += 1
            if self.hash[b] is None:
                self.free.append(b)
            else:
                self.cached[b] = None  # most recently used end
        if self.events is not None:
            self.events.append((BLOCK, b))

    def publish(self, b: int, h: bytes, now: float) -> bool:
        """Index an in-use, fully written block under `h`. False when the block is already hashed
        or another block already holds `h` (the existing one is kept: it may be shared already;
        this block stays unhashed and goes back to the free queue when released)."""
        if self.hash[b] is not None or h in self.index:
            return False
        hb = self.host_index.get(h)
        if hb is not None:
            # The same contents were recomputed (by a sequence allocated before they were
            # spilled): the GPU copy wins, the host one is freed (the tiers are exclusive).
            del self.host_index[h]
            del self.host_cached[hb]
            self.host_hash[hb] = None
            self.host_stamp[hb] = self.next_stamp
            self.next_stamp += 1
            self.host_free.append(hb)
            if self.events is not None:
                self.events.append((HOST_BLOCKS, [hb]))
        self.index[h] = b
        self.hash[b] = h
        self.birth[b] = now
        if self.events is not None:
            self.events.append((BLOCK_STORED, (b, h)))
        return True

    # -- restore and checks ---------------------------------------------------------------------
    def restore(
        self, records: Iterable[tuple[int, int, bytes | None, float, int]], next_stamp: int
    ) -> None:
        """Rebuilds the pool from (block, ref, hash, birth, stamp) records; blocks without a
        record keep their initial (free) state. Queue order comes back from the stamps."""
        for b, ref, h, birth, stamp in records:
            self.ref[b] = ref
            self.hash[b] = h
            self.birth[b] = birth
            self.stamp[b] = stamp
            if h is not None:
                self.index[h] = b
        self.next_stamp = next_stamp
        idle = sorted(
            (b for b in range(self.num_blocks) if self.ref[b] == 0), key=self.stamp.__getitem__
        )
        self.free = deque(b for b in idle if self.hash[b] is None)
        self.cached = OrderedDict((b, None) for b in idle if self.hash[b] is not None)

    def restore_host(self, records: Iterable[tuple[int, bytes | None, float, int]]) -> None:
        """Rebuilds the host tier from (host block, hash, birth, stamp) records (after
        `restore`); blocks without a record stay free."""
        self.ahead = {}
        self.host_index = {}
        self.host_hash = [None] * self.host_blocks
        for hb, h, birth, stamp in records:
            if h is not None and h in self.index:
                # A copy spilled ahead of its GPU block's eviction; without an idle GPU block
                # to belong to (cannot happen with a consistent snapshot), a free block.
                b = self.index[h]
                if self.ref[b] == 0 and b not in self.ahead:
                    self.ahead[b] = hb
                else:
                    h = None
            elif h is not None:
                self.host_index[h] = hb
            self.host_hash[hb] = h
            self.host_birth[hb] = birth
            self.host_stamp[hb] = stamp
        copies = set(self.ahead.values())
        order = sorted(range(self.host_blocks), key=self.host_stamp.__getitem__)
        self.host_free = deque(hb for hb in order if self.host_hash[hb] is None)
        self.host_cached = OrderedDict(
            (hb, None) for hb in order if self.host_hash[hb] is not None and hb not in copies
        )

    def check(self) -> None:
        """Asserts every invariant of the module docstring (tests; O(num_blocks))."""
        free = set(self.free)
        cached = set(self.cached)
        assert len(free) == len(self.free), "a block is twice in the free queue"
        assert not free & cached, "a block is both free and cached"
        for b in range(self.num_blocks):
            r, h = self.ref[b], self.hash[b]
            assert r >= 0
            if r > 0:
                assert b not in free and b not in cached, f"in-use block {b} is queued"
            elif h is None:
                assert b in free, f"idle unhashed block {b} is not free"
            else:
                assert b in cached, f"idle hashed block {b} is not cached"
            if h is not None:
                assert self.index.get(h) == b, f"block {b} hash not indexed"
        for h, b in self.index.items():
            assert self.hash[b] == h
        assert self.num_free + self.num_in_use + self.num_cached == self.num_blocks
        # The host tier: every host block free xor cached xor a copy, its index exact,
        # exclusive of GPU's.
        host_free = set(self.host_free)
        copies = set(self.ahead.values())
        assert len(copies) == len(self.ahead), "two GPU blocks share a host copy"
        assert len(host_free) == len(self.host_free), "a host block is twice in the free queue"
        assert not host_free & set(self.host_cached), "a host block is both free and cached"
        assert not copies & (host_free | set(self.host_cached)), "a host copy is also queued"
        assert len(host_free) + len(self.host_cached) + len(copies) == self.host_blocks
        for b, hb in self.ahead.items():
            h = self.hash[b]
            assert self.ref[b] == 0 and b in cached, f"block {b} has a host copy but is not cached"
            assert h is not None and self.host_hash[hb] == h, f"host copy {hb} of {b} differs"
        oldest = list(self.cached)[: len(self.ahead)]
        assert set(oldest) == set(self.ahead), "copied blocks are not the oldest cached ones"
        for hb in range(self.host_blocks):
            h = self.host_hash[hb]
            if hb in copies:
                assert h is not None and h not in self.host_index
            elif h is None:
                assert hb in host_free, f"unhashed host block {hb} is not free"
            else:
                assert hb in self.host_cached, f"hashed host block {hb} is not cached"
                assert self.host_index.get(h) == hb, f"host block {hb} hash not indexed"
                assert h not in self.index, f"host block {hb}'s hash is also on the GPU"
        for h, hb in self.host_index.items():
            assert self.host_hash[hb] == h
