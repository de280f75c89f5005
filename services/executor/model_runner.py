"""The device side of the engine: the KV pool, the persistent device tables, pinned staging, CUDA
graphs, and per step: build the batch's inputs on the device, launch forward + sample, collect.

Device-side state persists across steps, one row per running sequence (Sequence.row, handed out
by the scheduler):
- `block_tables` [rows, max_blocks] int32: updated in place, only where a table changed;
- `token_buf` [rows, max_model_len + 1] int64: every sequence's token ids. Sampled tokens are
  written there on the device, so a decode step's inputs are gathered on the device
  (token_buf[row, position]) and the host only uploads one small index array per step.

On CUDA the launch is asynchronous and the worker thread only waits for the device; on CPU the
forward itself runs in the worker thread, so the event loop keeps serving either way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pagemesh.services.executor import prompt_logprobs
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine_api import SamplingParams, TokenLogprob
from pagemesh.services.executor.grammar import StepMasks, guided_rows
from pagemesh.services.executor.host_tier import (
    HostTier,
    TransferBatch,
    host_blocks_for,
    staging_blocks_for,
)
from pagemesh.services.executor.kv_pool import KVPool, bytes_per_block, determine_num_blocks
from pagemesh.services.executor.model.attention_metadata import AttentionMetadata
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.executor.model.llama import LlamaForCausalLM
from pagemesh.services.executor.sampler import (
    ALL_GREEDY,
    Sampler,
    SamplerOutput,
    SamplingTensors,
    build_sampling_tensors,
    draw_seed,
    token_counts,
)
from pagemesh.services.executor.scheduler import SchedulerOutput
from pagemesh.services.executor.sequence import Fork, Sequence
from pagemesh.services.executor.staging import PinnedStaging

from pagemesh import kernels

log = logging.getLogger(__name__)


def _ids_array(seq: Sequence) -> np.ndarray:
    """seq's token ids as an array, from the request's packed prompt while the sequence is
    its prompt alone (a 1k-id list costs ~25 us to convert, ~50 of them an admission step)."""
    data = seq.packed_prompt
    if data:
        return np.frombuffer(data, "<u4").astype(np.int64)
    return np.asarray(seq.token_ids, np.int64)


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
class Batch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    num_seqs: int
    logits_index: torch.Tensor  # [S] rows of hidden to sample (a forking parent: n times)
    sample_seqs: list[Sequence]  # [S]
    sample_rows: torch.Tensor  # [S] token_buf rows
    sample_pos: torch.Tensor  # [S] where each sampled token goes in its row
    sample_flat: torch.Tensor  # [S] ... as an index of token_buf.view(-1)
    forks: list[Fork]
    st: SamplingTensors
    lookahead_seqs: list[Sequence]  # short of the look-ahead target: AllocatorLink.issue_lookahead
    sample_pos_host: list[int]  # where each sampled token goes in its sequence's token_ids
    beam: BeamBatch | None = None  # beam search rows of sample_seqs (beam_engine.py)
    prompt_lp: prompt_logprobs.PromptLogprobRows | None = None  # prompt positions to score
    # ... and their scores on the device, once the forward has run
    prompt_scored: (
        tuple[prompt_logprobs.PromptLogprobRows, prompt_logprobs.PromptTensors] | None
    ) = None
    # Structured output: rows of sample_seqs with a grammar (grammar.py). Non-empty: the step
    # launches its forward first and samples once the engine has filled their masks.
    guided: list[int] = field(default_factory=list)
    # Host-tier copies to run before the step (CPU: in the worker, before the copies and the
    # forward; CUDA: queued by `launch`, ahead of the step's forward: host_tier.py).
    transfers: list[TransferBatch] = field(default_factory=list)


@dataclass(slots=True)
class StepResult:
    """A step's sampled tokens on the host."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None
    beam: BeamCandidates | None = None
    # (sequence, first position, entries) per prompt chunk scored (prompt_logprobs.py)
    prompt_logprobs: list[tuple[Sequence, int, list[TokenLogprob]]] | None = None


@dataclass(slots=True)
class _Pending:
    out: SamplerOutput  # on the device, possibly not computed yet
    beam: BeamCandidates | None
    prompt: tuple[prompt_logprobs.PromptLogprobRows, prompt_logprobs.PromptTensors] | None = None


@dataclass(slots=True)
class _Forward:
    """A step's forward, its sampling still to come (structured output: the masks first)."""

    logits: torch.Tensor | None = None  # [S, V]; CPU: set by the worker thread
    error: BaseException | None = None  # CPU: the forward's, raised by the sampling


@dataclass(slots=True)
class InFlight:
    """A launched step, until `ModelRunner.result` lands it."""

    batch: Batch
    # CPU: the StepResult (the worker thread runs the step). None on CUDA, and while the
    # sampling waits for its masks (`ModelRunner.sample` sets it).
    future: asyncio.Future[Any] | None
    pending: _Pending | None  # CUDA: the sampler's device outputs
    forward: _Forward | None = None  # the forward whose sampling waits for `sample`
    # CUDA: recorded after the step's last work (its tokens' copy to the host included).
    done: torch.cuda.Event | None = None


def _recorded_event() -> torch.cuda.Event:
    """A CUDA event recorded on the current stream after the work queued so far."""
    done = torch.cuda.Event()
    done.record()
    return done


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model: LlamaForCausalLM,
        model_config: ModelConfig,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """Sizes and allocates the KV pool (profiled on CUDA), the device tables and staging,
        and captures the CUDA graphs."""
        self.config = config
        self.model = model
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.device = device
        self.dtype = dtype
        self.vocab_size = model_config.vocab_size
        self.max_blocks = -(-max_model_len // config.block_size)
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        mc = model_config
        cfg = config

        self.sampler = Sampler(mc.vocab_size, self.device, cfg.seed)
        block_bytes = bytes_per_block(mc, cfg.block_size, self.dtype)
        num_host = host_blocks_for(cfg.host_kv_gib, cfg.host_kv_blocks, block_bytes)
        # The host tier's device staging is allocated after the pool: its bytes come off the
        # pool's budget, or the first burst of spills would run out of memory.
        staging_blocks = 0
        if num_host and self.device.type == "cuda":
            staging_blocks = staging_blocks_for(
                cfg.host_kv_staging_mib,
                block_bytes,
                cfg.max_num_batched_tokens,
                cfg.block_size,
                cfg.max_num_seqs,
            )
        num_blocks = determine_num_blocks(
            cfg, mc, self.dtype, self.device, self.profile_run, staging_blocks * block_bytes
        )
        self.pool = KVPool(mc, num_blocks, cfg.block_size, self.dtype, self.device)
        log.info(
            "KV pool: %d blocks x %d tokens = %d tokens (%.2f GiB, %s on %s)",
            num_blocks,
            cfg.block_size,
            self.pool.num_tokens,
            self.pool.nbytes / 2**30,
            str(self.dtype).removeprefix("torch."),
            self.device,
        )
        self.host_tier = (
            HostTier(self.pool, num_host, self.device, staging_blocks) if num_host else None
        )
        if self.host_tier is not None:
            log.info(
                "KV host tier: %d blocks = %d tokens (%.2f GiB%s; device staging %.0f MiB)",
                num_host,
                num_host * cfg.block_size,
                self.host_tier.nbytes / 2**30,
                ", pinned" if self.host_tier.cuda else "",
                self.host_tier.staging_bytes / 2**20,
            )
        rows = cfg.max_num_seqs
        self.block_tables = torch.zeros(
            rows, self.max_blocks, dtype=torch.int32, device=self.device
        )
        self.token_buf = torch.zeros(
            rows, self.max_model_len + 1, dtype=torch.int64, device=self.device
        )
        # Flat views of both (same storage), made once: a step gathers from them by flat index.
        self._token_flat = self.token_buf.view(-1)
        self._tables_flat = self.block_tables.view(-1)
        self.staging = PinnedStaging(self.device) if self.device.type == "cuda" else None
        self.graphs = self.prefill_graphs = None
        if self.device.type == "cuda" and cfg.use_cuda_graphs:
            from pagemesh.services.executor.cuda_graphs import CUDAGraphRunner, PrefillGraphRunner

            start = time.monotonic()
            pool = None
            if cfg.use_prefill_cuda_graphs:
                self.prefill_graphs = PrefillGraphRunner(
                    self.model,
                    self.pool.kv_caches,
                    max_tokens=cfg.max_num_batched_tokens,
                    max_seqs=cfg.max_num_seqs,
                    max_blocks=self.max_blocks,
                    max_model_len=self.max_model_len,
                    vocab_size=mc.vocab_size,
                    device=self.device,
                )
                pool = self.prefill_graphs.capture()  # the largest graphs: first into the pool
            self.graphs = CUDAGraphRunner(
                self.model,
                self.pool.kv_caches,
                max_batch_size=min(cfg.max_cuda_graph_batch_size, cfg.max_num_seqs),
                max_blocks=self.max_blocks,
                max_model_len=self.max_model_len,
                vocab_size=mc.vocab_size,
                device=self.device,
            )
            self.graphs.capture(pool)
            log.info(
                "captured %d decode and %d prefill CUDA graphs in %.1f s",
                len(self.graphs.graphs),
                len(self.prefill_graphs.graphs) if self.prefill_graphs else 0,
                time.monotonic() - start,
            )
        if self.device.type == "cuda":
            self._warm_up_token_mask()

    @torch.inference_mode()
    def _warm_up_token_mask(self) -> None:
        """Compiles (or loads from Triton's cache) both variants of the grammar mask kernel
        now: every row constrained, and some rows. Compiling one costs hundreds of ms, which
        the first structured request's step would otherwise stall the whole batch for (run V
        of structured_bench: the all-constrained arm's first round paid it, 0.75x against
        0.95x in its second)."""
        rows = self.config.max_num_seqs
        words = -(-self.vocab_size // 32)
        # The model's own logits (their width and dtype pick the compiled variant).
        hidden = torch.zeros(
            rows, self.model_config.hidden_size, dtype=self.dtype, device=self.device
        )
        logits = self.model.compute_logits(hidden)
        allow_all = torch.full((rows, words), -1, dtype=torch.int32, device=self.device)
        kernels.apply_token_bitmask(logits, allow_all, None, self.vocab_size)
        index = torch.arange(rows, dtype=torch.int64, device=self.device)
        kernels.apply_token_bitmask(logits, allow_all, index, self.vocab_size)

    @torch.inference_mode()
    def profile_run(self) -> None:
        """The largest batch the scheduler can form, on a one-block dummy cache (no writes:
        every slot is -1), then the sampler's heaviest path on max_num_seqs rows."""
        mc, cfg = self.model_config, self.config
        t = cfg.max_num_batched_tokens
        b = min(cfg.max_num_seqs, t)
        dev = self.device
        dummy = torch.zeros(
            1, cfg.block_size, mc.num_kv_heads, mc.head_dim, dtype=self.dtype, device=dev
        )
        kv = [(dummy, dummy)] * mc.num_layers
        per_seq = t // b
        q_lens = torch.full((b,), per_seq, dtype=torch.int32)
        q_lens[-1] += t - per_seq * b
        qsl = torch.zeros(b + 1, dtype=torch.int32)
        qsl[1:] = q_lens.cumsum(0)
        positions = torch.cat([torch.arange(int(n)) for n in q_lens]).to(dev)
        attn = AttentionMetadata(
            slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=dev),
            block_tables=torch.zeros(b, 1, dtype=torch.int32, device=dev),
            seq_lens=q_lens.to(dev),
            query_start_loc=qsl.to(dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(q_lens.max()),
        )
        # Contexts longer than one block would read past the dummy table: keep them in one block.
        if int(q_lens.max()) > cfg.block_size:
            attn.block_tables = torch.zeros(
                b, -(-int(q_lens.max()) // cfg.block_size), dtype=torch.int32, device=dev
            )
        ids = torch.zeros(t, dtype=torch.int64, device=dev)
        hidden = self.model(ids, positions, kv, attn)
        logits = self.model.compute_logits(hidden[qsl[1:].to(dev).long() - 1])
        params = [
            SamplingParams(temperature=0.8, top_p=0.9, top_k=50, logprobs=5, logit_bias={0: 1.0})
        ] * b
        st = build_sampling_tensors(params, [None] * b, mc.vocab_size, dev)
        self.sampler(logits, st)

    # -- a step ---------------------------------------------------------------------------------

    def launch(self, sched: SchedulerOutput, sampling_params: bool, beams: bool) -> InFlight:
        """Prepare and submit the step's device work. `sampling_params`: some request is not
        plain greedy (per-row sampling tensors); `beams`: beam search requests are active.
        A step with constrained rows (batch.guided) submits its forward only: `sample` follows
        with their masks."""
        if self.staging is not None:
            self.staging.next_step()
        tier = self.host_tier
        if tier is not None and tier.cuda and sched.transfers:
            # First, so the copy stream's copies overlap this step's preparation and the step
            # still in flight; the gathers and scatters queue on the compute stream ahead of
            # this step's forward (host_tier.py). Indices go up through the step's pinned slot.
            with torch.inference_mode():
                tier.run(sched.transfers, self._h2d)
        with torch.inference_mode():
            batch = self._prepare(sched, sampling_params, beams)
        if tier is not None and not tier.cuda:
            batch.transfers = sched.transfers
        loop = asyncio.get_running_loop()
        if batch.guided:
            fwd = _Forward()
            if self.device.type == "cuda":
                fwd.logits = self._forward(batch, sched.copies)
            else:
                loop.run_in_executor(self._worker, self._forward_into, fwd, batch, sched.copies)
            return InFlight(batch, None, None, fwd)
        if self.device.type == "cuda":
            # Launch from this thread (a graph replay is one call); `result` waits for `done`.
            pending = self._launch(batch, sched.copies)
            return InFlight(batch, None, pending, done=_recorded_event())
        future = loop.run_in_executor(self._worker, self._execute, batch, sched.copies)
        return InFlight(batch, future, None)

    def sample(self, flight: InFlight, masks: StepMasks) -> None:
        """Submit the sampling of a step launched without it (`launch`), its constrained rows
        masked by `masks`. CPU: after the forward, in the same worker thread (FIFO)."""
        fwd = flight.forward
        assert fwd is not None and flight.future is None, "sample() once, after launch()"
        flight.forward = None
        batch = flight.batch
        if self.device.type == "cuda":
            with torch.inference_mode():
                assert fwd.logits is not None
                flight.pending = self._sample(batch, fwd.logits, masks)
            flight.done = _recorded_event()
        else:
            loop = asyncio.get_running_loop()
            flight.future = loop.run_in_executor(self._worker, self._sample_cpu, batch, fwd, masks)

    async def result(self, flight: InFlight) -> StepResult:
        """Waits for a launched step and brings its tokens to the host."""
        assert flight.forward is None, "a step launched without sampling: sample() first"
        if flight.done is not None:
            assert flight.pending is not None
            # Host-bound steps (the device idles waiting for the host) find the step done:
            # no thread hop, no wait on the event loop. Otherwise the worker waits for the
            # device, holding no GIL, while the loop serves on.
            if not flight.done.query():
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._worker, flight.done.synchronize)
            return self._collect(flight.pending)
        assert flight.future is not None
        result = await flight.future
        if flight.pending is not None:
            result = self._collect(flight.pending)
        return result

    def _prepare(self, sched: SchedulerOutput, sampling_params: bool, beams: bool) -> Batch:
        """Host: one pass over the scheduled sequences into small int arrays, one upload.
        Device: token ids, slots and block tables gathered from the persistent tables."""
        dev = self.device
        bs = self.config.block_size
        seqs = sched.seqs
        b = len(seqs)
        self._sync_tables(sched)

        rows = np.fromiter((s.row for s in seqs), np.int64, b)
        starts = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, b)
        totals = np.fromiter((len(s.token_ids) for s in seqs), np.int64, b)
        q_lens = np.asarray(sched.num_new_tokens, dtype=np.int64)
        cu = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu[1:])
        t = int(cu[-1])
        seq_lens = starts + q_lens
        if t == b:
            token_rows, positions = rows, starts
        else:
            token_rows = np.repeat(rows, q_lens)
            positions = np.repeat(starts - cu[:-1], q_lens) + np.arange(t)
        sampling = seq_lens == totals
        sample_idx = np.flatnonzero(sampling)
        all_sample = len(sample_idx) == b
        # Sampling sequences whose tables fall short of the look-ahead target after this step.
        covered = np.fromiter((len(q.block_table) for q in seqs), np.int64, b) * bs
        target = np.minimum(seq_lens + 1 + self.config.num_lookahead_tokens, self.max_model_len)
        lookahead_seqs = [seqs[i] for i in np.flatnonzero(sampling & (covered < target)).tolist()]

        forks = sched.forks
        if not forks:
            # (a decode step: every sequence samples, the list is copied whole)
            sample_seqs = list(seqs) if all_sample else [seqs[i] for i in sample_idx.tolist()]
            logits_idx = cu[sample_idx + 1] - 1
            sample_rows = rows[sample_idx]
            sample_pos = totals[sample_idx]
        else:
            # n > 1: a parent whose prefill ends now samples n tokens from its one row of
            # logits, for itself and for the children the scheduler made (on their own rows).
            children_of = {f.parent: f.children for f in forks}
            sample_seqs = []
            idx: list[int] = []
            for i in sample_idx.tolist():
                seq = seqs[i]
                sample_seqs.append(seq)
                idx.append(int(cu[i + 1]) - 1)
                children = children_of.get(seq)
                if children is not None:
                    sample_seqs.extend(children)
                    idx.extend([int(cu[i + 1]) - 1] * len(children))
            n_s = len(sample_seqs)
            logits_idx = np.asarray(idx, np.int64)
            sample_rows = np.fromiter((q.row for q in sample_seqs), np.int64, n_s)
            sample_pos = np.fromiter((len(q.token_ids) for q in sample_seqs), np.int64, n_s)
        s = len(sample_seqs)

        # One upload, as few device ops as can be: every index is made flat on the host
        # (numpy, a few us) so that each gather is one index_select, and the int32 metadata
        # travels as raw bytes inside the int64 upload (a view on the device, no cast kernel).
        width, max_blocks = self.token_buf.shape[1], self.block_tables.shape[1]
        flat_tokens = token_rows * width + positions  # token_buf.view(-1) index of each input
        blocks = token_rows * max_blocks + positions // bs  # block_tables.view(-1) index
        offsets = positions % bs
        flat_samples = sample_rows * width + sample_pos  # where the sampled tokens go
        # (seq_lens, cu) as int32, first in the upload, each at a 16-byte boundary as a tensor
        # of its own would be (Triton specializes its kernels on their pointers' alignment).
        cu_at = -(-b // 4) * 4
        meta32 = np.zeros(cu_at + -(-(b + 1) // 4) * 4, np.int32)
        meta32[:b] = seq_lens
        meta32[cu_at : cu_at + b + 1] = cu
        packed = np.concatenate(
            [
                meta32.view(np.int64),
                flat_tokens,
                positions,
                blocks,
                offsets,
                rows,
                logits_idx,
                sample_rows,
                sample_pos,
                flat_samples,
            ]
        )
        (
            meta_d,
            flat_tokens_d,
            positions_d,
            blocks_d,
            offsets_d,
            rows_d,
            logits_idx_d,
            sample_rows_d,
            sample_pos_d,
            flat_samples_d,
        ) = self._h2d(packed).split([len(meta32) // 2, t, t, t, t, b, s, s, s, s])
        seq_lens_d, _, cu_d, _ = meta_d.view(torch.int32).split(
            [b, cu_at - b, b + 1, len(meta32) - cu_at - b - 1]
        )

        for f in forks:
            child_rows = self._h2d(np.asarray([c.row for c in f.children], np.int64))
            self.token_buf[child_rows] = self.token_buf[f.parent.row].clone()
        input_ids = self._token_flat.index_select(0, flat_tokens_d)
        block_ids = self._tables_flat.index_select(0, blocks_d)  # int32
        attn = AttentionMetadata(
            slot_mapping=torch.add(offsets_d, block_ids, alpha=bs),  # int64: block * bs + offset
            block_tables=self.block_tables.index_select(0, rows_d),
            seq_lens=seq_lens_d,
            query_start_loc=cu_d,
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
        )
        prompt_lp = None
        if sampling_params:
            params = [q.request.params for q in sample_seqs]
            draws = [
                None if q.seed is None else draw_seed(q.seed, q.draw_position) for q in sample_seqs
            ]
            st = build_sampling_tensors(params, draws, self.vocab_size, dev, self.staging)
            # (prompt_logprobs requests are among the not plain greedy ones: engine._special)
            if t > b:  # some sequence computes more than its one decode token
                prompt_lp = prompt_logprobs.plan(seqs, starts, q_lens, cu, str(dev))
        else:
            st = ALL_GREEDY
        return Batch(
            guided=guided_rows(sample_seqs),
            input_ids=input_ids,
            positions=positions_d,
            attn=attn,
            num_seqs=b,
            logits_index=logits_idx_d,
            sample_seqs=sample_seqs,
            sample_rows=sample_rows_d,
            sample_pos=sample_pos_d,
            sample_flat=flat_samples_d,
            forks=forks,
            st=st,
            lookahead_seqs=lookahead_seqs,
            sample_pos_host=sample_pos.tolist(),
            beam=self._beam_batch(sample_seqs) if beams else None,
            prompt_lp=prompt_lp,
        )

    def _beam_batch(self, sample_seqs: list[Sequence]) -> BeamBatch | None:
        """The beam rows among the sampled ones, and how many candidates to keep per row."""
        idx = [i for i, s in enumerate(sample_seqs) if s.request.beam is not None]
        if not idx:
            return None
        seqs = [sample_seqs[i] for i in idx]
        k = 0
        for s in seqs:
            st = s.request.beam
            assert st is not None
            k = max(k, st.search.num_candidates)
        k = min(k, self.vocab_size)
        index = torch.tensor(idx, dtype=torch.int64, device=self.device)
        return BeamBatch(index, seqs, k)

    def _h2d(self, array: np.ndarray) -> torch.Tensor:
        """Host array -> device tensor without waiting for the device: a blocking (or
        pageable) copy would stall the host until the queued steps finish, which async
        scheduling must never do (the step's pinned staging slot: staging.py)."""
        if self.staging is None:
            return torch.from_numpy(array)
        return self.staging.to_device(array)

    def _sync_tables(self, sched: SchedulerOutput) -> None:
        """Write the table entries that changed since they were last uploaded, in one op."""
        if sched.admitted:
            # Whole prompts (the penalties count them); flat positions row * width + column.
            lens = np.fromiter((q.num_tokens for q in sched.admitted), np.int64)
            rows = np.fromiter((q.row for q in sched.admitted), np.int64)
            starts = np.repeat(rows * self.token_buf.shape[1] - np.cumsum(lens) + lens, lens)
            flat = starts + np.arange(int(lens.sum()))
            vals = np.concatenate([_ids_array(q) for q in sched.admitted])
            self._token_flat[self._h2d(flat)] = self._h2d(vals)
        changed = [s for s in sched.seqs if s.num_synced_blocks != len(s.block_table)]
        if not changed:
            return
        table_rows: list[np.ndarray] = []
        table_cols: list[np.ndarray] = []
        table_vals: list[np.ndarray] = []
        for seq in changed:
            first = seq.num_synced_blocks
            k = len(seq.block_table) - first
            table_rows.append(np.full(k, seq.row, np.int64))
            table_cols.append(np.arange(first, first + k))
            table_vals.append(np.asarray(seq.block_table[first:], np.int64))
            seq.num_synced_blocks = len(seq.block_table)
        idx = self._h2d(np.stack([np.concatenate(table_rows), np.concatenate(table_cols)]))
        self.block_tables[idx[0], idx[1]] = self._h2d(np.concatenate(table_vals).astype(np.int32))

    @torch.inference_mode()
    def _execute(self, batch: Batch, copies: list[tuple[int, int]]) -> StepResult:
        """CPU: the whole step in the worker thread (the forward is host compute)."""
        return self._collect(self._launch(batch, copies))

    @torch.inference_mode()
    def _launch(self, batch: Batch, copies: list[tuple[int, int]]) -> _Pending:
        """Queue the step's device work (on CUDA nothing here waits for the device)."""
        return self._sample(batch, self._forward(batch, copies), None)

    def _forward_into(self, fwd: _Forward, batch: Batch, copies: list[tuple[int, int]]) -> None:
        try:
            fwd.logits = self._forward(batch, copies)
        except BaseException as exc:  # raised where the step lands (`_sample_cpu`)
            fwd.error = exc

    def _sample_cpu(self, batch: Batch, fwd: _Forward, masks: StepMasks) -> StepResult:
        if fwd.error is not None:
            raise fwd.error
        assert fwd.logits is not None, "the forward runs first in the worker"
        return self._collect(self._sample(batch, fwd.logits, masks))

    @torch.inference_mode()
    def _forward(self, batch: Batch, copies: list[tuple[int, int]]) -> torch.Tensor:
        """The step's host-tier transfers, copy-on-write copies and forward: the sampled rows'
        logits [S, V]. Transfers first: a fresh block a copy writes may have been evicted (its
        spill reads it first)."""
        tier = self.host_tier
        if tier is not None and batch.transfers:
            tier.run(batch.transfers)
        if copies:
            mapping = self._h2d(np.asarray(copies, np.int64).reshape(-1, 2))
            kernels.copy_blocks(self.pool.key_caches, self.pool.value_caches, mapping)
        logits = None
        if self.graphs is not None and not batch.forks and batch.prompt_lp is None:
            if batch.attn.is_decode:
                logits = self.graphs.run(
                    batch.input_ids, batch.positions, batch.attn, batch.num_seqs
                )
                if logits is not None and batch.logits_index.numel() != batch.num_seqs:
                    logits = logits.index_select(0, batch.logits_index)
            elif self.prefill_graphs is not None:
                logits = self.prefill_graphs.run(
                    batch.input_ids,
                    batch.positions,
                    batch.attn,
                    batch.num_seqs,
                    batch.logits_index,
                )
        if logits is None:
            hidden = self.model(batch.input_ids, batch.positions, self.pool.kv_caches, batch.attn)
            logits = self.model.compute_logits(hidden.index_select(0, batch.logits_index))
            if batch.prompt_lp is not None:
                scored = prompt_logprobs.compute(
                    self.model.compute_logits, hidden, batch.prompt_lp, self.vocab_size
                )
                batch.prompt_scored = (batch.prompt_lp, scored)
        return logits

    @torch.inference_mode()
    def _sample(self, batch: Batch, logits: torch.Tensor, masks: StepMasks | None) -> _Pending:
        """The step's sampling (after its masks, if any), its tokens written to token_buf and
        queued for the host."""
        if masks is not None and masks.rows:
            masks.apply(logits, self.vocab_size, self._h2d)
        counts = None
        if batch.st.presence is not None:
            length = max(batch.sample_pos_host, default=0) + 1
            tokens = self.token_buf[batch.sample_rows, :length]
            prompt_lens = self._h2d(np.asarray([q.penalty_prompt_len for q in batch.sample_seqs]))
            counts = token_counts(tokens, prompt_lens, batch.sample_pos, self.vocab_size)
        beam = None
        if batch.beam is not None:
            beam = candidates(logits, batch.beam, self.vocab_size)
        out: SamplerOutput = self.sampler(logits, batch.st, counts)
        self._token_flat.index_copy_(0, batch.sample_flat, out.token_ids)
        if out.token_ids.is_cuda:
            # Queue the copies to (pinned) host memory now, ahead of whatever is launched next:
            # landing this step must not wait for the next one.
            staging = self.staging
            assert staging is not None
            out = SamplerOutput(
                staging.to_host(out.token_ids),
                *(
                    None if t is None else staging.to_host(t)
                    for t in (out.logprobs, out.top_ids, out.top_logprobs)
                ),
            )
        return _Pending(out, beam, batch.prompt_scored)

    @staticmethod
    def _collect(pending: _Pending) -> StepResult:
        """The step's one device-to-host transfer."""
        out, beam = pending.out, pending.beam
        return StepResult(
            token_ids=out.token_ids.tolist(),
            logprobs=out.logprobs.tolist() if out.logprobs is not None else None,
            top_ids=out.top_ids.tolist() if out.top_ids is not None else None,
            top_logprobs=out.top_logprobs.tolist() if out.top_logprobs is not None else None,
            beam=beam,
            prompt_logprobs=(
                prompt_logprobs.collect(*pending.prompt) if pending.prompt is not None else None
            ),
        )

    def write_beam_tokens(
        self,
        copy_src: list[int],
        copy_dst: list[int],
        rows: list[int],
        pos: list[int],
        tokens: list[int],
    ) -> None:
        """The device token rows after a beam round: a forked beam starts as a copy of its
        parent's row; then every continuing beam gets its chosen token where the sampler had
        put its greedy pick."""
        dev = self.device
        buf = self.token_buf
        if copy_src:
            src = torch.tensor(copy_src, dtype=torch.int64, device=dev)
            dst = torch.tensor(copy_dst, dtype=torch.int64, device=dev)
            buf[dst] = buf.index_select(0, src)
        if rows:
            r = torch.tensor(rows, dtype=torch.int64, device=dev)
            p = torch.tensor(pos, dtype=torch.int64, device=dev)
            buf[r, p] = torch.tensor(tokens, dtype=torch.int64, device=dev)
