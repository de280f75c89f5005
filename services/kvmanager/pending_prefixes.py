"""Prefixes on their way into an executor's cache: routed there, not yet committed.

The prefix index only holds blocks whose KV is written, so a burst of requests sharing a prefix
that no executor holds yet (a tenant's first few questions, arriving while the first one still
waits for its prefill) would each see "nothing cached anywhere" and be spread by load, each
executor then computing and caching the same context (seen on the GPU: at 256 requests/s, 51 of
384 requests routed that way; the hit rate 0.89 of the theoretical). The router records where
each prompt's prefix went, keyed by the hash chain at a fixed depth, for a few seconds; a prompt
that nothing holds yet but that shares the recorded prefix goes to the same executor, where the
blocks will be (SGLang's cache-aware router inserts a routed prompt into its tree the same way).
The load term and the guard still apply to it.
"""

from __future__ import annotations

import time

from pagemesh.services.kvmanager import hashing

# How deep the key reaches: prompts that share this many leading blocks share a context, not just
# a chat template's header (2 blocks = 32 tokens at block size 16).
KEY_BLOCKS = 2
# Long enough for a request to wait for its prefill and commit its blocks under load (seen: TTFT
# p50 0.3 s at 256/s); after that the prefix index knows the blocks themselves.
TTL_S = 5.0
# Entries kept before expired ones are swept (bounded memory whatever the arrival rate).
SWEEP_AT = 50_000


class PendingPrefixes:
    def __init__(self, ttl: float = TTL_S) -> None:
        self.ttl = ttl
        self._where: dict[bytes, tuple[str, float]] = {}  # key -> (executor id, expiry)

    @staticmethod
    def key(extra: bytes, prompt: bytes, block_size: int) -> tuple[bytes, int] | None:
        """(the chain hash of the prompt's first blocks, how many tokens they hold), or None
        when the prompt has fewer full blocks than the key needs (never its last token)."""
        num_full = (len(prompt) // 4 - 1) // block_size
        depth = min(num_full, KEY_BLOCKS)
        if depth < KEY_BLOCKS:
            return None
        *_, last = hashing.iter_chain_data(extra, prompt, block_size, 0, depth, hashing.ROOT)
        return last, depth * block_size

    def record(self, key: bytes, executor_id: str) -> None:
        now = time.monotonic()
        if len(self._where) >= SWEEP_AT:
            self._where = {k: v for k, v in self._where.items() if v[1] > now}
        self._where[key] = (executor_id, now + self.ttl)

    def lookup(self, key: bytes) -> str | None:
        hit = self._where.get(key)
        if hit is None or hit[1] <= time.monotonic():
            return None
        return hit[0]
