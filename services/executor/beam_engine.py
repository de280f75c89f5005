"""Beam search inside LLMEngine: beams are Sequences of one Request that share KV blocks through
the allocator, decoded in the same continuous batch as every other request.

A beam request starts as one sequence (the prompt), admitted with `width` rows (Request.num_rows,
like n > 1). Each round, every running beam computes its next-token logits in the engine's step
(the executor thread takes the top-K log-softmax of those rows, `candidates`); when all the
request's beams have reported, `BeamSearch.round` (beam_search.py) picks the next beams, and:

- a beam no candidate continues is finished and released (its blocks' ref counts drop);
- the first candidate of a beam continues in that beam's own sequence (a token appended, no
  allocator call);
- every further candidate of the same beam is a new sequence forked from it (Scheduler.fork, the
  same routine as n > 1, at the beam's written length: the children take references on all its
  blocks). Parent and children are marked `needs_extend`, so the next step's batched Extend
  runs before they write: the first writer into a shared partial block gets a copy-on-write
  copy, full blocks stay shared for good.

A beam that reports before its siblings (the token budget split the request across steps, or a
sibling was preempted) is parked: it has no token to compute until the round is decided, and
the scheduler skips sequences with nothing to compute. A preempted beam is recomputed from its
token ids (mostly a prefix hit) and reports again; its children, if any, start as waiting
sequences the same way.

The runner here changes no queue, row or table itself: the scheduler does (finish, place_child,
fork), kvmanager is reached through the scheduler's AllocatorLink, and the device token rows
through the ModelRunner.

Outputs: one empty output after the prompt's round (the request is accepted, a stream can
start; prompt and cached token counts), then, when the search ends, the `n` best hypotheses as
one final output each (index = rank, token_ids = the whole beam); every beam left is released.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from pagemesh.services.executor.beam_search import BeamSearch, NextBeam
from pagemesh.services.executor.engine_api import FinishReason, SequenceOutput
from pagemesh.services.executor.model_runner import BeamBatch, BeamCandidates, ModelRunner
from pagemesh.services.executor.scheduler import Scheduler
from pagemesh.services.executor.sequence import BeamState, Fork, Request, SeqStatus, Sequence
from pagemesh.services.kvmanager.api import CommitEntry


@dataclass(slots=True)
class _Transition:
    req: Request
    plan: list[NextBeam]
    dropped: list[Sequence]


class BeamSearchRunner:
    """The engine's beam-search hooks (engine.py calls these; see the module docstring)."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        eos_token_ids: set[int],
        max_model_len: int,
        drop: Callable[[str], object],
    ) -> None:
        """`drop`: the engine forgets a request whose search is over (or failed)."""
        self.scheduler = scheduler
        self.link = scheduler.link
        self.runner = runner
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._drop = drop
        self.active: set[str] = set()  # beam request ids: empty = no per-step beam work at all

    def add(self, req: Request) -> None:
        p = req.params
        stop = frozenset(p.stop_token_ids)
        if not p.ignore_eos:
            stop |= frozenset(self.eos_token_ids)
        max_new = min(p.max_tokens, self.max_model_len - req.num_prompt_tokens)
        search = BeamSearch(p.beam_width, p.n, p.length_penalty, p.early_stopping, stop, max_new)
        req.beam = BeamState(search, list(req.seqs))
        self.active.add(req.request_id)

    def prune(self, requests: Mapping[str, Request]) -> None:
        """After a step with no beam row: forget the searches no longer among the engine's
        `requests` (aborted)."""
        self.active &= requests.keys()

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
        sc = self.scheduler
        # Dropped beams go first, so their blocks are free before anyone copies on write (and
        # their rows before the new beams take theirs).
        dropped_ids = []
        for mv in moves:
            for b in mv.dropped:
                if b.status == SeqStatus.RUNNING:
                    dropped_ids.append(b.seq_id)
                sc.finish(b, FinishReason.STOP)
                mv.req.seqs.remove(b)
            if not mv.req.forked:
                sc.begin_fork(mv.req)  # the rows reserved at admission are the beams' now

        copy_src: list[int] = []  # token_buf rows to copy (parent -> child)
        copy_dst: list[int] = []
        put_rows: list[int] = []  # then the new token of every running beam
        put_pos: list[int] = []
        put_tok: list[int] = []
        forks: list[Fork] = []
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
                    # No row free, or no KV to share (the parent was preempted): it waits,
                    # to be recomputed (mostly a prefix hit on the blocks the beams committed).
                    if sc.place_child(parent, child):
                        with_row.append(child)
                        copy_src.append(parent.row)
                        copy_dst.append(child.row)
                        put_rows.append(child.row)
                        put_pos.append(length)
                        put_tok.append(nb.token_id)
                if with_row:
                    # A parent's num_computed_tokens is what its KV covers: the token appended
                    # below is not written yet.
                    forks.append(Fork(parent, with_row, parent.num_computed_tokens))
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
        # The step's commits, the dropped beams' release and one fork per parent (children copy
        # the parent's committed hashes at fork time: commits land first).
        await sc.fork(forks, commits, dropped_ids)
        self.runner.write_beam_tokens(copy_src, copy_dst, put_rows, put_pos, put_tok)
        return []

    def _finish(self, req: Request, releases: list[str]) -> list[SequenceOutput]:
        """The search is over: the n best hypotheses out, every beam released."""
        st = req.beam
        assert st is not None
        for b in list(req.seqs):
            if b.is_finished:
                continue
            if b.status == SeqStatus.RUNNING:
                releases.append(b.seq_id)
            self.scheduler.finish(b, FinishReason.STOP)
        self._drop(req.request_id)
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
        releases = []
        for b in req.seqs:
            if b.is_finished:
                continue
            if b.status == SeqStatus.RUNNING:
                releases.append(b.seq_id)
            self.scheduler.finish(b, FinishReason.ERROR)
        self.link.defer([], releases)
        self._drop(req.request_id)
        self.active.discard(req.request_id)
        return req.error_outputs(range(req.params.n), error)
