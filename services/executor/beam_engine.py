"""Beam search inside LLMEngine: beams are Sequences of one Request that share KV blocks through
the allocator, decoded in the same continuous batch as every other request.

A beam request starts as one sequence (the prompt), admitted with `width` rows (Request.num_rows,
like n > 1). Each round, every running beam computes its next-token logits in the engine's step
(the executor thread takes the top-K log-softmax of those rows, `candidates`); when all the
request's beams have reported, `BeamSearch.round` (beam_search.py) picks the next beams, and:

- a beam no candidate continues is finished and released (its blocks' ref counts drop);
- the first candidate of a beam continues in that beam's own sequence (a token appended, no
  allocator call);
- every further candidate of the same beam is a new sequence forked from it (`allocator.fork` at
  the beam's written length: the children take references on all its blocks). Parent and
  children are marked `needs_extend`, so the next step's batched Extend runs before they write:
  the first writer into a shared partial block gets a copy-on-write copy, full blocks stay
  shared for good.

A beam that reports before its siblings (the token budget split the request across steps, or a
sibling was preempted) is parked: it has no token to compute until the round is decided, and
the scheduler skips sequences with nothing to compute. A preempted beam is recomputed from its
token ids (mostly a prefix hit) and reports again; its children, if any, start as waiting
sequences the same way.

Outputs: one empty output after the prompt's round (the request is accepted, a stream can
start; prompt and cached token counts), then, when the search ends, the `n` best hypotheses as
one final output each (index = rank, token_ids = the whole beam); every beam left is released.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from pagemesh.services.executor.beam_search import BeamSearch, NextBeam
from pagemesh.services.executor.engine_api import FinishReason, SequenceOutput
from pagemesh.services.executor.sequence import Request, SeqStatus, Sequence
from pagemesh.services.kvmanager.api import CommitEntry

if TYPE_CHECKING:
    from pagemesh.services.executor.engine import LLMEngine
    from pagemesh.services.executor.scheduler import Scheduler, SchedulerOutput


@dataclass(slots=True)
class BeamState:
    search: BeamSearch
    beams: list[Sequence]  # running beams, in the order of the search's parent indices
    # This round's candidates so far: beam -> (top logprobs [K], token ids [K]).
    reports: dict[Sequence, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    next_id: int = 1  # for the seq ids of forked beams


@dataclass(slots=True)
class BeamBatch:
    """The beam rows of a step's sampled logits."""

    index: torch.Tensor  # [m] rows of the sampled logits
    seqs: list[Sequence]  # [m]
    k: int  # candidates kept per row


@dataclass(slots=True)
class BeamCandidates:
    logprobs: torch.Tensor  # [m, k] float32, best first (on the device until postprocess)
    token_ids: torch.Tensor  # [m, k] int64


def candidates(logits: torch.Tensor, batch: BeamBatch, vocab_size: int) -> BeamCandidates:
    """With the step's device work: each beam row's best k next tokens by log-softmax (float32,
    like HF). The best K of all beams of a request are among the rows' own best K. Nothing
    here waits for the device."""
    rows = logits.index_select(0, batch.index)[:, :vocab_size].float()
    values, ids = torch.log_softmax(rows, dim=-1).topk(batch.k, dim=-1)
    return BeamCandidates(values, ids)


@dataclass(slots=True)
class _Transition:
    req: Request
    plan: list[NextBeam]
    dropped: list[Sequence]


class BeamSearchRunner:
    """The engine's beam-search hooks (engine.py calls these; see the module docstring)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.active: set[str] = set()  # beam request ids: empty = no per-step beam work at all

    def add(self, req: Request) -> None:
        e = self.engine
        p = req.params
        stop = frozenset(p.stop_token_ids)
        if not p.ignore_eos:
            stop |= frozenset(e.eos_token_ids)
        max_new = min(p.max_tokens, e.max_model_len - req.num_prompt_tokens)
        search = BeamSearch(p.beam_width, p.n, p.length_penalty, p.early_stopping, stop, max_new)
        req.beam = BeamState(search, list(req.seqs))
        self.active.add(req.request_id)

    def batch(self, sample_seqs: list[Sequence]) -> BeamBatch | None:
        if not self.active:
            return None
        idx = [i for i, s in enumerate(sample_seqs) if s.request.beam is not None]
        if not idx:
            self.active &= self.engine.requests.keys()  # forget aborted ones
            return None
        seqs = [sample_seqs[i] for i in idx]
        k = max(s.request.beam.search.num_candidates for s in seqs)  # type: ignore[union-attr]
        k = min(k, self.engine.vocab_size)
        index = torch.tensor(idx, dtype=torch.int64, device=self.engine.device)
        return BeamBatch(index, seqs, k)

    async def postprocess(
        self,
        batch: BeamBatch,
        cands: BeamCandidates,
        commits: list[CommitEntry],
        releases: list[str],
    ) -> tuple[list[SequenceOutput], list[CommitEntry]]:
        """Records the beams' candidates; decides every round that is complete. Returns the
        outputs of finished searches and the commits still to send (forks need them first)."""
        ready: list[Request] = []
        logprobs = cands.logprobs.cpu().numpy()  # the step is done: no wait
        token_ids = cands.token_ids.cpu().numpy()
        for i, seq in enumerate(batch.seqs):
            st = seq.request.beam
            assert st is not None
            k = st.search.num_candidates  # the batch's k is the largest of its requests'
            st.reports[seq] = (logprobs[i, :k], token_ids[i, :k])
            if seq.request not in ready and all(b in st.reports for b in st.beams):
                ready.append(seq.request)
        if not ready:
            return [], commits

        outputs: list[SequenceOutput] = []
        moves: list[_Transition] = []
        for req in ready:
            st = req.beam
            assert st is not None
            reports = [st.reports[b] for b in st.beams]
            plan = st.search.round(
                [b.cumulative_logprob for b in st.beams],
                np.stack([r[0] for r in reports]),
                np.stack([r[1] for r in reports]),
                [b.token_ids[b.num_prompt_tokens :] for b in st.beams],
            )
            st.reports = {}
            if not req.forked:
                # The prompt is in: one empty output, so the caller learns that the request was
                # accepted (a stream can start) and how much of the prompt was cached.
                outputs.append(
                    SequenceOutput(
                        req.request_id,
                        0,
                        [],
                        num_prompt_tokens=req.num_prompt_tokens,
                        num_cached_tokens=max(req.num_cached_tokens, 0),
                    )
                )
            if plan is None:
                outputs.extend(self._finish(req, releases))
            else:
                used = {nb.parent for nb in plan}
                dropped = [b for i, b in enumerate(st.beams) if i not in used]
                moves.append(_Transition(req, plan, dropped))
        if moves:
            commits = await self._apply(moves, commits)
        return outputs, commits

    async def _apply(
        self, moves: list[_Transition], commits: list[CommitEntry]
    ) -> list[CommitEntry]:
        e = self.engine
        sc = e.scheduler
        alloc = e.allocator
        # Dropped beams go first, so their blocks are free before anyone copies on write.
        dropped_ids = []
        for mv in moves:
            for b in mv.dropped:
                if b.status == SeqStatus.RUNNING:
                    dropped_ids.append(b.seq_id)
                sc.finish(b, FinishReason.STOP)
                mv.req.seqs.remove(b)
            if not mv.req.forked:
                # The rows reserved at admission are the beams' from now on.
                mv.req.forked = True
                sc.reserved_rows -= mv.req.num_rows - 1
        # Children copy the parent's committed hashes at fork time: commits land first (and
        # before the releases of the same sequences).
        await sc.drain()
        if commits:
            await alloc.commit(commits)
            commits = []

        copy_src: list[int] = []  # token_buf rows to copy (parent -> child)
        copy_dst: list[int] = []
        put_rows: list[int] = []  # then the new token of every running beam
        put_pos: list[int] = []
        put_tok: list[int] = []
        forks: list[tuple[Sequence, list[Sequence]]] = []
        for mv in moves:
            req = mv.req
            st = req.beam
            assert st is not None
            parents = st.beams
            kids: dict[int, list[tuple[int, NextBeam]]] = defaultdict(list)
            new_beams: list[Sequence | None] = [None] * len(mv.plan)
            for j, nb in enumerate(mv.plan):
                kids[nb.parent].append((j, nb))
            for pi, group in kids.items():
                parent = parents[pi]
                length = len(parent.token_ids)
                # Extra candidates: new sequences sharing the parent's blocks (fork).
                with_row: list[Sequence] = []
                for j, nb in group[1:]:
                    child = Sequence(
                        seq_id=f"{req.request_id}#b{st.next_id}",
                        request=req,
                        index=st.next_id,
                        token_ids=[*parent.token_ids, nb.token_id],
                        num_prompt_tokens=req.num_prompt_tokens,
                        arrival=parent.arrival,
                        cumulative_logprob=nb.cumulative_logprob,
                    )
                    st.next_id += 1
                    new_beams[j] = child
                    req.seqs.append(child)
                    if parent.status == SeqStatus.RUNNING and len(sc.free_rows) > sc.reserved_rows:
                        child.row = sc.take_row()
                        with_row.append(child)
                        copy_src.append(parent.row)
                        copy_dst.append(child.row)
                        put_rows.append(child.row)
                        put_pos.append(length)
                        put_tok.append(nb.token_id)
                    else:
                        # No KV to share (the parent was preempted) or no row free: recompute
                        # later, mostly a prefix hit on the blocks the beams committed.
                        child.status = SeqStatus.WAITING
                        sc.waiting.appendleft(child)
                if with_row:
                    forks.append((parent, with_row))
                # The best candidate of this parent continues in the parent itself.
                j0, nb0 = group[0]
                parent.token_ids.append(nb0.token_id)
                parent.cumulative_logprob = nb0.cumulative_logprob
                new_beams[j0] = parent
                if parent.status == SeqStatus.RUNNING and parent.row >= 0:
                    put_rows.append(parent.row)
                    put_pos.append(length)
                    put_tok.append(nb0.token_id)
            st.beams = [b for b in new_beams if b is not None]
        # The dropped beams' release and one fork per parent, all in flight at once (they touch
        # different sequences; a fork takes no fresh block). The release goes first, so that
        # no moment holds both the dropped tables and the new ones. A parent's
        # num_computed_tokens is what its KV covers: the token just appended is not written yet.
        calls = [alloc.release(dropped_ids)] if dropped_ids else []
        calls += [
            alloc.fork(p.seq_id, [c.seq_id for c in cs], p.num_computed_tokens) for p, cs in forks
        ]
        tables = (await asyncio.gather(*calls))[len(calls) - len(forks) :]
        for (parent, children), table in zip(forks, tables, strict=True):
            parent.needs_extend = True  # its partial last block is shared now
            for child in children:
                child.status = SeqStatus.RUNNING
                child.block_table = list(table[child.seq_id])
                child.num_computed_tokens = parent.num_computed_tokens
                child.num_cached_tokens = parent.num_cached_tokens
                child.num_committed_blocks = parent.num_committed_blocks
                child.needs_extend = True
                sc.running.append(child)
        self._write_tokens(copy_src, copy_dst, put_rows, put_pos, put_tok)
        return commits

    def _write_tokens(
        self,
        copy_src: list[int],
        copy_dst: list[int],
        rows: list[int],
        pos: list[int],
        tokens: list[int],
    ) -> None:
        """The device token rows: a forked beam starts as a copy of its parent's row; then every
        continuing beam gets its chosen token where the sampler had put its greedy pick."""
        e = self.engine
        dev = e.device
        buf = e.token_buf
        if copy_src:
            src = torch.tensor(copy_src, dtype=torch.int64, device=dev)
            dst = torch.tensor(copy_dst, dtype=torch.int64, device=dev)
            buf[dst] = buf.index_select(0, src)
        if rows:
            r = torch.tensor(rows, dtype=torch.int64, device=dev)
            p = torch.tensor(pos, dtype=torch.int64, device=dev)
            buf[r, p] = torch.tensor(tokens, dtype=torch.int64, device=dev)

    def _finish(self, req: Request, releases: list[str]) -> list[SequenceOutput]:
        """The search is over: the n best hypotheses out, every beam released."""
        e = self.engine
        st = req.beam
        assert st is not None
        for b in list(req.seqs):
            if b.is_finished:
                continue
            if b.status == SeqStatus.RUNNING:
                releases.append(b.seq_id)
            e.scheduler.finish(b, FinishReason.STOP)
        e._drop(req.request_id)
        self.active.discard(req.request_id)
        cached = max(req.num_cached_tokens, 0)
        return [
            SequenceOutput(
                req.request_id,
                rank,
                h.token_ids,
                FinishReason.STOP if h.stopped else FinishReason.LENGTH,
                [],
                req.num_prompt_tokens,
                cached,
                "",
                h.cumulative_logprob,
            )
            for rank, h in enumerate(st.search.best())
        ]

    def fail(self, req: Request, error: str) -> list[SequenceOutput]:
        """A beam can never fit: the whole request fails (its other beams are released)."""
        e = self.engine
        releases = []
        for b in req.seqs:
            if b.is_finished:
                continue
            if b.status == SeqStatus.RUNNING:
                releases.append(b.seq_id)
            e.scheduler.finish(b, FinishReason.ERROR)
        e.scheduler.defer([], releases)
        e._drop(req.request_id)
        self.active.discard(req.request_id)
        return req.error_outputs(range(req.params.n), error)


async def unstall(sc: Scheduler, out: SchedulerOutput) -> None:
    """Called by the scheduler when a step schedules nothing although sequences run and wait:
    every running sequence is a parked beam (waiting for a preempted sibling) and the queue's
    head does not fit. Preempts the newest other request's beams, queued behind the head's
    request, which must become whole to make progress; if the head's own beams are all that
    holds the pool, they can never be resident together and the head fails (engine._fail ends
    its whole request)."""
    if any(len(s.token_ids) > s.num_computed_tokens for s in sc.running):
        return
    head = sc.waiting[0].request
    others = [s for s in sc.running if s.request is not head]
    await sc.drain()
    if not others:
        seq = sc.waiting.popleft()
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = FinishReason.ERROR
        out.failed.append(seq)
        return
    victim = others[-1].request
    for s in [s for s in sc.running if s.request is victim][::-1]:
        await sc.preempt(s)
    first = [s for s in sc.waiting if s.request is head]
    rest = [s for s in sc.waiting if s.request is not head]
    sc.waiting.clear()
    sc.waiting.extend(first + rest)
