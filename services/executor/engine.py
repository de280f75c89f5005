"""LLMEngine: token ids in, tokens out, one scheduler step at a time (API: engine_api.py).

A step: schedule (scheduler.py) -> build the batch's inputs on the device -> launch forward +
sample -> (overlapped with the device) advance the sequences and reserve the next step's blocks
in one batched Extend -> land the tokens: finish, commit, release (in the background).
On CUDA the launch is asynchronous and the worker thread only waits for the device; on CPU the
forward itself runs in the worker thread, so the event loop keeps serving either way.
With async scheduling (the CUDA default) step t is launched before step t-1 lands, which hides
the host's per-step work behind the device; sampled tokens are placeholders on the host until
their step lands (sequence.PLACEHOLDER), and outputs come one step later.

Device-side state persists across steps, one row per running sequence (Sequence.row):
- `block_tables` [rows, max_blocks] int32: updated in place, only where a table changed;
- `token_buf` [rows, max_model_len + 1] int64: every sequence's token ids. Sampled tokens are
  written there on the device, so a decode step's inputs are gathered on the device
  (token_buf[row, position]) and the host only uploads one small index array per step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import time
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from pagemesh.services.executor import beam_search
from pagemesh.services.executor.beam_engine import (
    BeamBatch,
    BeamCandidates,
    BeamSearchRunner,
    candidates,
)
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine_api import (
    FinishReason,
    SamplingParams,
    SequenceOutput,
    TokenLogprob,
)
from pagemesh.services.executor.kv_pool import KVPool, determine_num_blocks
from pagemesh.services.executor.model.attention_metadata import AttentionMetadata
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.executor.prefix_caching import CommitsDropped
from pagemesh.services.executor.prompt_ids import PromptIds
from pagemesh.services.executor.sampler import (
    ALL_GREEDY,
    Sampler,
    SamplerOutput,
    SamplingTensors,
    build_sampling_tensors,
    token_counts,
)
from pagemesh.services.executor.scheduler import Scheduler, SchedulerOutput
from pagemesh.services.executor.sequence import PLACEHOLDER, Request, SeqStatus, Sequence
from pagemesh.services.executor.staging import PinnedStaging
from pagemesh.services.executor.trace import StepTimes
from pagemesh.services.kvmanager.api import BlockAllocator, CommitEntry

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
class Batch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    num_seqs: int
    logits_index: torch.Tensor  # [S] rows of hidden to sample (a forking parent: n times)
    sample_seqs: list[Sequence]  # [S]
    sample_rows: torch.Tensor  # [S] token_buf rows
    sample_pos: torch.Tensor  # [S] where each sampled token goes in its row
    forks: list[tuple[Sequence, list[Sequence]]]
    st: SamplingTensors
    lookahead_seqs: list[Sequence]  # short of the look-ahead target: Scheduler.issue_lookahead
    sample_pos_host: list[int]  # where each sampled token goes in its sequence's token_ids
    beam: BeamBatch | None = None  # beam search rows of sample_seqs (beam_engine.py)


@dataclass(slots=True)
class _Pending:
    out: SamplerOutput  # on the device, possibly not computed yet
    beam: BeamCandidates | None


@dataclass(slots=True)
class _InFlight:
    batch: Batch
    future: asyncio.Future  # CPU: the StepResult; CUDA: the device is done
    pending: _Pending | None  # CUDA: the sampler's device outputs


@dataclass(slots=True)
class StepResult:
    token_ids: list[int]
    logprobs: list[float] | None
    top_ids: list[list[int]] | None
    top_logprobs: list[list[float]] | None
    beam: BeamCandidates | None = None


def _aborted(req: Request, index: int) -> SequenceOutput:
    """The final output of choice `index` of an aborted request (or of a cut choice)."""
    return SequenceOutput(
        req.request_id, index, [], FinishReason.ABORT, num_prompt_tokens=req.num_prompt_tokens
    )


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        allocator: BlockAllocator,
        *,
        model: torch.nn.Module | None = None,
        model_config: ModelConfig | None = None,
        model_fingerprint: str | None = None,
    ) -> None:
        """`model`/`model_config` may be given pre-built (random-weight benchmarks, tests that
        share one loaded model); otherwise `start()` resolves and loads `config.model`."""
        self.config = config
        # Prefix caching off: nothing is ever published to the index (see prefix_caching.py).
        self.allocator = allocator if config.enable_prefix_caching else CommitsDropped(allocator)
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.model = model
        self.model_config = model_config
        self.model_path = ""
        self.model_fingerprint = model_fingerprint or ""
        self.requests: dict[str, Request] = {}
        # Requests whose sampling is not plain greedy / that still have to fork: while both
        # sets are empty, a step takes the fast paths (no per-row sampling tensors, no forks).
        self._special: set[str] = set()
        self._unforked: set[str] = set()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine-step")
        self._aborts: list[str] = []
        self._choice_aborts: list[tuple[str, list[int]]] = []  # (request id, choice indices)
        self._inflight: _InFlight | None = None  # async scheduling: the step not landed yet
        self.beams = BeamSearchRunner(self)  # beam search requests (beam_engine.py)
        self.started = False
        self.epoch = 0
        self.num_steps = 0
        self.step_times = StepTimes()  # the last step's, for --trace-steps (trace.py)
        self._prompt_ids = PromptIds()  # add_request's conversion (prompt_ids.py)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.model is None:
            await asyncio.to_thread(self._load_model)
        assert self.model is not None and self.model_config is not None
        mc = self.model_config
        cfg = self.config
        self.max_model_len = min(
            cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        self.vocab_size = mc.vocab_size
        self.eos_token_ids = set(mc.eos_token_ids)
        self.max_blocks = -(-self.max_model_len // cfg.block_size)
        if not self.model_fingerprint:
            self.model_fingerprint = hashlib.sha256(repr(mc).encode()).hexdigest()
        # The KV layout is part of what makes blocks shareable.
        layout = f"{self.model_fingerprint}:{self.dtype}:{cfg.block_size}"
        self.kv_fingerprint = hashlib.sha256(layout.encode()).hexdigest()

        self.sampler = Sampler(mc.vocab_size, self.device, cfg.seed)
        num_blocks = determine_num_blocks(cfg, mc, self.dtype, self.device, self._profile_run)
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
        rows = cfg.max_num_seqs
        self.block_tables = torch.zeros(
            rows, self.max_blocks, dtype=torch.int32, device=self.device
        )
        self.token_buf = torch.zeros(
            rows, self.max_model_len + 1, dtype=torch.int64, device=self.device
        )
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
        self.epoch = await self.allocator.register(num_blocks, cfg.block_size, self.kv_fingerprint)
        self.scheduler = Scheduler(cfg, self.allocator, self.max_model_len)
        self.started = True

    def _load_model(self) -> None:
        from pagemesh.services.executor.model.loader import (
            load_model,
            model_fingerprint,
            resolve_model,
        )

        path = resolve_model(self.config.model)
        self.model_path = str(path)
        self.model, self.model_config = load_model(path, self.device, self.dtype)
        self.model_fingerprint = model_fingerprint(path)

    @torch.inference_mode()
    def _profile_run(self) -> None:
        """The largest batch the scheduler can form, on a one-block dummy cache (no writes:
        every slot is -1), then the sampler's heaviest path on max_num_seqs rows."""
        assert self.model is not None and self.model_config is not None
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

    # -- API ------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int] | array,
        params: SamplingParams,
        cache_salt: str = "",
    ) -> None:
        if not self.started:
            raise RuntimeError("LLMEngine.start() has not been awaited")
        prompt, packed, lo, hi = self._prompt_ids.convert(prompt_token_ids)
        self._validate(request_id, prompt, params, lo, hi)
        req = Request(request_id, params, cache_salt, len(prompt), prompt_data=packed)
        seq = self._new_seq(req, 0, prompt)
        self.requests[request_id] = req
        if params.use_beam_search:
            self.beams.add(req)  # beams fork after each round, not after the prefill
        elif params.n > 1:
            self._unforked.add(request_id)
        if not (
            params.temperature < 1e-5
            and not params.logprobs
            and not params.return_logprobs
            and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0
            and params.repetition_penalty == 1.0
            and not params.logit_bias
        ):
            self._special.add(request_id)
        self.scheduler.add(seq)

    def _new_seq(self, req: Request, index: int, token_ids: list[int]) -> Sequence:
        gen = None
        if req.params.seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed((req.params.seed + index) % 2**63)
        suffix = f"#{index}" if req.params.n > 1 else ""
        seq = Sequence(
            seq_id=f"{req.request_id}{suffix}",
            request=req,
            index=index,
            token_ids=token_ids,
            num_prompt_tokens=req.num_prompt_tokens,
            arrival=0,
            generator=gen,
        )
        req.seqs.append(seq)
        return seq

    def _validate(
        self, request_id: str, prompt: list[int], p: SamplingParams, lo: int, hi: int
    ) -> None:
        """`lo`, `hi`: the prompt's smallest and largest id."""

        def bad(msg: str) -> None:
            raise ValueError(msg)

        if not request_id:
            bad("request_id must not be empty")
        if request_id in self.requests:
            bad(f"request_id {request_id!r} is already in use")
        if not prompt:
            bad("the prompt must hold at least one token")
        if lo < 0 or hi >= self.vocab_size:
            bad(f"prompt token ids must be in [0, {self.vocab_size})")
        # A search runs its beams at once: each needs a row.
        beam_search.validate(p, min(self.config.max_beam_width, self.config.max_num_seqs))
        if not 1 <= p.n <= min(self.config.max_n, self.config.max_num_seqs):
            bad(f"n must be in [1, {min(self.config.max_n, self.config.max_num_seqs)}], got {p.n}")
        if p.max_tokens < 1:
            bad(f"max_tokens must be >= 1, got {p.max_tokens}")
        if len(prompt) + p.max_tokens > self.max_model_len:
            bad(
                f"prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) exceeds the"
                f" context length {self.max_model_len}"
            )
        if (
            not self.config.enable_chunked_prefill
            and len(prompt) > self.config.max_num_batched_tokens
        ):
            bad(f"prompt longer than max_num_batched_tokens ({self.config.max_num_batched_tokens})")
        blocks = -(-(len(prompt) + p.max_tokens) // self.config.block_size)
        if blocks > self.pool.num_blocks:
            bad(f"the request needs {blocks} KV blocks, the pool has {self.pool.num_blocks}")
        if not (p.temperature >= 0.0 and p.temperature == p.temperature):
            bad(f"temperature must be >= 0, got {p.temperature}")
        if not 0.0 < p.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {p.top_p}")
        if p.top_k < -1:
            bad(f"top_k must be -1, 0 (off) or positive, got {p.top_k}")
        if not 0.0 <= p.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {p.min_p}")
        if not -2.0 <= p.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {p.presence_penalty}")
        if not -2.0 <= p.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}")
        if not p.repetition_penalty > 0.0:
            bad(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
        if not 0 <= p.logprobs <= 20:
            bad(f"logprobs must be in [0, 20], got {p.logprobs}")
        if p.seed is not None and p.seed < 0:
            bad(f"seed must be >= 0, got {p.seed}")
        if any(not 0 <= int(t) < self.vocab_size for t in p.stop_token_ids):
            bad(f"stop_token_ids must be in [0, {self.vocab_size})")
        if p.logit_bias:
            if any(not 0 <= int(t) < self.vocab_size for t in p.logit_bias):
                bad(f"logit_bias token ids must be in [0, {self.vocab_size})")
            if any(not -100.0 <= b <= 100.0 for b in p.logit_bias.values()):
                bad("logit_bias values must be in [-100, 100]")

    def abort_request(self, request_id: str) -> None:
        if request_id in self.requests:
            self._aborts.append(request_id)

    def abort_choices(self, request_id: str, indices: list[int]) -> None:
        """Ends some choices of an n > 1 request while the others go on (the gateway cut them at
        a stop string). Each cut choice ends with an ABORT output and its blocks are released
        within one step. Ignored: unknown requests and choices, beam search (its beams are not
        choices until it ends), and a request not yet forked (no choice has an output then)."""
        if request_id in self.requests and indices:
            self._choice_aborts.append((request_id, list(indices)))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step -------------------------------------------------------------------------------

    async def step(self) -> list[SequenceOutput]:
        if self.config.async_scheduling and not self.beams.active:
            return await self._step_async()
        outputs = []
        if self._inflight is not None:  # leaving async mode (a beam request came): land it
            outputs = await self._complete(self._inflight)
            self._inflight = None
        return outputs + await self._step_sync()

    async def _step_sync(self) -> list[SequenceOutput]:
        """Schedule, run, and return this step's tokens."""
        outputs = self._process_aborts()
        sched = await self._schedule()
        for seq in sched.failed:
            outputs.extend(self._fail(seq, "the sequence does not fit in the KV pool"))
        if sched.seqs:
            flight = self._launch_step(sched)
            # Overlapped with the device: commits of the blocks this step fills.
            commits = self.scheduler.commit_entries(sched.seqs)
            outputs.extend(await self._complete(flight, commits))
            self.num_steps += 1
        if not self.requests:
            await self.scheduler.drain()  # nothing in flight once idle (commits and releases)
        return outputs

    async def _step_async(self) -> list[SequenceOutput]:
        """Schedule and launch step t, then land step t-1 while t computes; returns t-1's
        tokens. Step t's inputs need no host value of t-1's tokens: they are gathered from
        token_buf on the device, where t-1's sampler wrote them (stream order). A sequence that
        t-1 finishes (EOS, stop id) has run one wasted token in t, dropped when t lands; one
        that finishes by length is not scheduled again (scheduler.py)."""
        outputs = self._process_aborts()
        sched = await self._schedule()
        for seq in sched.failed:
            outputs.extend(self._fail(seq, "the sequence does not fit in the KV pool"))
        flight = None
        if sched.seqs:
            if self.device.type != "cuda" and self._inflight is not None:
                # No stream orders host compute: let t-1 finish before t touches the buffers
                # (the landing order, which is what this mode changes, stays the same).
                await self._inflight.future
            flight = self._launch_step(sched)
        prev, self._inflight = self._inflight, flight
        if prev is not None:
            outputs.extend(await self._complete(prev))
        if flight is not None:
            sc = self.scheduler
            # t-1's tokens are known now: commit what step t fills (its KV is queued ahead of
            # any later reader on the stream).
            sc.defer(sc.commit_entries([q for q in sched.seqs if not q.is_finished]), [])
            self.num_steps += 1
        if not self.requests and self._inflight is None:
            await self.scheduler.drain()
        return outputs

    async def _schedule(self) -> SchedulerOutput:
        """The scheduler's step, the start of the step's times (step_times)."""
        self.step_times.begin()
        sched = await self.scheduler.schedule()
        self.step_times.scheduled(self.scheduler.kv_wait)
        return sched

    def _launch_step(self, sched: SchedulerOutput) -> _InFlight:
        """Prepare and submit the step's device work; then, overlapped with it, advance the
        sequences and reserve the coming steps' blocks. Each sampling sequence gets a
        placeholder token until the step lands."""
        if self.staging is not None:
            self.staging.next_step()
        with torch.inference_mode():
            batch = self._prepare(sched)
        loop = asyncio.get_running_loop()
        pending = None
        if self.device.type == "cuda":
            # Launch from this thread (a graph replay is one call), then wait for the device in
            # the worker, which holds no GIL meanwhile: nothing contends with the bookkeeping.
            pending = self._launch(batch, sched.copies)
            done = torch.cuda.Event()
            done.record()
            future = loop.run_in_executor(self._worker, done.synchronize)
        else:
            future = loop.run_in_executor(self._worker, self._execute, batch, sched.copies)
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
        self.scheduler.issue_lookahead(batch.lookahead_seqs)
        for seq in batch.sample_seqs:
            if seq.request.beam is None:  # beams append their own tokens (beam_engine.py)
                seq.token_ids.append(PLACEHOLDER)
        self.step_times.launched(sched.num_new_tokens, len(sched.admitted))
        return _InFlight(batch, future, pending)

    async def _complete(
        self, flight: _InFlight, commits: list | None = None
    ) -> list[SequenceOutput]:
        landing = time.perf_counter()
        result = await flight.future
        if flight.pending is not None:
            result = self._collect(flight.pending)
        outputs = await self._postprocess(flight.batch, result, commits or [])
        self.step_times.land = time.perf_counter() - landing
        return outputs

    def _process_aborts(self) -> list[SequenceOutput]:
        outputs: list[SequenceOutput] = []
        if not self._aborts and not self._choice_aborts:
            return outputs
        releases: list[str] = []
        for rid in self._aborts:
            req = self._drop(rid)
            if req is None:
                continue
            cut = [seq.index for seq in req.seqs if self._abort_seq(seq, releases)]
            # Before the fork the one sequence stands for all n choices, and beam search's n
            # results end together; after it, only the choices still going end now (one that
            # ended earlier, a cut choice too, already had its final output).
            indices = range(req.params.n) if not req.forked or req.beam is not None else cut
            outputs.extend(_aborted(req, i) for i in indices)
        self._aborts.clear()
        for rid, indices in self._choice_aborts:
            req = self.requests.get(rid)
            if req is None or req.beam is not None or not req.forked:
                continue
            wanted = set(indices)
            outputs.extend(
                _aborted(req, seq.index)
                for seq in req.seqs
                if seq.index in wanted and self._abort_seq(seq, releases)
            )
            if all(q.is_finished for q in req.seqs):
                self._drop(rid)
        self._choice_aborts.clear()
        self.scheduler.defer([], releases)
        return outputs

    def _abort_seq(self, seq: Sequence, releases: list[str]) -> bool:
        """Finishes `seq` as aborted, its blocks to be released with `releases`; False if it had
        finished already."""
        if seq.is_finished:
            return False
        if seq.status == SeqStatus.RUNNING and seq.block_table:
            releases.append(seq.seq_id)
        self._finish(seq, FinishReason.ABORT)
        return True

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.row >= 0 and not seq.block_table:
            # A child created for a fork that has not happened yet (async scheduling): it holds
            # a row but is in no queue.
            self.scheduler.free_rows.append(seq.row)
            seq.row = -1
            seq.status = SeqStatus.FINISHED
            seq.finish_reason = reason
            return
        self.scheduler.finish(seq, reason)

    def _drop(self, request_id: str) -> Request | None:
        self._special.discard(request_id)
        self._unforked.discard(request_id)
        return self.requests.pop(request_id, None)

    def _fail(self, seq: Sequence, error: str) -> list[SequenceOutput]:
        req = seq.request
        if req.beam is not None:
            return self.beams.fail(req, error)
        # Before the fork the one sequence stands for all n choices.
        indices = [seq.index] if req.forked else list(range(req.params.n))
        if all(q.is_finished for q in req.seqs):
            self._drop(req.request_id)
        return req.error_outputs(indices, error)

    def _prepare(self, sched: SchedulerOutput) -> Batch:
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
        # Sampling sequences whose tables fall short of the look-ahead target after this step.
        covered = np.fromiter((len(q.block_table) for q in seqs), np.int64, b) * bs
        target = np.minimum(seq_lens + 1 + self.config.num_lookahead_tokens, self.max_model_len)
        lookahead_seqs = [seqs[i] for i in np.flatnonzero(sampling & (covered < target)).tolist()]

        forks: list[tuple[Sequence, list[Sequence]]] = []
        if not self._unforked:
            sample_seqs = [seqs[i] for i in sample_idx.tolist()]
            logits_idx = cu[sample_idx + 1] - 1
            sample_rows = rows[sample_idx]
            sample_pos = totals[sample_idx]
        else:
            # n > 1: a parent whose prefill ends now samples n tokens from its one row of
            # logits; its n - 1 children are created here (they take reserved rows) and forked
            # after the step.
            sample_seqs = []
            idx: list[int] = []
            for i in sample_idx.tolist():
                seq = seqs[i]
                sample_seqs.append(seq)
                idx.append(int(cu[i + 1]) - 1)
                req = seq.request
                if req.params.n > 1 and not req.forked and req.beam is None:
                    children = self._make_children(seq)
                    forks.append((seq, children))
                    sample_seqs.extend(children)
                    idx.extend([int(cu[i + 1]) - 1] * len(children))
            n_s = len(sample_seqs)
            logits_idx = np.asarray(idx, np.int64)
            sample_rows = np.fromiter((q.row for q in sample_seqs), np.int64, n_s)
            sample_pos = np.fromiter((len(q.token_ids) for q in sample_seqs), np.int64, n_s)
        s = len(sample_seqs)

        packed = np.concatenate(
            [
                token_rows,
                positions,
                rows,
                seq_lens,
                cu,
                logits_idx,
                sample_rows,
                sample_pos,
            ]
        )
        dev_packed = self._h2d(packed)
        o = 0
        token_rows_d, o = dev_packed[o : o + t], o + t
        positions_d, o = dev_packed[o : o + t], o + t
        rows_d, o = dev_packed[o : o + b], o + b
        seq_lens_d, o = dev_packed[o : o + b], o + b
        cu_d, o = dev_packed[o : o + b + 1], o + b + 1
        logits_idx_d, o = dev_packed[o : o + s], o + s
        sample_rows_d, o = dev_packed[o : o + s], o + s
        sample_pos_d = dev_packed[o : o + s]

        for parent, children in forks:
            child_rows = self._h2d(np.asarray([c.row for c in children], np.int64))
            self.token_buf[child_rows] = self.token_buf[parent.row].clone()
        input_ids = self.token_buf[token_rows_d, positions_d]
        block_idx = self.block_tables[token_rows_d, positions_d // bs].long()
        slot_mapping = block_idx * bs + positions_d % bs
        attn = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=self.block_tables.index_select(0, rows_d),
            seq_lens=seq_lens_d.to(torch.int32),
            query_start_loc=cu_d.to(torch.int32),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
        )
        if self._special:
            params = [q.request.params for q in sample_seqs]
            gens = [q.generator for q in sample_seqs]
            st = build_sampling_tensors(params, gens, self.vocab_size, dev, self.staging)
        else:
            st = ALL_GREEDY
        return Batch(
            input_ids=input_ids,
            positions=positions_d,
            attn=attn,
            num_seqs=b,
            logits_index=logits_idx_d,
            sample_seqs=sample_seqs,
            sample_rows=sample_rows_d,
            sample_pos=sample_pos_d,
            forks=forks,
            st=st,
            lookahead_seqs=lookahead_seqs,
            sample_pos_host=sample_pos.tolist(),
            beam=self.beams.batch(sample_seqs),
        )

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
            self.token_buf.view(-1)[self._h2d(flat)] = self._h2d(vals)
        changed = [s for s in sched.seqs if s.num_synced_blocks != len(s.block_table)]
        if not changed:
            return
        rows, cols, vals = [], [], []
        for seq in changed:
            first = seq.num_synced_blocks
            k = len(seq.block_table) - first
            rows.append(np.full(k, seq.row, np.int64))
            cols.append(np.arange(first, first + k))
            vals.append(np.asarray(seq.block_table[first:], np.int64))
            seq.num_synced_blocks = len(seq.block_table)
        idx = self._h2d(np.stack([np.concatenate(rows), np.concatenate(cols)]))
        self.block_tables[idx[0], idx[1]] = self._h2d(np.concatenate(vals).astype(np.int32))

    def _make_children(self, parent: Sequence) -> list[Sequence]:
        req = parent.request
        req.forked = True
        self._unforked.discard(req.request_id)
        self.scheduler.reserved_rows -= req.params.n - 1
        children = []
        for index in range(1, req.params.n):
            child = self._new_seq(req, index, list(parent.token_ids))
            child.row = self.scheduler.take_row()
            child.status = SeqStatus.RUNNING
            child.num_cached_tokens = parent.num_cached_tokens
            child.arrival = parent.arrival
            children.append(child)
        return children

    @torch.inference_mode()
    def _execute(self, batch: Batch, copies: list[tuple[int, int]]) -> StepResult:
        """CPU: the whole step in the worker thread (the forward is host compute)."""
        return self._collect(self._launch(batch, copies))

    @torch.inference_mode()
    def _launch(self, batch: Batch, copies: list[tuple[int, int]]) -> _Pending:
        """Queue the step's device work (on CUDA nothing here waits for the device)."""
        if copies:
            mapping = self._h2d(np.asarray(copies, np.int64).reshape(-1, 2))
            kernels.copy_blocks(self.pool.key_caches, self.pool.value_caches, mapping)
        logits = None
        if self.graphs is not None and not batch.forks:
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
        counts = None
        if batch.st.presence is not None:
            length = max(batch.sample_pos_host, default=0) + 1
            tokens = self.token_buf[batch.sample_rows, :length]
            prompt_lens = self._h2d(np.asarray([q.num_prompt_tokens for q in batch.sample_seqs]))
            counts = token_counts(tokens, prompt_lens, batch.sample_pos, self.vocab_size)
        beam = None
        if batch.beam is not None:
            beam = candidates(logits, batch.beam, self.vocab_size)
        out: SamplerOutput = self.sampler(logits, batch.st, counts)
        self.token_buf[batch.sample_rows, batch.sample_pos] = out.token_ids
        if out.token_ids.is_cuda:
            # Queue the copies to (pinned) host memory now, ahead of whatever is launched next:
            # landing this step must not wait for the next one.
            assert self.staging is not None
            out = SamplerOutput(
                *(
                    None if t is None else self.staging.to_host(t)
                    for t in (out.token_ids, out.logprobs, out.top_ids, out.top_logprobs)
                )
            )
        return _Pending(out, beam)

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
        )

    async def _fork(self, forks: list[tuple[Sequence, list[Sequence]]], commits: list) -> None:
        """n > 1: the children share the parent's prompt blocks (copy-on-write). A child copies
        the parent's committed hashes at fork time, so the prompt's full blocks are committed
        first (and only those: a block past the prompt holds the parent's own tokens)."""
        sc = self.scheduler
        bs = self.config.block_size
        await sc.drain()
        if commits:
            await self.allocator.commit(commits)
        for parent, children in forks:
            if parent.is_finished:
                continue  # aborted before its fork: the children were finished with it
            full = parent.num_prompt_tokens // bs
            entries = [
                CommitEntry(parent.seq_id, i, parent.token_ids[i * bs : (i + 1) * bs])
                for i in range(parent.num_committed_blocks, full)
            ]
            if entries:
                await self.allocator.commit(entries)
                parent.num_committed_blocks = full
            tables = await self.allocator.fork(
                parent.seq_id, [c.seq_id for c in children], parent.num_prompt_tokens
            )
            parent.needs_extend = True  # its partial last block is shared now
            for child in children:
                child.block_table = list(tables[child.seq_id])
                child.num_computed_tokens = parent.num_prompt_tokens
                child.num_committed_blocks = min(parent.num_committed_blocks, full)
                child.needs_extend = True
                sc.running.append(child)

    async def _postprocess(
        self, batch: Batch, result: StepResult, commits: list
    ) -> list[SequenceOutput]:
        sc = self.scheduler
        if batch.forks:
            await self._fork(batch.forks, commits)
            commits = []
        outputs: list[SequenceOutput] = []
        releases: list[str] = []
        eos = self.eos_token_ids
        max_len = self.max_model_len
        lps_all, top_ids, top_lps = result.logprobs, result.top_ids, result.top_logprobs
        positions = batch.sample_pos_host
        for i, (seq, token) in enumerate(zip(batch.sample_seqs, result.token_ids, strict=True)):
            if seq.request.beam is not None:
                continue  # beams: after the loop
            if seq.is_finished:
                continue  # aborted, or finished by an earlier token while this one computed
            pos = positions[i]
            tokens = seq.token_ids
            tokens[pos] = token
            req = seq.request
            p = req.params
            lps: list[TokenLogprob] = []
            if lps_all is not None and (p.return_logprobs or p.logprobs):
                lp = lps_all[i]
                seq.cumulative_logprob += lp
                top = []
                if p.logprobs and top_ids is not None and top_lps is not None:
                    k = p.logprobs
                    top = list(zip(top_ids[i][:k], top_lps[i][:k], strict=True))
                lps.append(TokenLogprob(token, lp, top))
            reason = FinishReason.NONE
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
                )
            )
            if reason != FinishReason.NONE:
                del tokens[pos + 1 :]  # a placeholder of a step that ran past the end
                if seq.status == SeqStatus.RUNNING:  # (a preempted one holds no blocks)
                    releases.append(seq.seq_id)
                self._finish(seq, reason)
                if all(q.is_finished for q in req.seqs):
                    self._drop(req.request_id)
        if batch.beam is not None and result.beam is not None:
            done, commits = await self.beams.postprocess(batch.beam, result.beam, commits, releases)
            outputs.extend(done)
        sc.defer(commits, releases)
        return outputs
