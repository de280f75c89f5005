"""Continuous batching over a paged KV pool whose logical side lives in kvmanager.

The scheduler is the only code that changes the queues (waiting, running), the rows (rows.py)
and the sequences' block tables; kvmanager is reached through its AllocatorLink
(allocator_link.py), which hands back the results it must apply.

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
4. An n > 1 request whose prompt ends in this step gets its n - 1 children now (on the rows
   reserved at admission): the step samples n tokens from the parent's logits, and the children
   are forked (`fork`) when it lands.
While kvmanager is unreachable (the link is `riding`: allocator_link.py), each step first tries
`link.reconnect` when a retry is due; until it succeeds, running sequences whose tables cover
the step run, the others wait (not failed), nothing is admitted or forked, and a step with
nothing to run sleeps until the next retry. Sequences kvmanager lost (its restart from Redis
missed their last calls) are requeued and recomputed, like a preemption.
Then the engine launches the step (`launched`: the sequences advance, the link reserves the
coming blocks) and, when it lands, hands the sampled tokens to `postprocess` (tokens, finishes,
releases). Beam search forks its beams through the same `fork`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

from pagemesh.services.executor.allocator_link import AllocatorLink
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine_api import FinishReason, SequenceOutput, TokenLogprob
from pagemesh.services.executor.host_tier import TransferBatch
from pagemesh.services.executor.inflight_prefill import InflightPrefills
from pagemesh.services.executor.rows import Rows
from pagemesh.services.executor.sequence import (
    PLACEHOLDER,
    Fork,
    Request,
    SeqStatus,
    Sequence,
    new_sequence,
)
from pagemesh.services.kvmanager.api import (
    Allocation,
    AllocatorUnavailable,
    BlockAllocator,
    CommitEntry,
    ExtendEntry,
    ExtendResult,
    LoadReport,
    OutOfBlocks,
    StaleEpoch,
    StepResult,
)

# How far past the token budget (at the estimated hit rate) an admission round offers.
OFFER_MARGIN = 1.3


@dataclass(slots=True)
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # got a row this step
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write, run first
    # Host-tier spills and restores (host_tier.py), in kvmanager's order, before the copies.
    transfers: list[TransferBatch] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)  # could never fit: finished with ERROR
    num_preempted: int = 0
    # n > 1 parents whose prompt ends in this step, with their new children (rows taken): the
    # step samples for them too; `Scheduler.fork` runs when it lands.
    forks: list[Fork] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


@dataclass(slots=True)
class StepUpdate:
    """What `postprocess` made of a step's tokens."""

    outputs: list[SequenceOutput]
    releases: list[str]  # sequences that ended: their blocks go back (AllocatorLink.defer)
    finished_requests: list[str]  # every choice of these requests has ended


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        allocator: BlockAllocator,
        max_model_len: int,
        eos_token_ids: Collection[int] = (),
    ) -> None:
        self.config = config
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = set(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # Rows of the device tables; a request with n choices holds n rows from admission on
        # (n - 1 reserved for the children forked after its prefill).
        self.rows = Rows(config.max_num_seqs)
        # n > 1 children holding a row, in no queue until their fork (async scheduling: the
        # step that samples their first token lands one step later).
        self.spawned: set[Sequence] = set()
        # n > 1 requests (not beams) whose children are not made yet: while there are none, a
        # step does not look for prompts that end.
        self._unforked: set[Request] = set()
        self.pending_copies: list[tuple[int, int]] = []
        # Spills and restores of the replies landed so far (one batch per reply, in the order
        # kvmanager answered), for the next step to run before anything else.
        self.pending_transfers: list[TransferBatch] = []
        self._arrival = itertools.count()
        self.link = AllocatorLink(
            allocator, config, max_model_len, self._land_step, self.load_report
        )
        self.num_preemptions = 0
        # Fraction of the prompts found cached in the last admission round: how far past the
        # budget (at no hits) the next round offers the queue.
        self._hit_estimate = 0.0
        # Waiting prompts whose leading blocks a running prefill is computing are admitted once
        # those blocks are committed, to hit them (inflight_prefill.py). Off with prefix caching.
        self.inflight = InflightPrefills(self.block_size) if config.enable_prefix_caching else None

    # -- queues ---------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrival)
        req = seq.request
        if req.params.n > 1 and req.beam is None and not req.forked:
            self._unforked.add(req)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _rows_needed(self, seq: Sequence) -> int:
        # Children of a not-yet-forked request need rows later; reserve them at admission.
        return seq.request.num_rows if not seq.request.forked else 1

    def _short(self, seq: Sequence, n: int) -> bool:
        """Its table cannot take this step's n writes as it stands (too short, or it may hold
        a shared partial block): a synchronous Extend must come first."""
        return seq.needs_extend or len(seq.block_table) * self.block_size < (
            seq.num_computed_tokens + n
        )

    # -- the step -------------------------------------------------------------------------------

    async def schedule(self) -> SchedulerOutput:
        link = self.link
        link.kv_wait = 0.0
        link.land()
        if link.riding:
            lost = await link.reconnect(self.held_tables)
            if lost:
                self._requeue_lost(set(lost))
        # kvmanager unreachable (or the epoch stale, until the engine re-registers): no call.
        cut_off = link.riding or link.stale
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        need: list[tuple[Sequence, int]] = []
        seqs, num_new = out.seqs, out.num_new_tokens
        bs, max_len = self.block_size, self.max_model_len
        # Every running sequence, every step: the checks are inlined (`_short` among them), a
        # method call or a property per sequence costs more than the check itself.
        for seq in self.running:
            if budget == 0:
                break
            tokens = seq.token_ids
            total = len(tokens)
            if tokens[-1] == PLACEHOLDER and (
                total - seq.num_prompt_tokens >= seq.request.params.max_tokens or total >= max_len
            ):
                continue  # its last token is in flight and ends it (async scheduling)
            start = seq.num_computed_tokens
            n = total - start
            if n > budget:
                n = budget
            elif n == 0:
                continue  # a beam parked until its siblings' logits are in (beam_engine.py)
            short = seq.needs_extend or len(seq.block_table) * bs < start + n  # (_short)
            if cut_off and (
                short
                or seq.request.beam is not None  # (beams fork every round)
                or (seq.request in self._unforked and start + n == total)
            ):
                continue  # waits for a block, or for its fork, until kvmanager is back
            seqs.append(seq)
            num_new.append(n)
            budget -= n
            if short:
                need.append((seq, n))
        if need:
            await link.settle()  # the look-ahead in flight may cover them
            need = [(q, n) for q, n in need if self._short(q, n)]
            if need and (link.riding or link.stale):  # found out just now: they wait
                self._unschedule(out, [q for q, _ in need])
                need = []
        if need:
            preempted = await self._extend_or_preempt(need, out)
            out.num_preempted = len(preempted)
            budget = self.config.max_num_batched_tokens - out.num_tokens
        # No admission in a step that had to preempt: the pool is full.
        if not out.num_preempted and not (link.riding or link.stale):
            await self._admit(out, budget)
            if not out.seqs and self.running and self.waiting:
                await self._unstall(out)  # only parked beams run (beam_engine.py)
        # Copy-on-write copies landed so far run first in this step.
        out.copies.extend(self.pending_copies)
        self.pending_copies = []
        if self.pending_transfers and out.seqs:  # (no step, no launch: they wait for one)
            out.transfers, self.pending_transfers = self.pending_transfers, []
        if self._unforked:
            out.forks = self._spawn_children(out)
        if link.riding and not out.seqs:
            await link.wait_retry()  # nothing can run before kvmanager is back
        return out

    def held_tables(self) -> dict[str, list[int]]:
        """Every sequence holding blocks, with its table (what `link.reconnect` reconciles)."""
        return {s.seq_id: list(s.block_table) for s in self.running if s.block_table}

    def _requeue_lost(self, lost: set[str]) -> None:
        """Sequences kvmanager does not hold as this executor did: it holds none of their
        blocks now, so they go back to the queue's front and are recomputed (a preemption
        whose release kvmanager has done already)."""
        for seq in [s for s in self.running if s.seq_id in lost][::-1]:
            self.running.remove(seq)
            self._requeue(seq)

    @staticmethod
    def _unschedule(out: SchedulerOutput, seqs: list[Sequence]) -> None:
        drop = set(seqs)
        keep = [(q, n) for q, n in zip(out.seqs, out.num_new_tokens, strict=True) if q not in drop]
        out.seqs[:] = [q for q, _ in keep]
        out.num_new_tokens[:] = [n for _, n in keep]

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
            result = await self.link.admit(batch, budget)
            for alloc in result.allocations:
                if alloc.spills or alloc.restores:
                    self._transfers(TransferBatch(alloc.spills, alloc.restores))
            if result.spills_ahead:  # (after the allocations' transfers, as kvmanager made them)
                self._transfers(TransferBatch(result.spills_ahead))
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
            self._fail_head(out)
            offer -= 1

    def _fail_head(self, out: SchedulerOutput) -> None:
        """The queue's head can never run: finished with ERROR (the engine reports it)."""
        seq = self.waiting.popleft()
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = FinishReason.ERROR
        self._unforked.discard(seq.request)
        out.failed.append(seq)

    def _admission_candidates(self, budget: int, limit: int) -> list[Sequence]:
        """The queue's head, at most `limit` sequences, as far as rows and budget allow."""
        batch: list[Sequence] = []
        rows_left = self.rows.available
        miss = 1.0 - self._hit_estimate
        if self.config.enable_chunked_prefill:
            # Offer past the estimate: kvmanager stops at the budget itself, and a round that
            # falls short costs a second round trip in the step's schedule (seen: 4-6 ms a
            # step, 45 admitted and then 3-5 more, as the hits per prompt scatter around the
            # estimate). Without chunking an offered prompt must fit whole, so no margin.
            budget = int(budget * OFFER_MARGIN)
        inflight = self.inflight
        if inflight is not None:
            inflight.begin_round(self.running)
        for seq in itertools.islice(self.waiting, limit):
            if budget <= 0:
                break
            if seq.token_ids[-1] == PLACEHOLDER:
                break  # preempted while its last token was in flight: admit once it lands
            if inflight is not None and inflight.should_wait(seq):
                continue  # the sequences behind it go first (FIFO otherwise)
            rows = self._rows_needed(seq)
            if rows_left < rows:
                break
            if not self.config.enable_chunked_prefill and seq.num_tokens > budget:
                break
            batch.append(seq)
            rows_left -= rows
            budget -= max(1, int(seq.num_tokens * miss))
        return batch

    def _admit_one(
        self, seq: Sequence, alloc: Allocation, out: SchedulerOutput, budget: int
    ) -> int:
        """Moves `seq` (the queue's head, or the first not put off behind a prefill in flight)
        to running with its allocation; returns the budget left."""
        if self.waiting[0] is seq:
            self.waiting.popleft()
        else:
            self.waiting.remove(seq)
        rows = self._rows_needed(seq)
        seq.block_table = list(alloc.block_ids)
        seq.num_synced_blocks = 0
        if seq.request.num_cached_tokens < 0:
            seq.request.num_cached_tokens = alloc.num_cached_tokens
        seq.num_computed_tokens = seq.num_cached_tokens = alloc.num_cached_tokens
        seq.num_committed_blocks = alloc.num_cached_tokens // self.block_size
        if self.inflight is not None:
            self.inflight.known_cached(seq, 0, seq.num_committed_blocks)
        seq.status = SeqStatus.RUNNING
        seq.row = self.rows.take()
        self.rows.reserve(rows - 1)
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
                target = self.link.lookahead_target(seq, end + 1) if lookahead else end
                entries.append(ExtendEntry(seq.seq_id, seq.num_computed_tokens, max(target, end)))
            try:
                result = await self.link.extend(entries)
            except (AllocatorUnavailable, StaleEpoch):
                # (noted by the link) they wait for kvmanager, or for the re-registration
                self._unschedule(out, [q for q, _ in need])
                break
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
            if result.spills:
                self._transfers(TransferBatch(result.spills))
            self._apply_updates(result)
            out.copies.extend(result.copies)
            for seq, _ in need:
                seq.needs_extend = False
            break
        return preempted

    async def _unstall(self, out: SchedulerOutput) -> None:
        """Called when a step schedules nothing although sequences run and wait: every running
        sequence is a parked beam (waiting for a preempted sibling) and the queue's head does
        not fit. Preempts the newest other request's beams, queued behind the head's request,
        which must become whole to make progress; if the head's own beams are all that holds
        the pool, they can never be resident together and the head fails (the engine ends its
        whole request)."""
        if any(len(s.token_ids) > s.num_computed_tokens for s in self.running):
            return
        head = self.waiting[0].request
        others = [s for s in self.running if s.request is not head]
        await self.link.settle()
        if not others:
            self._fail_head(out)
            return
        victim = others[-1].request
        for s in [s for s in self.running if s.request is victim][::-1]:
            await self.preempt(s)
        first = [s for s in self.waiting if s.request is head]
        rest = [s for s in self.waiting if s.request is not head]
        self.waiting.clear()
        self.waiting.extend(first + rest)

    async def preempt(self, seq: Sequence) -> None:
        """Recompute later: release every block (the committed ones stay cached) and requeue at
        the front. The token ids and outputs are kept, and with them each seeded draw's position
        (Sequence.draw_position). Only once nothing of the sequence is on its way to kvmanager
        (after `link.settle`)."""
        self.running.remove(seq)
        await self.link.release_now([seq.seq_id])
        self._requeue(seq)

    def _requeue(self, seq: Sequence) -> None:
        """A sequence out of `running` whose blocks are released goes back to the queue's front."""
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
        self.rows.free(seq.row)
        seq.row = -1
        if not seq.request.forked and seq.request.num_rows > 1:
            # The rows reserved for children (or beams) that will never be forked.
            self.rows.unreserve(seq.request.num_rows - 1)

    def _apply_updates(self, result: ExtendResult) -> None:
        if not result.updates:
            return
        by_id = {s.seq_id: s for s in self.running}
        for seq_id, update in result.updates.items():
            seq = by_id.get(seq_id)
            if seq is not None:
                seq.apply_update(update.first_index, list(update.block_ids))

    def _transfers(self, batch: TransferBatch) -> None:
        """A reply's spills and restores: for the next step, and counted (Reconcile)."""
        self.pending_transfers.append(batch)
        self.link.num_transfers += len(batch.spills) + len(batch.restores)

    def _land_step(self, result: StepResult) -> None:
        """A look-ahead Step call's result, from the link (as `_land_extend`): its Extend's,
        then its spills ahead of eviction."""
        if result.extend is not None:
            self._land_extend(result.extend)
        if result.spills_ahead:
            self._transfers(TransferBatch(result.spills_ahead))

    def _land_extend(self, result: ExtendResult) -> None:
        """A look-ahead's result, from the link (at the start of a schedule or while settling:
        never mid-step)."""
        if result.spills:
            self._transfers(TransferBatch(result.spills))
        self._apply_updates(result)
        # Copies come only for a shared block a sequence writes into next; sequences that
        # may hold one (just forked) extend synchronously (needs_extend), before any write,
        # so a look-ahead's copies concern blocks no step has been scheduled into yet.
        self.pending_copies.extend(result.copies)

    async def drain(self) -> None:
        """Nothing left in flight: every Step call sent and its result applied."""
        await self.link.settle()

    # -- forks (n > 1 and beam search) ----------------------------------------------------------

    def _spawn_children(self, out: SchedulerOutput) -> list[Fork]:
        """n > 1: a parent whose prompt ends in this step samples n tokens from its one row of
        logits; its n - 1 children are created here, on the rows reserved at admission."""
        forks = []
        for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
            if seq.request in self._unforked and seq.num_computed_tokens + n == seq.num_tokens:
                forks.append(Fork(seq, self._make_children(seq), seq.num_prompt_tokens))
        return forks

    def _make_children(self, parent: Sequence) -> list[Sequence]:
        req = parent.request
        self.begin_fork(req)
        self._unforked.discard(req)
        children = []
        for index in range(1, req.params.n):
            child = new_sequence(req, index, list(parent.token_ids))
            if parent.matcher is not None:  # structured output: the grammar state forks too
                child.matcher = parent.matcher.fork()
            child.row = self.rows.take()
            child.status = SeqStatus.RUNNING
            child.num_cached_tokens = parent.num_cached_tokens
            child.arrival = parent.arrival
            self.spawned.add(child)
            children.append(child)
        return children

    def begin_fork(self, req: Request) -> None:
        """The rows reserved at admission are the children's (or beams') from now on."""
        req.forked = True
        self.rows.unreserve(req.num_rows - 1)

    def place_child(self, parent: Sequence, child: Sequence) -> bool:
        """A beam's extra candidate: True when it gets a row, to share `parent`'s blocks by a
        `fork` (the parent's KV is resident and a row is free). Otherwise it waits at the front
        of the queue to be recomputed, mostly a prefix hit on the blocks the beams committed."""
        if parent.status == SeqStatus.RUNNING and self.rows.available > 0:
            child.row = self.rows.take()
            child.status = SeqStatus.RUNNING
            self.spawned.add(child)
            return True
        child.status = SeqStatus.WAITING
        self.waiting.appendleft(child)
        return False

    async def fork(
        self, forks: list[Fork], commits: list[CommitEntry], releases: list[str] | None = None
    ) -> None:
        """The children share their parent's blocks covering num_tokens (copy-on-write) and
        run from the next step. A child copies the parent's committed hashes at fork time, so
        the parent's full blocks up to there are committed first (n > 1: the prompt's; a block
        past the fork point holds the parent's own tokens). `commits` (the step's) and
        `releases` (dropped beams) go in the same round (AllocatorLink.fork). Parent and
        children are marked needs_extend: the next step's Extend runs before they write, so the
        first writer into a shared partial block gets a copy."""
        bs = self.block_size
        live: list[tuple[Fork, list[CommitEntry]]] = []
        for f in forks:
            parent = f.parent
            if parent.is_finished:
                continue  # aborted before its fork: the children were finished with it
            full = f.num_tokens // bs
            entries = [
                CommitEntry(parent.seq_id, i, parent.token_ids[i * bs : (i + 1) * bs])
                for i in range(parent.num_committed_blocks, full)
            ]
            if entries:
                parent.num_committed_blocks = full
            live.append((f, entries))
        tables = await self.link.fork(live, commits, releases or [])
        for (f, _), table in zip(live, tables, strict=True):
            parent = f.parent
            parent.needs_extend = True  # its partial last block is shared now
            committed = min(parent.num_committed_blocks, f.num_tokens // bs)
            for child in f.children:
                child.block_table = list(table[child.seq_id])
                child.num_computed_tokens = f.num_tokens
                child.num_cached_tokens = parent.num_cached_tokens
                child.num_committed_blocks = committed
                child.needs_extend = True
                self.spawned.discard(child)
                self.running.append(child)

    # -- a step's progress ----------------------------------------------------------------------

    def launched(
        self, sched: SchedulerOutput, sample_seqs: list[Sequence], lookahead: list[Sequence]
    ) -> None:
        """The step is on the device: its sequences advance, the link reserves what the coming
        steps write (`lookahead`: sampling sequences short of the look-ahead target), and each
        sampling sequence gets a placeholder token until the step lands."""
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
        self.link.issue_lookahead(lookahead)
        for seq in sample_seqs:
            if seq.request.beam is None:  # beams append their own tokens (beam_engine.py)
                seq.token_ids.append(PLACEHOLDER)

    def commit_entries(self, seqs: list[Sequence]) -> list[CommitEntry]:
        """Blocks that became full with their KV written (num_computed_tokens already advanced),
        of the sequences not finished meanwhile (async scheduling: the step before landed)."""
        bs = self.block_size
        entries = []
        done = SeqStatus.FINISHED
        for seq in seqs:
            full = seq.num_computed_tokens // bs
            if full <= seq.num_committed_blocks:
                continue  # no block filled: most sequences, most steps (checked first)
            if seq.status is done:
                continue
            if seq.request.params.prompt_logprobs is not None:
                continue  # never published: nothing may hit it (engine.add_request)
            for i in range(seq.num_committed_blocks, full):
                entries.append(CommitEntry(seq.seq_id, i, seq.token_ids[i * bs : (i + 1) * bs]))
            if self.inflight is not None:
                self.inflight.known_cached(seq, seq.num_committed_blocks, full)
            seq.num_committed_blocks = full
        return entries

    def add_prompt_logprobs(self, chunks: list[tuple[Sequence, int, list[TokenLogprob]]]) -> None:
        """A landed step's scored prompt positions (prompt_logprobs.py), kept until the first
        output. By position: a chunk computed again after a preemption replaces its entries."""
        for seq, start, entries in chunks:
            if not seq.prompt_logprobs_done:
                seq.prompt_logprobs[start : start + len(entries)] = entries

    def postprocess(
        self,
        seqs: list[Sequence],
        positions: list[int],
        token_ids: list[int],
        logprobs: list[float] | None,
        top_ids: list[list[int]] | None,
        top_logprobs: list[list[float]] | None,
        refused: set[int] | None = None,
    ) -> StepUpdate:
        """A landed step's sampled tokens (beams aside: beam_engine.py): each takes its
        placeholder's place (`positions`) and makes one output; a sequence that ends (EOS, a
        stop id, max_tokens, the context) is finished, its blocks to be released. `refused`:
        the indices whose token their grammar did not accept (GrammarBatch.accept, which has
        advanced the other constrained sequences' matchers)."""
        refused = refused or set()
        outputs: list[SequenceOutput] = []
        releases: list[str] = []
        finished: list[str] = []
        eos = self.eos_token_ids
        max_len = self.max_model_len
        # The loop runs for every sampled sequence of every step: what is the same for the
        # whole step is looked up once, and the rare cases (logprobs, prompt logprobs, a
        # refused token, a stop) are tested with one check each.
        done, not_done = SeqStatus.FINISHED, FinishReason.NONE
        for i, (seq, token, pos) in enumerate(zip(seqs, token_ids, positions, strict=True)):
            req = seq.request
            if req.beam is not None:
                continue  # beams: beam_engine.py
            if seq.status is done:
                continue  # aborted, or finished by an earlier token while this one computed
            tokens = seq.token_ids
            tokens[pos] = token
            if refused and i in refused:
                # The step's mask allowed only what the matcher accepts, so this is a bug, not
                # bad input: the choice ends here rather than leave its grammar.
                outputs.extend(req.error_outputs([seq.index], "left the output grammar"))
                if seq.status == SeqStatus.RUNNING:
                    releases.append(seq.seq_id)
                self.finish(seq, FinishReason.ERROR)
                if all(q.is_finished for q in req.seqs):
                    finished.append(req.request_id)
                continue
            p = req.params
            lps: list[TokenLogprob] = []
            if logprobs is not None and (p.return_logprobs or p.logprobs):
                lp = logprobs[i]
                seq.cumulative_logprob += lp
                top = []
                if p.logprobs and top_ids is not None and top_logprobs is not None:
                    k = p.logprobs
                    top = list(zip(top_ids[i][:k], top_logprobs[i][:k], strict=True))
                lps.append(TokenLogprob(token, lp, top))
            prompt_lps: list[TokenLogprob] = []
            if seq.prompt_logprobs and not seq.prompt_logprobs_done:
                prompt_lps, seq.prompt_logprobs = seq.prompt_logprobs, []
                seq.prompt_logprobs_done = True
            reason = not_done
            if (token in eos and not p.ignore_eos) or (
                p.stop_token_ids and token in p.stop_token_ids
            ):
                reason = FinishReason.STOP
            elif pos + 1 - seq.num_prompt_tokens >= p.max_tokens or pos + 1 >= max_len:
                reason = FinishReason.LENGTH
            outputs.append(
                SequenceOutput(
                    req.request_id,
                    seq.index,
                    [token],
                    reason,
                    lps,
                    req.num_prompt_tokens,
                    req.num_cached_tokens if req.num_cached_tokens > 0 else 0,
                    "",
                    seq.cumulative_logprob,
                    prompt_lps,
                )
            )
            if reason is not not_done:
                del tokens[pos + 1 :]  # a placeholder of a step that ran past the end
                if seq.status == SeqStatus.RUNNING:  # (a preempted one holds no blocks)
                    releases.append(seq.seq_id)
                self.finish(seq, reason)
                if all(q.is_finished for q in req.seqs):
                    finished.append(req.request_id)
        return StepUpdate(outputs, releases, finished)

    def abort(self, seq: Sequence, releases: list[str]) -> bool:
        """Finishes `seq` as aborted, its blocks to be released with `releases`; False if it had
        finished already."""
        if seq.is_finished:
            return False
        if seq.status == SeqStatus.RUNNING and seq.block_table:
            releases.append(seq.seq_id)
        self.finish(seq, FinishReason.ABORT)
        return True

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Out of its queue and its row (the caller releases its blocks, if it holds any)."""
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        if seq.row >= 0:
            if not seq.block_table:
                # A child made for a fork that has not happened yet (async scheduling): it
                # holds a row but is in no queue.
                self.rows.free(seq.row)
                seq.row = -1
                self.spawned.discard(seq)
            else:
                self.running.remove(seq)
                self._free_row(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.request.forked:
            self._unforked.discard(seq.request)

    # -- state ----------------------------------------------------------------------------------

    def load_report(self) -> LoadReport:
        """What kvmanager's router weighs (sent with every Step call): the batch, the queue and
        the prompt tokens the queue still has to prefill (its cached prefix unknown until
        admission: all of it counts)."""
        return LoadReport(
            running=len(self.running),
            waiting=len(self.waiting),
            queued_prompt_tokens=sum(seq.num_tokens for seq in self.waiting),
        )

    def kv_occupancy(self) -> tuple[int, int, int]:
        """(tokens, distinct blocks, table blocks) of the running sequences: memory utilization
        is tokens held for live requests over the slots of the blocks they hold; distinct blocks
        show what sharing saves on top."""
        bs = self.block_size
        tokens = 0
        table_blocks = 0
        blocks: set[int] = set()
        for seq in list(self.running):
            # A token just sampled has no slot until its block is reserved: count what the
            # table can hold.
            tokens += min(len(seq.token_ids), len(seq.block_table) * bs)
            table_blocks += len(seq.block_table)
            blocks.update(seq.block_table)
        return tokens, len(blocks), table_blocks

    def check(self) -> None:
        """Asserts the scheduler's invariants (tests; between steps). Raises AssertionError."""
        bs = self.block_size
        running, waiting, spawned = self.running, list(self.waiting), self.spawned
        ids = [id(s) for s in running] + [id(s) for s in waiting] + [id(s) for s in spawned]
        assert len(ids) == len(set(ids)), "a sequence is in two places (running/waiting/spawned)"
        seq_ids = [s.seq_id for s in running] + [s.seq_id for s in waiting]
        seq_ids += [s.seq_id for s in spawned]
        assert len(seq_ids) == len(set(seq_ids)), "two live sequences share a seq_id"
        # Rows: every row is free or held by exactly one running or spawned sequence.
        held = [s.row for s in running] + [s.row for s in spawned]
        free = self.rows.free_rows()
        assert all(r >= 0 for r in held), "a running or spawned sequence has no row"
        assert sorted(held + free) == list(range(self.rows.num_rows)), "rows lost or shared"
        # Reserved rows are free rows set aside for the children of admitted, unforked requests.
        reserved = sum(
            s.request.num_rows - 1 for s in running if not s.request.forked and s.row >= 0
        )
        assert self.rows.num_reserved == reserved, (self.rows.num_reserved, reserved)
        assert 0 <= self.rows.num_reserved <= len(free), "more rows reserved than free"
        for s in running:
            assert s.status == SeqStatus.RUNNING, f"{s.seq_id} runs with status {s.status}"
            assert s.block_table, f"running {s.seq_id} holds no block"
            assert s.num_computed_tokens <= s.num_tokens, s.seq_id
            assert len(s.block_table) * bs >= s.num_computed_tokens, (
                f"{s.seq_id}: table covers {len(s.block_table) * bs} < {s.num_computed_tokens}"
            )
            assert s.num_committed_blocks * bs <= s.num_computed_tokens, s.seq_id
            assert s.num_synced_blocks <= len(s.block_table), s.seq_id
        for s in waiting:
            assert s.status == SeqStatus.WAITING, f"{s.seq_id} waits with status {s.status}"
            assert s.row == -1 and not s.block_table, f"waiting {s.seq_id} holds a row or blocks"
            assert s.num_computed_tokens == 0 and s.num_committed_blocks == 0, s.seq_id
            assert not s.needs_extend, s.seq_id
        for s in spawned:
            assert s.status == SeqStatus.RUNNING and not s.block_table, s.seq_id
            assert s.request.forked, s.seq_id
        for r in self._unforked:
            assert not r.forked and r.beam is None and r.params.n > 1, r.request_id
