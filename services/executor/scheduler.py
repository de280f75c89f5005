"""Continuous batching over a paged KV pool whose logical side lives in a BlockAllocator.

Each step:
1. Running sequences first (decodes and unfinished prefill chunks), in admission order, under a
   per-step token budget (max_num_batched_tokens); a prefill longer than what is left of the
   budget is chunked.
2. A running sequence whose table does not cover this step's writes (its look-ahead reservation
   failed, or it was just forked and may hold a shared partial block) goes into one synchronous
   batched Extend. If the pool is out of blocks, the newest running sequence is preempted (blocks
   released, requeued at the front of the queue, recomputed later: its committed blocks stay
   cached in kvmanager, so the recompute is mostly a prefix hit) until the Extend fits.
3. Waiting sequences are admitted while the budget, max_num_seqs and the pool allow: one Step
   call a round allocates them (kvmanager reports each one's cached prefix and stops when their
   uncached tokens fill the budget); only the uncached suffix is computed.
Then, while the step computes, `issue_lookahead` decides whether this step sends kvmanager one
`Step` call: the blocks earlier steps filled (commits), the sequences that ended (releases) and
the blocks coming steps will write into (a batched Extend). Each gRPC message costs the thread
that drives the GPU a few hundred microseconds, so the call goes out only when a sequence's table
is about to run short (URGENT_TOKENS), and then reserves for every sequence within the look-ahead
window: a call every ~(num_lookahead_tokens - URGENT_TOKENS) steps at most, whatever the batch
size. Commits and releases ride along (or go after FLUSH_STEPS steps, or before anything that
must see them: an admission, a synchronous Extend, idling). Calls are chained (a sequence's
commits land before its release; a later call never overtakes an earlier one), and their results
are applied only at the start of `schedule` or in `_settle`, never mid-step: a table changes only
where no one is reading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from pagemesh.services.executor.beam_engine import unstall
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine_api import FinishReason
from pagemesh.services.executor.sequence import PLACEHOLDER, SeqStatus, Sequence
from pagemesh.services.kvmanager.api import (
    AdmitEntry,
    Allocation,
    AllocatorError,
    AllocatorUnavailable,
    BlockAllocator,
    CommitEntry,
    ExtendEntry,
    ExtendResult,
    OutOfBlocks,
    StepResult,
    UnknownSequence,
)

log = logging.getLogger(__name__)

# How far past the token budget (at the estimated hit rate) an admission round offers.
OFFER_MARGIN = 1.3


# A look-ahead Extend goes out once a sequence's table covers fewer than this many tokens beyond
# its next write: the reply then has a step or two to come back before any step needs it.
URGENT_TOKENS = 2
# Commits and releases wait at most this many steps for a call to ride on.
FLUSH_STEPS = 8


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # got a row this step
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, run first
    failed: list[Sequence] = field(default_factory=list)  # could never fit: finished with ERROR
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: BlockAllocator, max_model_len: int) -> None:
        self.config = config
        self.allocator = allocator
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Rows of the engine's persistent device tables; a request with n choices holds n rows
        # from admission on (n - 1 reserved for the children forked after its prefill).
        self.free_rows: list[int] = list(range(config.max_num_seqs - 1, -1, -1))
        self.reserved_rows = 0
        self.pending_copies: list[tuple[int, int]] = []
        self._arrival = itertools.count()
        # kvmanager traffic: what the next Step call carries, and the calls in flight (oldest
        # first), each with the sequences whose look-ahead it carries.
        self._commits: list[CommitEntry] = []
        self._releases: list[str] = []
        self._calls: deque[tuple[asyncio.Task, list[Sequence]]] = deque()
        self._steps_since_call = 0
        self._retry: asyncio.TimerHandle | None = None
        self.num_preemptions = 0
        self.num_step_calls = 0
        # Fraction of the prompts found cached in the last admission round: how far past the
        # budget (at no hits) the next round offers the queue.
        self._hit_estimate = 0.0
        # Seconds the current step's schedule() spent awaiting kvmanager (the step trace's
        # kv_wait: what of a slow schedule is the allocator's round trips).
        self.kv_wait = 0.0

    # -- queues ---------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrival)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def take_row(self) -> int:
        return self.free_rows.pop()

    def _rows_needed(self, seq: Sequence) -> int:
        # Children of a not-yet-forked request need rows later; reserve them at admission.
        return seq.request.num_rows if not seq.request.forked else 1

    def _covered(self, seq: Sequence) -> int:
        return len(seq.block_table) * self.block_size

    def _short(self, seq: Sequence, n: int) -> bool:
        """Its table cannot take this step's n writes as it stands (too short, or it may hold
        a shared partial block): a synchronous Extend must come first."""
        return seq.needs_extend or self._covered(seq) < seq.num_computed_tokens + n

    def _lookahead_target(self, seq: Sequence, num_tokens: int) -> int:
        return min(num_tokens + self.config.num_lookahead_tokens, self.max_model_len)

    # -- the step -------------------------------------------------------------------------------

    async def schedule(self) -> SchedulerOutput:
        self.kv_wait = 0.0
        self._land_calls()
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        need: list[tuple[Sequence, int]] = []
        seqs, num_new = out.seqs, out.num_new_tokens
        for seq in self.running:
            if budget == 0:
                break
            tokens = seq.token_ids
            if tokens[-1] == PLACEHOLDER and (
                len(tokens) - seq.num_prompt_tokens >= seq.request.params.max_tokens
                or len(tokens) >= self.max_model_len
            ):
                continue  # its last token is in flight and ends it (async scheduling)
            start = seq.num_computed_tokens
            n = min(len(tokens) - start, budget)
            if n == 0:
                continue  # a beam parked until its siblings' logits are in (beam_engine.py)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
            if self._short(seq, n):
                need.append((seq, n))
        if need:
            await self._settle()  # the look-ahead in flight may cover them
            need = [(q, n) for q, n in need if self._short(q, n)]
        if need:
            preempted = await self._extend_or_preempt(need, out)
            out.num_preempted = len(preempted)
            budget = self.config.max_num_batched_tokens - out.num_tokens
        # No admission in a step that had to preempt: the pool is full.
        if not out.num_preempted:
            await self._admit(out, budget)
            if not out.seqs and self.running and self.waiting:
                await unstall(self, out)  # only parked beams run (beam_engine.py)
        # Copy-on-write copies landed so far run first in this step.
        out.copies.extend(self.pending_copies)
        self.pending_copies = []
        return out

    async def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Admits waiting sequences in FIFO order while rows and the token budget last. A round
        is one kvmanager call (with the commits and releases waiting): kvmanager allocates the
        offered sequences in order while their uncached tokens fit the budget, so a burst of
        arrivals costs a message, not one per request. A round offers the queue's head up to
        what the budget takes at the prefix-hit rate of recent admissions; when hits fall short
        of that the budget stops kvmanager, and when they exceed it the next round goes on.

        Only sequences that were waiting when the step's admission began are offered: one that
        arrives during a round (the loop is free while kvmanager answers) waits for the next
        step. Otherwise a burst arriving over tens of milliseconds kept the step in admission
        rounds, the device idle, until the budget filled (seen: 40 ms, 49 sequences)."""
        offer = len(self.waiting)
        while offer and budget > 0:
            batch = self._admission_candidates(budget, offer)
            if not batch:
                return
            result = await self._admission_call(batch, budget)
            tokens = cached = 0
            for seq, alloc in zip(batch, result.allocations, strict=False):
                budget = self._admit_one(seq, alloc, out, budget)
                tokens += seq.num_tokens
                cached += alloc.num_cached_tokens
            offer -= len(result.allocations)
            if tokens:  # the next round (and step) expects what this one saw
                self._hit_estimate = min(0.9, cached / tokens)
            err = result.allocate_error
            if err is None:
                if len(result.allocations) < len(batch):
                    return  # the budget is spent
                continue
            if not isinstance(err, OutOfBlocks):
                raise err
            if self.running or out.seqs:
                return  # blocks come back as running sequences finish
            # Nothing runs and even an empty pool (cached blocks are evictable) cannot hold the
            # queue's head: it can never run.
            seq = self.waiting.popleft()
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = FinishReason.ERROR
            out.failed.append(seq)
            offer -= 1

    def _admission_candidates(self, budget: int, limit: int) -> list[Sequence]:
        """The queue's head, at most `limit` sequences, as far as rows and budget allow."""
        batch: list[Sequence] = []
        rows_left = len(self.free_rows) - self.reserved_rows
        miss = 1.0 - self._hit_estimate
        if self.config.enable_chunked_prefill:
            # Offer past the estimate: kvmanager stops at the budget itself, and a round that
            # falls short costs a second round trip in the step's schedule (seen: 4-6 ms a
            # step, 45 admitted and then 3-5 more, as the hits per prompt scatter around the
            # estimate). Without chunking an offered prompt must fit whole, so no margin.
            budget = int(budget * OFFER_MARGIN)
        for seq in itertools.islice(self.waiting, limit):
            if budget <= 0:
                break
            if seq.token_ids[-1] == PLACEHOLDER:
                break  # preempted while its last token was in flight: admit once it lands
            rows = self._rows_needed(seq)
            if rows_left < rows:
                break
            if not self.config.enable_chunked_prefill and seq.num_tokens > budget:
                break
            batch.append(seq)
            rows_left -= rows
            budget -= max(1, int(seq.num_tokens * miss))
        return batch

    async def _admission_call(self, batch: list[Sequence], budget: int) -> StepResult:
        """One call: the commits and releases waiting, then the admissions; every call in
        flight lands first (its releases may be what makes room; its tables must be current)."""
        commits, releases = self._begin_call()
        await self._settle()  # (nothing left for it to send)
        admits = [
            AdmitEntry(
                seq.seq_id,
                seq.packed_prompt or seq.token_ids,  # packed: what kvmanager hashes
                seq.request.cache_salt,
                self._lookahead_target(seq, seq.num_tokens + 1) - seq.num_tokens,
            )
            for seq in batch
        ]
        try:
            with self._awaiting_kvmanager():
                result = await self.allocator.step(commits, releases, [], admits, budget)
        except AllocatorError:
            self._defer_releases(releases)
            raise
        await self._check_parts(result, releases)
        return result

    def _admit_one(
        self, seq: Sequence, alloc: Allocation, out: SchedulerOutput, budget: int
    ) -> int:
        """Moves the head of the queue to running with its allocation; returns the budget left."""
        assert self.waiting[0] is seq
        self.waiting.popleft()
        rows = self._rows_needed(seq)
        seq.block_table = list(alloc.block_ids)
        seq.num_synced_blocks = 0
        if seq.request.num_cached_tokens < 0:
            seq.request.num_cached_tokens = alloc.num_cached_tokens
        seq.num_computed_tokens = seq.num_cached_tokens = alloc.num_cached_tokens
        seq.num_committed_blocks = alloc.num_cached_tokens // self.block_size
        seq.status = SeqStatus.RUNNING
        seq.row = self.free_rows.pop()
        self.reserved_rows += rows - 1
        self.running.append(seq)
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        out.seqs.append(seq)
        out.num_new_tokens.append(n)
        out.admitted.append(seq)
        return budget - n

    async def _extend_or_preempt(
        self, need: list[tuple[Sequence, int]], out: SchedulerOutput
    ) -> set[Sequence]:
        """One batched Extend for the sequences whose tables fall short; preempts the newest
        running sequences until it fits. Returns the preempted ones (already out of `out`)."""
        preempted: set[Sequence] = set()
        lookahead = True
        while need:
            entries = []
            for seq, n in need:
                end = seq.num_computed_tokens + n
                target = self._lookahead_target(seq, end + 1) if lookahead else end
                entries.append(ExtendEntry(seq.seq_id, seq.num_computed_tokens, max(target, end)))
            try:
                with self._awaiting_kvmanager():
                    result = await self.allocator.extend(entries)
            except OutOfBlocks:
                if lookahead and self.config.num_lookahead_tokens:
                    lookahead = False  # first ask only for what this step writes
                    continue
                victim = self.running[-1]
                await self.preempt(victim)
                preempted.add(victim)
                if victim in out.seqs:
                    i = out.seqs.index(victim)
                    del out.seqs[i], out.num_new_tokens[i]
                need = [(s, n) for s, n in need if s is not victim]
                continue
            self._apply(result)
            out.copies.extend(result.copies)
            for seq, _ in need:
                seq.needs_extend = False
            break
        return preempted

    async def preempt(self, seq: Sequence) -> None:
        """Recompute later: release every block (the committed ones stay cached) and requeue at
        the front. The token ids, outputs and generator state are kept."""
        self.running.remove(seq)
        await self.allocator.release([seq.seq_id])
        self._free_row(seq)
        seq.status = SeqStatus.WAITING
        seq.block_table = []
        seq.num_synced_blocks = 0
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0
        seq.needs_extend = False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _free_row(self, seq: Sequence) -> None:
        self.free_rows.append(seq.row)
        seq.row = -1
        if not seq.request.forked and seq.request.num_rows > 1:
            # The rows reserved for children (or beams) that will never be forked.
            self.reserved_rows -= seq.request.num_rows - 1

    def _apply(self, result: ExtendResult) -> None:
        if not result.updates:
            return
        by_id = {s.seq_id: s for s in self.running}
        for seq_id, update in result.updates.items():
            seq = by_id.get(seq_id)
            if seq is not None:
                seq.apply_update(update.first_index, list(update.block_ids))

    # -- kvmanager traffic (overlapped with the steps) -----------------------------------------

    def issue_lookahead(self, seqs: list[Sequence]) -> None:
        """After a step is launched: sends one Step call if a table of `seqs` (this step's
        sampling sequences; num_computed_tokens already counts this step) is about to run short,
        reserving for every one of them within the look-ahead window, or if commits and releases
        have waited FLUSH_STEPS steps. Its result is applied by a later `schedule`."""
        entries: list[tuple[Sequence, ExtendEntry]] = []
        urgent = False
        for seq in seqs:
            end = seq.num_computed_tokens  # the next step writes the sampled token here
            if len(seq.token_ids) - seq.num_prompt_tokens + 1 >= seq.request.params.max_tokens:
                continue  # finishes this step
            if end + 1 >= self.max_model_len:
                continue
            target = self._lookahead_target(seq, end + 1)
            covered = max(self._covered(seq), seq.lookahead_sent)
            if covered < target:
                entries.append((seq, ExtendEntry(seq.seq_id, end, target)))
                urgent = urgent or covered < min(end + 1 + URGENT_TOKENS, target)
        self._steps_since_call += 1
        if urgent or (self._steps_since_call >= FLUSH_STEPS and (self._commits or self._releases)):
            self._send(entries if urgent else [])

    def defer(self, commits: list[CommitEntry], releases: list[str]) -> None:
        """Commits and releases for the next Step call (a sequence's commits before its
        release: they go in one call, commits first, or in calls sent in order)."""
        self._commits.extend(commits)
        self._releases.extend(releases)

    def _begin_call(self) -> tuple[list[CommitEntry], list[str]]:
        """A Step call goes out: it takes the commits and releases waiting."""
        commits, self._commits = self._commits, []
        releases, self._releases = self._releases, []
        self._steps_since_call = 0
        self.num_step_calls += 1
        return commits, releases

    def _send(self, entries: list[tuple[Sequence, ExtendEntry]]) -> None:
        if not (self._commits or self._releases or entries):
            return
        commits, releases = self._begin_call()
        for seq, e in entries:
            seq.lookahead_sent = e.num_tokens
        prev = self._calls[-1][0] if self._calls else None
        call = self._call(prev, commits, releases, [e for _, e in entries])
        self._calls.append((asyncio.create_task(call), [seq for seq, _ in entries]))

    async def _call(
        self,
        prev: asyncio.Task | None,
        commits: list[CommitEntry],
        releases: list[str],
        extends: list[ExtendEntry],
    ) -> StepResult | None:
        if prev is not None:
            await asyncio.wait([prev])  # in order, whatever became of it
        try:
            result = await self.allocator.step(commits, releases, extends)
        except AllocatorUnavailable:
            self._defer_releases(releases)
            return None  # the commits are lost (those blocks stay unshared); extends retried
        except AllocatorError:
            log.exception("Step call failed")
            self._defer_releases(releases)
            return None
        await self._check_parts(result, releases)
        if result.extend_error is not None and not isinstance(result.extend_error, OutOfBlocks):
            log.error("look-ahead Extend failed: %s", result.extend_error)
        return result  # OutOfBlocks: the next schedule() extends synchronously, or preempts

    async def _check_parts(self, result: StepResult, releases: list[str]) -> None:
        if result.commit_error is not None:  # those blocks stay unshared
            log.error("commit failed: %s", result.commit_error)
        err = result.release_error
        if isinstance(err, AllocatorUnavailable):
            self._defer_releases(releases)
        elif isinstance(err, UnknownSequence):
            # One unknown id fails the whole part: settle the rest one by one.
            for sid in releases:
                await self._release([sid])
        elif err is not None:
            log.error("release failed: %s", err)

    def _defer_releases(self, releases: list[str]) -> None:
        """A release kvmanager could not take is retried until it does: dropping it would leak
        the sequence's blocks for good once kvmanager restores its tables from Redis."""
        if not releases:
            return
        self._releases[:0] = releases
        log.warning("kvmanager unreachable: %d releases deferred", len(self._releases))
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(0.5, self._retry_releases)

    def _retry_releases(self) -> None:
        self._retry = None
        self._send([])

    def _land_calls(self) -> None:
        """Applies the results of the calls that are done, oldest first (never past one that
        is not: results apply in the order sent)."""
        while self._calls and self._calls[0][0].done():
            task, seqs = self._calls.popleft()
            self._apply_call(task.result(), seqs)

    def _apply_call(self, result: StepResult | None, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.lookahead_sent = 0  # covered now, or to be asked again
        if result is not None and result.extend is not None:
            self._apply(result.extend)
            # Copies come only for a shared block a sequence writes into next; sequences that
            # may hold one (just forked) extend synchronously (needs_extend), before any write,
            # so a look-ahead's copies concern blocks no step has been scheduled into yet.
            self.pending_copies.extend(result.extend.copies)

    async def _release(self, seq_ids: list[str]) -> None:
        try:
            await self.allocator.release(seq_ids)
        except AllocatorUnavailable:
            self._defer_releases(seq_ids)
        except UnknownSequence:
            if len(seq_ids) == 1:
                return  # kvmanager lost it (crash before its write-behind flush): nothing held
            for sid in seq_ids:
                await self._release([sid])
        except AllocatorError:
            log.exception("release failed")

    async def _settle(self) -> None:
        """Sends what waits and applies every call's result: before anything that must see
        them (an admission may hit the blocks just committed, or need the blocks just released;
        a synchronous Extend must start from the tables kvmanager has)."""
        self._send([])
        with self._awaiting_kvmanager():
            while self._calls:
                task, seqs = self._calls.popleft()
                self._apply_call(await task, seqs)

    @contextlib.contextmanager
    def _awaiting_kvmanager(self) -> Iterator[None]:
        """Adds the block's time to kv_wait."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.kv_wait += time.perf_counter() - start

    async def drain(self) -> None:
        await self._settle()

    def commit_entries(self, seqs: list[Sequence]) -> list[CommitEntry]:
        """Blocks that became full with their KV written (num_computed_tokens already advanced)."""
        bs = self.block_size
        entries = []
        for seq in seqs:
            full = seq.num_computed_tokens // bs
            if full > seq.num_committed_blocks:
                for i in range(seq.num_committed_blocks, full):
                    entries.append(CommitEntry(seq.seq_id, i, seq.token_ids[i * bs : (i + 1) * bs]))
                seq.num_committed_blocks = full
        return entries

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq.row >= 0:
            self.running.remove(seq)
            self._free_row(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
