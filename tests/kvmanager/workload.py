"""A deterministic random workload over the BlockAllocator API, for comparing two allocators op
by op (a kvmanager process against an in-process reference) and for traffic under faults.
The mirror of each sequence's written tokens lives here, so commits carry real block contents."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pagemesh.services.kvmanager.api import AllocatorError, CommitEntry, ExtendEntry

PREFIXES = [list(range(100, 132)), list(range(100, 116)) + list(range(500, 516)), [7] * 24]


@dataclass
class Workload:
    seed: int
    block_size: int = 4
    salts: tuple[str, ...] = ("", "", "tenant-a")
    rng: random.Random = field(init=False)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    n: int = 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def next_op(self) -> tuple:
        r = self.rng
        live = sorted(self.tokens)
        kind = r.choice(
            ["allocate"] * 4 + ["extend"] * 3 + ["commit"] * 3 + ["fork", "release", "release"]
        )
        if kind == "allocate" or not live:
            self.n += 1
            prompt = r.choice(PREFIXES)[: r.randint(4, 32)] + [
                r.randint(0, 50) for _ in range(r.randint(0, 10))
            ]
            return ("allocate", f"q{self.n}", prompt, r.choice(self.salts), r.randint(0, 4))
        if kind == "extend":
            sids = r.sample(live, min(len(live), r.randint(1, 6)))
            k = r.randint(1, 6)
            return ("extend", sids, k, [r.randint(0, 50) for _ in range(k)])
        if kind == "commit":
            return ("commit", r.choice(live))
        if kind == "fork":
            self.n += 1
            return ("fork", r.choice(live), [f"q{self.n}c{i}" for i in range(r.randint(1, 2))])
        return ("release", r.sample(live, min(len(live), r.randint(1, 2))))

    async def apply(self, a, op: tuple, mirror: bool = True):
        """Runs `op` on allocator `a`; returns a comparable result (errors by class name). With
        mirror=False the token mirror is left alone (the second of two allocators)."""
        try:
            return await self._apply(a, op, mirror)
        except AllocatorError as e:
            return ("error", type(e).__name__)

    async def _apply(self, a, op: tuple, mirror: bool):
        bs = self.block_size
        kind = op[0]
        if kind == "allocate":
            _, sid, prompt, salt, la = op
            r = await a.allocate(sid, prompt, salt, la)
            if mirror:
                self.tokens[sid] = list(prompt)
            return (r.block_ids, r.num_cached_tokens)
        if kind == "extend":
            _, sids, k, new = op
            entries = [ExtendEntry(s, len(self.tokens[s]), len(self.tokens[s]) + k) for s in sids]
            r = await a.extend(entries)
            if mirror:
                for s in sids:
                    self.tokens[s] += new
            return ({s: (u.first_index, u.block_ids) for s, u in r.updates.items()}, r.copies)
        if kind == "commit":
            sid = op[1]
            toks = self.tokens[sid]
            entries = [
                CommitEntry(sid, i, toks[i * bs : (i + 1) * bs]) for i in range(len(toks) // bs)
            ]
            return await a.commit(entries)
        if kind == "fork":
            _, parent, kids = op
            r = await a.fork(parent, kids, len(self.tokens[parent]))
            if mirror:
                for k in kids:
                    self.tokens[k] = list(self.tokens[parent])
            return r
        _, sids = op
        r = await a.release(sids)
        if mirror:
            for s in sids:
                del self.tokens[s]
        return r
