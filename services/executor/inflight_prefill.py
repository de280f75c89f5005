"""Prefills in flight: a waiting prompt whose leading blocks a running sequence is computing
right now is not admitted until those blocks are committed; it then hits them in the prefix
cache instead of computing the same KV a second time.

The prefix index (kvmanager) holds only blocks whose KV is written and committed. A burst of
prompts sharing a context that nothing has cached yet (a tenant's users asking at once, a new
system prompt under load) would otherwise all be admitted while the first one's prefill runs,
each computing and holding its own copy of the context: the compute is spent n times and the
pool holds n copies until they finish (seen on the H100 fleet at 256 requests/s: 0.89 of the
theoretical hit rate). Waiting costs the follower about the time of that one prefill, which it
would have spent computing the same tokens itself. SGLang's scheduler defers in-batch prefix
duplicates the same way.

The check is exact for running sequences: their uncommitted prompt blocks are known
(num_committed_blocks .. the last full prompt block); keys are chained over the blocks with the
cache salt, so equal keys mean equal prefixes under the same salt.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from pagemesh.services.executor.sequence import Sequence

# A follower waits only for at least this many shared blocks (64 tokens at block size 16):
# recomputing a chat template's header costs less than waiting for a step.
MIN_SHARED_BLOCKS = 4
# Prompt blocks remembered as cached (about 4 MiB of keys).
KNOWN_CAPACITY = 1 << 16


def prompt_block_keys(seq: Sequence, block_size: int) -> list[int]:
    """Chained keys of the prompt's full blocks, cached on the sequence (a prompt never changes).
    Key i stands for the salt and tokens[: (i + 1) * block_size]."""
    keys = seq.prompt_block_keys
    if keys is None:
        tokens = seq.token_ids
        key = hash(seq.request.cache_salt)
        keys = []
        for start in range(0, seq.num_prompt_tokens - block_size + 1, block_size):
            key = hash((key, *tokens[start : start + block_size]))
            keys.append(key)
        seq.prompt_block_keys = keys
    return keys


class InflightPrefills:
    """Which prompt blocks are being computed: those of the running sequences not committed yet,
    and those of the prompts admitted earlier in the same admission round (whose cached prefix
    kvmanager has not told yet). Rebuilt at every admission round."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.min_shared_blocks = MIN_SHARED_BLOCKS
        self._computing: set[int] = set()
        # Prompt blocks of this round's batch so far, less those known to be cached.
        self._batch: set[int] = set()
        # Prompt blocks this executor committed or hit lately (LRU): prompts of one round that
        # share only these (a cached system prompt) go in together, without a round trip to
        # learn that they hit. kvmanager may have evicted some since: those are computed twice,
        # as they were before this module.
        self._known: OrderedDict[int, None] = OrderedDict()
        self.num_deferred = 0  # admissions put off, for the step trace and tests

    def begin_round(self, running: Iterable[Sequence]) -> None:
        computing = self._computing
        computing.clear()
        self._batch.clear()
        bs = self.block_size
        for seq in running:
            full = seq.num_prompt_tokens // bs
            if seq.num_committed_blocks >= full or seq.request.params.prompt_logprobs is not None:
                continue  # (prompt_logprobs: never commits, nothing can wait for it)
            keys = prompt_block_keys(seq, bs)
            computing.update(keys[seq.num_committed_blocks : full])

    def should_wait(self, seq: Sequence) -> bool:
        """`seq` shares at least min_shared_blocks blocks that a running sequence is computing
        now, or that a prompt admitted before it in this round may compute: admitting it later
        turns them into prefix hits. When it need not wait, its blocks join the round's."""
        if (
            seq.num_tokens != seq.num_prompt_tokens
            or seq.request.params.prompt_logprobs is not None
        ):
            return False  # preempted after sampling: its prompt's blocks are cached
        # (about 40-80 us for a 2k-token prompt, once per admitted sequence)
        keys = prompt_block_keys(seq, self.block_size)
        least = self.min_shared_blocks
        computing, batch, known = self._computing, self._batch, self._known
        if len(keys) >= least:
            shared = sum(1 for k in keys if k in computing or (k in batch and k not in known))
            if shared >= least:
                self.num_deferred += 1
                return True
        batch.update(k for k in keys if k not in known)
        return False

    def known_cached(self, seq: Sequence, start: int, stop: int) -> None:
        """The prompt's blocks [start, stop) are in the prefix cache (committed by this executor,
        or hit at admission). Only the newly committed ones: a decoding sequence commits a block
        every block_size tokens, and its prompt's blocks were marked when they were."""
        keys = seq.prompt_block_keys
        if keys is None or start >= len(keys):
            return  # (None: admitted after a preemption, its prompt's blocks were known then)
        known = self._known
        for k in keys[start:stop]:
            known[k] = None
            known.move_to_end(k)
        while len(known) > KNOWN_CAPACITY:
            known.popitem(last=False)
