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
BLOCK_STORED, HASH_REMOVED) for a consumer to take; None records nothing.
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
    Event,
)


@dataclass(slots=True)
class BlockPool:
    num_blocks: int
    # Called with a block's age (seconds since its hash was published) when it is evicted.
    on_evict: Callable[[float], None] | None = None
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
            self._evict(b)
        self.ref[b] = 1
        if self.events is not None:
            self.events.append((BLOCK, b))
        return b

    def take_many(self, n: int) -> list[int]:
        """`n` x take(), same blocks in the same order, without a call per block."""
        free = self.free
        k = n if n <= len(free) else len(free)
        popleft = free.popleft
        out = [popleft() for _ in range(k)]
        for _ in range(n - k):
            b = self.cached.popitem(last=False)[0]
            self._evict(b)
            out.append(b)
        ref = self.ref
        for b in out:
            ref[b] = 1
        if self.events is not None:
            self.events.append((BLOCKS, out[:]))  # a copy: `out` is the caller's
        return out

    def _evict(self, b: int) -> None:
        h = self.hash[b]
        assert h is not None and self.index[h] == b
        del self.index[h]
        self.hash[b] = None
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(time.time() - self.birth[b])
        if self.events is not None:
            self.events.append((HASH_REMOVED, h))

    def take_hits(self, blocks: list[int]) -> None:
        """Prefix hits: one more reference on each indexed block (in use or cached)."""
        ref, cached = self.ref, self.cached
        for b in blocks:
            r = ref[b]
            if r == 0:
                del cached[b]
            ref[b] = r + 1
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
