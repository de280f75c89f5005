"""Blocks on their way into an executor's cache: routed there, not computed and committed yet.

The prefix index only holds blocks whose KV is written, so a burst of requests sharing a context
that no executor holds yet (a tenant's users asking at once, while the first one's prefill
still runs) would each see "nothing cached anywhere" and be spread by load, several executors
then computing and caching the same context (seen on the H100 fleet at 256 requests/s: 99 of 384
requests routed that way, the hit rate 0.89 of the theoretical). The router records, for a few
seconds, the hash of every full block a routed prompt will compute on its executor; a prompt
whose chain runs through those hashes scores there as if they were cached. The executor holds
such a follower back until the blocks are committed, then it hits them (the executor's
inflight_prefill.py): the context is computed once, and held once. The load term and the guard
still apply. SGLang's cache-aware router inserts a routed prompt into its tree the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

# Long enough for a request to wait for its prefill and commit its blocks under load (seen: TTFT
# p90 0.45 s at 256/s); after that the prefix index knows the blocks themselves.
TTL_S = 5.0
# Entries kept before expired ones are swept (bounded memory whatever the arrival rate).
SWEEP_AT = 200_000


class PendingPrefixes:
    def __init__(self, ttl: float = TTL_S) -> None:
        self.ttl = ttl
        self._where: dict[bytes, tuple[str, float]] = {}  # block hash -> (executor id, expiry)

    def __len__(self) -> int:
        return len(self._where)

    def record(self, hashes: Iterable[bytes], executor_id: str) -> None:
        """`hashes` (full blocks of a prompt, not cached there) will be computed on the executor."""
        now = time.monotonic()
        if len(self._where) >= SWEEP_AT:
            self._where = {k: v for k, v in self._where.items() if v[1] > now}
        entry = (executor_id, now + self.ttl)
        for h in hashes:
            self._where[h] = entry

    def executor_of(self, block_hash: bytes, now: float) -> str | None:
        hit = self._where.get(block_hash)
        if hit is None or hit[1] <= now:
            return None
        return hit[0]
