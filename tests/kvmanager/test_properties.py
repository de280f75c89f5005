"""Property tests: random operation sequences against the core keep its invariants.

- free + in use + cached == total (BlockPool.check),
- ref count of a block == number of live tables holding it (Manager.check),
- no block with ref > 0 is evicted or handed out twice: every fresh block an operation returns
  was unreferenced before and is held by exactly one table after,
- a failed operation (OutOfBlocks) changes nothing,
- a prefix hit hands back blocks whose committed contents equal the prompt's (checked against a
  model that remembers which tokens each committed block holds).
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from pagemesh.services.kvmanager.api import OutOfBlocks
from pagemesh.services.kvmanager.manager import Manager

BS = 4
EX = "ex"
# A small vocabulary and a few shared prefixes, so that hits, sharing and eviction all happen.
PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5]]


class AllocatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.m = Manager(track_changes=True)
        self.num_blocks = 12
        self.epoch = self.m.register(EX, self.num_blocks, BS, "fp")
        self.tokens: dict[str, list[int]] = {}  # written tokens of each live sequence
        self.salt: dict[str, str] = {}
        self.content: dict[int, list[int]] = {}  # committed block -> its full-prefix tokens
        self.n = 0

    @initialize(prefix=st.sampled_from(PREFIXES))
    def warm(self, prefix) -> None:
        """Start with a committed, released prefix in the cache, so hits and eviction come early."""
        self.m.allocate(EX, self.epoch, "w", prefix)
        self.tokens["w"] = list(prefix)
        self.salt["w"] = ""
        self.commit_seq("w")
        self.m.release(EX, self.epoch, ["w"])
        del self.tokens["w"]

    @property
    def ex(self):
        return self.m.executors[EX]

    def fresh_ok(self, before_refs: list[int], blocks: list[int]) -> None:
        for b in blocks:
            assert before_refs[b] == 0, f"block {b} handed out while referenced"
            assert self.ex.pool.ref[b] == 1

    def new_id(self) -> str:
        self.n += 1
        return f"s{self.n}"

    @rule(
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(0, 3), max_size=9),
        lookahead=st.integers(0, 5),
        salt=st.sampled_from(["", "", "t"]),
    )
    def allocate(self, prefix, tail, lookahead, salt) -> None:
        prompt = prefix + tail
        sid = self.new_id()
        before = self.m.snapshot()
        refs = list(self.ex.pool.ref)
        try:
            r = self.m.allocate(EX, self.epoch, sid, prompt, salt, lookahead)
        except OutOfBlocks:
            assert self.m.snapshot() == before
            event("allocate: out of blocks")
            return
        nh = r.num_cached_tokens // BS
        event("allocate: prefix hit" if nh else "allocate: miss")
        assert r.num_cached_tokens < len(prompt) and r.num_cached_tokens % BS == 0
        for i, b in enumerate(r.block_ids[:nh]):
            # A hit block holds exactly this prompt's prefix (same salt: extra keys match).
            assert self.content[b] == [salt, *prompt[: (i + 1) * BS]]
        self.fresh_ok(refs, r.block_ids[nh:])
        self.tokens[sid] = list(prompt)
        self.salt[sid] = salt

    @rule(data=st.data(), k=st.integers(1, 6), lookahead=st.integers(0, 3), n=st.integers(1, 4))
    @precondition(lambda self: self.tokens)
    def extend(self, data, k, lookahead, n) -> None:
        sids = data.draw(
            st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, max_size=n, unique=True)
        )
        nc = [len(self.tokens[s]) for s in sids]
        nt = [c + k + lookahead for c in nc]
        before = self.m.snapshot()
        refs = list(self.ex.pool.ref)
        try:
            updates, copies = self.m.extend(EX, self.epoch, sids, nc, nt)
        except OutOfBlocks:
            assert self.m.snapshot() == before
            event("extend: out of blocks")
            return
        if copies:
            event("extend: copy-on-write")
        dsts = [d for _, d in copies]
        assert len(set(dsts)) == len(dsts)
        for s, _ in copies:
            assert refs[s] > 1
        for sid, (first, blocks) in updates.items():
            assert blocks == self.ex.seqs[sid].blocks[first:]
        grown = [b for _, blocks in updates.values() for b in blocks if refs[b] == 0]
        self.fresh_ok(refs, grown)
        for s in sids:
            self.tokens[s] += data.draw(st.lists(st.integers(0, 3), min_size=k, max_size=k))

    @rule(data=st.data())
    @precondition(lambda self: self.tokens)
    def commit(self, data) -> None:
        self.commit_seq(data.draw(st.sampled_from(sorted(self.tokens))))

    def commit_seq(self, sid: str) -> None:
        toks = self.tokens[sid]
        seq = self.ex.seqs[sid]
        entries = [(sid, i, toks[i * BS : (i + 1) * BS]) for i in range(len(toks) // BS)]
        self.m.commit(EX, self.epoch, entries)
        pool = self.ex.pool
        for i in range(len(toks) // BS):
            b = seq.blocks[i]
            if pool.hash[b] is not None:
                self.content[b] = [self.salt[sid], *toks[: (i + 1) * BS]]

    @rule(data=st.data(), n=st.integers(1, 3))
    @precondition(lambda self: self.tokens)
    def fork(self, data, n) -> None:
        parent = data.draw(st.sampled_from(sorted(self.tokens)))
        kids = [self.new_id() for _ in range(n)]
        written = len(self.tokens[parent])
        tables = self.m.fork(EX, self.epoch, parent, kids, written)
        for k in kids:
            assert tables[k] == self.ex.seqs[parent].blocks[: -(-written // BS)]
            self.tokens[k] = list(self.tokens[parent])
            self.salt[k] = self.salt[parent]

    @rule(data=st.data())
    @precondition(lambda self: self.tokens)
    def release(self, data) -> None:
        sids = data.draw(st.lists(st.sampled_from(sorted(self.tokens)), min_size=1, unique=True))
        assert self.m.release(EX, self.epoch, sids) == len(sids)
        for s in sids:
            del self.tokens[s]

    @rule()
    def reregister(self) -> None:
        self.epoch = self.m.register(EX, self.num_blocks, BS, "fp")
        self.tokens.clear()
        self.content.clear()
        assert self.ex.pool.num_free == self.num_blocks

    @invariant()
    def invariants(self) -> None:
        self.m.check()
        p = self.ex.pool
        if p.evictions:
            event("evictions happened")
        assert p.num_free + p.num_in_use + p.num_cached == self.num_blocks
        # Forget contents of evicted blocks (they may be reused for anything).
        for b in [b for b in self.content if p.hash[b] is None]:
            del self.content[b]


AllocatorMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocator = AllocatorMachine.TestCase


async def test_long_random_runs_keep_invariants() -> None:
    """Longer seeded runs than hypothesis explores, through the allocator API, with the
    invariants checked after every operation and every interesting path visited."""
    from pagemesh.services.kvmanager.local import LocalAllocator

    from tests.kvmanager.workload import Workload

    seen: dict[str, int] = {}
    for seed in range(4):
        a = LocalAllocator("ex", Manager(track_changes=True))
        await a.register(40, 4, "fp")
        w = Workload(seed)
        pool = a.manager.executors["ex"].pool
        for _ in range(600):
            op = w.next_op()
            refs = list(pool.ref)
            r = await w.apply(a, op)
            a.manager.check()
            if r == ("error", "OutOfBlocks"):
                seen["out of blocks"] = seen.get("out of blocks", 0) + 1
            elif op[0] == "allocate":
                blocks, cached = r
                nh = cached // 4
                assert all(refs[b] == 0 for b in blocks[nh:])  # fresh blocks were unreferenced
                key = "hit" if cached else "miss"
                seen[key] = seen.get(key, 0) + 1
            elif op[0] == "extend" and r[1]:
                seen["copy-on-write"] = seen.get("copy-on-write", 0) + 1
        seen["evictions"] = seen.get("evictions", 0) + pool.evictions
    assert all(
        seen.get(k, 0) > 5 for k in ("out of blocks", "hit", "miss", "copy-on-write", "evictions")
    ), seen
