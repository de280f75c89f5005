"""Property tests: random operation sequences against the core keep its invariants.

- free + in use + cached == total (BlockPool.check),
- ref count of a block == number of live tables holding it (Manager.check),
- no block with ref > 0 is evicted or handed out twice: every fresh block an operation returns
  was unreferenced before and is held by exactly one table after,
- a failed operation (OutOfBlocks) changes nothing,
- a prefix hit hands back blocks whose committed contents equal the prompt's (checked against a
  model of the executor's memory: what it wrote into each block, with every copy kvmanager
  asks for, copy-on-write, spills and restores, replayed in the order it gives them),
- with a host tier (TieredAllocatorMachine): every hashed block of either tier holds, in that
  model, exactly the contents its hash names, after every operation; the tiers are exclusive
  and each tier's queues and index agree (BlockPool.check).
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
    host_blocks = 0  # no host tier
    num_blocks = 12
    kv_block_bytes = 0

    def __init__(self) -> None:
        super().__init__()
        self.m = Manager(track_changes=True)
        self.epoch = self._register()
        self.tokens: dict[str, list[int]] = {}  # written tokens of each live sequence
        self.salt: dict[str, str] = {}
        # The executor's memory: GPU block -> the full-prefix contents written into it (salt,
        # then tokens), and the same for host blocks; and what each published hash names.
        self.content: dict[int, list] = {}
        self.host_content: dict[int, list] = {}
        self.hash_content: dict[bytes, list] = {}
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

    def _register(self) -> int:
        return self.m.register(
            EX,
            self.num_blocks,
            BS,
            "fp",
            num_host_blocks=self.host_blocks,
            kv_block_bytes=self.kv_block_bytes,
        )

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
        copied = set(self.ex.pool.ahead)  # blocks spilled ahead of eviction
        try:
            r = self.m.allocate(EX, self.epoch, sid, prompt, salt, lookahead)
        except OutOfBlocks:
            assert self.m.snapshot() == before
            event("allocate: out of blocks")
            return
        nh = r.num_cached_tokens // BS
        event("allocate: prefix hit" if nh else "allocate: miss")
        assert not copied & {g for g, _ in r.spills}, "an eviction of a copied block moved bytes"
        self.replay(r.spills, r.restores, [])
        if r.restores:
            event("allocate: restored from the host tier")
            assert {g for _, g in r.restores} <= set(r.block_ids[:nh])
        assert r.num_cached_tokens < len(prompt) and r.num_cached_tokens % BS == 0
        for i, b in enumerate(r.block_ids[:nh]):
            # A hit block holds exactly this prompt's prefix (same salt: extra keys match).
            assert self.content[b] == [salt, *prompt[: (i + 1) * BS]]
        restored = {g for _, g in r.restores}
        self.fresh_ok(refs, [b for b in r.block_ids if b in restored])
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
        self.replay(self.m.take_spills(EX), [], copies)
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
        pool = self.ex.pool
        for i in range(len(toks) // BS):  # the executor writes a block before committing it
            b = seq.blocks[i]
            if pool.hash[b] is None:  # (a hashed one is shared: it holds these contents)
                self.content[b] = [self.salt[sid], *toks[: (i + 1) * BS]]
        self.m.commit(EX, self.epoch, entries)
        for i in range(len(toks) // BS):
            h = pool.hash[seq.blocks[i]]
            if h is not None:
                self.hash_content.setdefault(h, [self.salt[sid], *toks[: (i + 1) * BS]])

    def replay(
        self,
        spills: list[tuple[int, int]],
        restores: list[tuple[int, int]],
        copies: list[tuple[int, int]],
    ) -> None:
        """The executor's copies, in the order kvmanager gives them."""
        if spills:
            event("spill")
        for g, h in spills:
            self.host_content[h] = self.content.get(g)
        for h, g in restores:
            self.content[g] = self.host_content.get(h)
        for s, d in copies:
            self.content[d] = self.content.get(s)

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
        self.epoch = self._register()
        self.tokens.clear()
        self.content.clear()
        self.host_content.clear()
        assert self.ex.pool.num_free == self.num_blocks
        assert self.ex.pool.num_host_free == self.host_blocks  # both tiers start empty

    @invariant()
    def invariants(self) -> None:
        self.m.check()
        p = self.ex.pool
        if p.evictions:
            event("evictions happened")
        assert p.num_free + p.num_in_use + p.num_cached == self.num_blocks
        # Every hashed block, in either tier, holds what its hash names.
        for b, h in enumerate(p.hash):
            if h is not None:
                assert self.content.get(b) == self.hash_content[h], f"GPU block {b}"
        for hb, h in enumerate(p.host_hash):
            if h is not None:
                assert self.host_content.get(hb) == self.hash_content[h], f"host block {hb}"


AllocatorMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestAllocator = AllocatorMachine.TestCase


class TieredAllocatorMachine(AllocatorMachine):
    """The same machine over a pool with a host tier: evictions spill, host hits restore."""

    host_blocks = 5
    num_blocks = 8  # more eviction pressure: more spills and host hits
    kv_block_bytes = 1 << 20  # a spill-ahead budget of N MiB is N blocks

    @rule(
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(0, 3), max_size=9),
        salt=st.sampled_from(["", "t"]),
    )
    def whole_request(self, prefix, tail, salt) -> None:
        """Allocate, write and commit, release: the cache fills with released prefixes, so the
        GPU tier evicts (spills) often and later prompts hit the host tier."""
        sid = f"s{self.n + 1}"  # the id `allocate` gives it
        before = len(self.tokens)
        self.allocate(prefix, tail, 0, salt)
        if len(self.tokens) == before:
            return  # out of blocks
        self.commit_seq(sid)
        self.m.release(EX, self.epoch, [sid])
        del self.tokens[sid]

    @rule(watermark=st.sampled_from([0.0, 0.25, 0.5, 1.0]), mib=st.integers(0, 3))
    def spill_ahead(self, watermark: float, mib: int) -> None:
        """A Step call's spill ahead of eviction: at most `mib` blocks (the budget) of the
        oldest cached blocks without a copy, while free and copied blocks are below the
        watermark; they stay cached on the GPU, and a later eviction of one moves no bytes."""
        self.m.spill_ahead_watermark, self.m.spill_ahead_mib = watermark, mib
        p = self.ex.pool
        short = int(watermark * self.num_blocks) - p.num_free - p.num_host_copies
        oldest = [b for b in p.cached if b not in p.ahead]
        cached_before = list(p.cached)
        spills = self.m.spill_ahead(EX)
        assert len(spills) <= max(0, min(mib, short))
        assert [g for g, _ in spills] == oldest[: len(spills)]  # the oldest first
        assert list(p.cached) == cached_before  # still cached, in the same order
        assert all(p.ahead[g] == h for g, h in spills)
        if spills:
            event("spilled ahead")
        self.replay(spills, [], [])

    @rule(agree=st.booleans())
    def reconcile(self, agree: bool) -> None:
        """After an outage: the tables agree; the host tier is kept when the executor received
        as many transfers as kvmanager made, and dropped (no spill trusted) otherwise."""
        tables = {sid: list(self.ex.seqs[sid].blocks) for sid in self.tokens}
        p = self.ex.pool
        count = p.num_spills + p.num_restores
        cached = p.num_host_cached
        assert self.m.reconcile(EX, self.epoch, tables, count if agree else count + 1) == (0, [])
        if agree:
            assert p.num_host_cached == cached
        else:
            assert p.num_host_cached == 0 and p.num_host_copies == 0
            self.host_content.clear()

    @invariant()
    def host_tier(self) -> None:
        p = self.ex.pool
        assert p.num_host_free + p.num_host_cached + p.num_host_copies == self.host_blocks
        if p.num_evicted_ahead:
            event("an eviction found its copy made ahead")
        if p.num_restores:
            event("restores happened")
        if p.host_drops:
            event("host LRU dropped a block")


TieredAllocatorMachine.TestCase.settings = AllocatorMachine.TestCase.settings
TestTieredAllocator = TieredAllocatorMachine.TestCase


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
