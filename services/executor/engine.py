"""LLMEngine: token ids in, tokens out, one scheduler step at a time (API: engine_api.py).

A step: schedule (scheduler.py) -> the model runner builds the batch's inputs on the device and
launches forward + sample (model_runner.py) -> (overlapped with the device) the sequences advance
and the link reserves the next steps' blocks (allocator_link.py) -> the tokens land: the
scheduler's postprocess finishes, commits, releases (in the background), beams decide their
rounds (beam_engine.py). The engine itself keeps the requests, their aborts, and the step loop.

With async scheduling (the CUDA default) step t is launched before step t-1 lands, which hides
the host's per-step work behind the device; sampled tokens are placeholders on the host until
their step lands (sequence.PLACEHOLDER), and outputs come one step later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import time
from typing import Any

import torch
from pagemesh.services.executor.beam_engine import BeamSearchRunner
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine_api import (
    FinishReason,
    Guide,
    PromptTokens,
    SamplingParams,
    SequenceOutput,
)
from pagemesh.services.executor.grammar import (
    GrammarBatch,
    GrammarCompiler,
    default_fill_threads,
)
from pagemesh.services.executor.kv_pool import KVPool
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.executor.model.llama import LlamaForCausalLM
from pagemesh.services.executor.model_runner import Batch, InFlight, ModelRunner, StepResult
from pagemesh.services.executor.prompt_ids import PromptIds
from pagemesh.services.executor.scheduler import Scheduler, SchedulerOutput
from pagemesh.services.executor.sequence import (
    PROMPT_LOGPROBS_SALT,
    Request,
    SeqStatus,
    Sequence,
    new_sequence,
)
from pagemesh.services.executor.trace import StepTimes
from pagemesh.services.executor.validation import validate_request
from pagemesh.services.kvmanager.api import (
    AllocatorUnavailable,
    BlockAllocator,
    CommitEntry,
    StaleEpoch,
)

log = logging.getLogger(__name__)

# How long a stopping engine waits for kvmanager to take its last commits and releases.
CLOSE_FLUSH_S = 2.0

# What a client reads when its request ends for a transient reason (the gateway may send it to
# another executor first): no addresses or internals, and that a retry helps.
OUTAGE_ERROR = "the KV cache manager was unreachable for too long; retry the request"
STALE_ERROR = (
    "the executor re-registered with the KV cache manager and dropped the request; retry it"
)


def _aborted(req: Request, index: int) -> SequenceOutput:
    """The final output of choice `index` of an aborted request (or of a cut choice)."""
    return SequenceOutput(
        req.request_id, index, [], FinishReason.ABORT, num_prompt_tokens=req.num_prompt_tokens
    )


def _rejected(req: Request, error: str) -> SequenceOutput:
    """A request refused after add_request returned (its guide did not compile): one output
    ends all of it, and the gateway answers 400."""
    return SequenceOutput(req.request_id, 0, [], FinishReason.ERROR, error=error, rejected=True)


class LLMEngine:
    # Set by start(): the model's limits, and the parts that own each job.
    max_model_len: int
    vocab_size: int
    eos_token_ids: set[int]
    max_blocks: int
    kv_fingerprint: str
    runner: ModelRunner  # the device side
    scheduler: Scheduler  # queues, rows, tables; kvmanager through scheduler.link
    beams: BeamSearchRunner
    grammars: GrammarCompiler  # structured output: guides -> grammars, cached
    guided: GrammarBatch  # ... and each step's matchers and masks

    def __init__(
        self,
        config: EngineConfig,
        allocator: BlockAllocator,
        *,
        model: LlamaForCausalLM | None = None,
        model_config: ModelConfig | None = None,
        model_fingerprint: str | None = None,
    ) -> None:
        """`model`/`model_config` may be given pre-built (random-weight benchmarks, tests that
        share one loaded model); otherwise `start()` resolves and loads `config.model`."""
        self.config = config
        # The allocator as given (tests read its state); every call goes through the link.
        self.allocator = allocator
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.model = model
        self.model_config = model_config
        self.model_path = ""
        self.model_fingerprint = model_fingerprint or ""
        self.requests: dict[str, Request] = {}
        # Requests whose sampling is not plain greedy: while there is none, a step takes the
        # fast path (no per-row sampling tensors).
        self._special: set[str] = set()
        self._aborts: list[str] = []
        self._choice_aborts: list[tuple[str, list[int]]] = []  # (request id, choice indices)
        self._inflight: InFlight | None = None  # async scheduling: the step not landed yet
        # The step that ended the last request left kvmanager business behind (the last
        # commits and releases, calls in flight): the next step() settles it before anything
        # else, so that step's outputs went to the gateway without waiting for a round trip.
        self._drain_owed = False
        self.started = False
        self._heartbeats: asyncio.Task[None] | None = None
        self.epoch = 0
        self.num_steps = 0
        self.step_times = StepTimes()  # the last step's, for --trace-steps (trace.py)
        self._prompt_ids = PromptIds()  # add_request's conversion (prompt_ids.py)
        # Guided requests whose grammar is compiling (a cache miss): request id -> (its one
        # sequence, the compile, the monotonic deadline). Not scheduled until it is ready.
        self._compiling: dict[str, tuple[Sequence, concurrent.futures.Future[Any], float]] = {}

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

        self.runner = ModelRunner(cfg, self.model, mc, self.max_model_len, self.device, self.dtype)
        self.scheduler = Scheduler(cfg, self.allocator, self.max_model_len, self.eos_token_ids)
        tier = self.runner.host_tier
        self.epoch = await self.scheduler.link.register(
            self.runner.pool.num_blocks,
            cfg.block_size,
            self.kv_fingerprint,
            tier.num_blocks if tier is not None else 0,
            tier.block_bytes if tier is not None else 0,
        )
        self.beams = BeamSearchRunner(
            self.scheduler, self.runner, self.eos_token_ids, self.max_model_len, self._drop
        )
        self.grammars = GrammarCompiler(
            cfg.tokenizer or self.model_path or cfg.model, self.vocab_size, list(self.eos_token_ids)
        )
        self.guided = GrammarBatch(
            self.vocab_size,
            self.eos_token_ids,  # (the grammars' stop tokens: GrammarCompiler above)
            pin=self.device.type == "cuda",
            threads=cfg.grammar_fill_threads or default_fill_threads(),
            max_rows=cfg.max_num_seqs,
        )
        if cfg.served_model_name:  # a fleet member: keep kvmanager hearing from it when idle
            self._heartbeats = asyncio.create_task(self.scheduler.link.heartbeats())
        self.started = True

    async def close(self) -> None:
        """Stops the engine's background work (the fleet heartbeats) and sends kvmanager what
        waits (the last commits and releases: a shutdown loses no index entry), for at most
        CLOSE_FLUSH_S."""
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeats
            self._heartbeats = None
        if self.started:
            try:
                await asyncio.wait_for(self.scheduler.drain(), CLOSE_FLUSH_S)
            except Exception as exc:  # (kvmanager gone first: nothing more to do)
                log.warning("last commits and releases not sent: %s", exc)
            self.grammars.close()

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

    @property
    def pool(self) -> KVPool:
        """The physical KV pool (its size is part of the executor's info)."""
        return self.runner.pool

    # -- API ------------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: PromptTokens,
        params: SamplingParams,
        cache_salt: str = "",
    ) -> None:
        if not self.started:
            raise RuntimeError("LLMEngine.start() has not been awaited")
        prompt, packed, lo, hi = self._prompt_ids.convert(prompt_token_ids)
        if not request_id:
            raise ValueError("request_id must not be empty")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        validate_request(
            len(prompt),
            params,
            lo,
            hi,
            config=self.config,
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            num_blocks=self.runner.pool.num_blocks,
        )
        if params.guide is not None and params.use_beam_search:
            raise ValueError("structured output (a guide) does not work with beam search")
        if params.prompt_logprobs is not None:
            # Every prompt position needs its logits, so no prefix hit: under a salt of its own
            # that nothing commits to (scheduler.commit_entries), its blocks are never found.
            cache_salt += PROMPT_LOGPROBS_SALT
        req = Request(request_id, params, cache_salt, len(prompt), prompt_data=packed)
        seq = new_sequence(req, 0, prompt)
        if params.guide is not None and not self._attach_grammar(seq, params.guide):
            self.requests[request_id] = req
            return  # scheduled once its grammar is compiled (_admit_guided)
        self.requests[request_id] = req
        if params.use_beam_search:
            self.beams.add(req)  # beams fork after each round, not after the prefill
        if not (
            params.temperature < 1e-5
            and not params.logprobs
            and not params.return_logprobs
            and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0
            and params.repetition_penalty == 1.0
            and not params.logit_bias
            and params.prompt_logprobs is None
        ):
            self._special.add(request_id)
        self.scheduler.add(seq)

    def _attach_grammar(self, seq: Sequence, guide: Guide) -> bool:
        """Gives `seq` a matcher when its grammar is cached; otherwise starts the compile and
        parks the sequence (False)."""
        compiled = self.grammars.lookup(guide)
        if compiled is not None:
            seq.matcher = self.grammars.matcher(compiled)
            return True
        deadline = time.monotonic() + self.config.grammar_compile_timeout_s
        self._compiling[seq.request.request_id] = (seq, self.grammars.submit(guide), deadline)
        return False

    async def _admit_guided(self) -> list[SequenceOutput]:
        """Parked guided requests whose compile ended: scheduled, or refused (a compile error,
        or past the time bound: the compile thread runs on, its result cached for next time,
        but this request is answered now). With nothing else to run, waits for a compile (50
        ms at most, so new requests and aborts are not held up)."""
        if not self._compiling:
            return []
        idle = not self.scheduler.has_unfinished() and self._inflight is None
        if idle:
            pending = {f for _, f, _ in self._compiling.values()}  # (one per distinct guide)
            if not any(f.done() for f in pending):
                wait = min(d for _, _, d in self._compiling.values()) - time.monotonic()
                await asyncio.wait(
                    [asyncio.wrap_future(f) for f in pending],
                    timeout=max(0.0, min(wait, 0.05)),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        outputs: list[SequenceOutput] = []
        now = time.monotonic()
        if not self.grammars.ready:  # the one-off tokenizer set-up is no compile: not counted
            limit = self.config.grammar_compile_timeout_s
            for rid, (seq, future, _) in list(self._compiling.items()):
                self._compiling[rid] = (seq, future, now + limit)
        for rid, (seq, future, deadline) in list(self._compiling.items()):
            guide = seq.params.guide
            assert guide is not None
            if future.done():
                del self._compiling[rid]
                try:
                    compiled = future.result()
                except Exception as exc:
                    self.grammars.forget(guide)
                    self._drop(rid)
                    outputs.append(_rejected(seq.request, f"invalid guide: {exc}"))
                    continue
                self.grammars.store(guide, compiled)
                seq.matcher = self.grammars.matcher(compiled)
                self.scheduler.add(seq)
            elif now >= deadline:
                del self._compiling[rid]
                self._drop(rid)
                limit = self.config.grammar_compile_timeout_s
                outputs.append(
                    _rejected(seq.request, f"the guide took longer than {limit:g} s to compile")
                )
        return outputs

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
        """Requests, a step in flight, or kvmanager business of its own (what the last request
        left to send, an outage to reconcile, a stale epoch to re-register): the loop steps
        while this holds."""
        if self.requests or self._inflight is not None or self._drain_owed:
            return True
        link = self.scheduler.link if self.started else None
        return link is not None and (link.riding or link.stale)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def prefix_caching(self) -> bool:
        return self.config.enable_prefix_caching

    def kv_occupancy(self) -> tuple[int, int, int]:
        return self.scheduler.kv_occupancy()

    # -- the step -------------------------------------------------------------------------------

    async def step(self) -> list[SequenceOutput]:
        if self._drain_owed:
            self._drain_owed = False
            if not self.scheduler.waiting:
                await self._drain()
                return []
            # A request came meanwhile: its admission round carries what waits in the same
            # call (kvmanager applies a Step call's commits and releases before its
            # admissions, and the calls in flight land first), so its prefix hits the blocks
            # just committed at the cost of one round trip, not two.
        outputs = await self._kvmanager_news()
        outputs += await self._admit_guided()
        try:
            if self.config.async_scheduling and not self.beams.active:
                return outputs + await self._step_async()
            if self._inflight is not None:  # leaving async mode (a beam request came): land it
                outputs += await self._complete(self._inflight)
                self._inflight = None
            return outputs + await self._step_sync()
        except (AllocatorUnavailable, StaleEpoch):
            # A beam round's fork kvmanager could not make, mid-step (beams are not scheduled
            # during an outage, but one may begin under a step): the step's sequences are past
            # what can be resumed, so every request ends, retryably (the link noted the outage
            # or the stale epoch; their blocks go back with the reconcile).
            return outputs + self._fail_requests(list(self.requests), OUTAGE_ERROR, True)

    async def _drain(self) -> None:
        """The owed drain, a step of its own (no sequences) in the step times: its schedule
        time is the wait for kvmanager."""
        link = self.scheduler.link
        self.step_times.begin()
        link.kv_wait = 0.0
        await self.scheduler.drain()
        self.step_times.scheduled(link.kv_wait)

    def _owe_drain(self) -> None:
        """The engine has gone idle: what it still owes kvmanager is sent by the next step(),
        once this one's outputs are on their way. Like vLLM's and SGLang's frees, the release
        still comes before the next schedule; being a kvmanager round trip here (~1 ms over
        gRPC), it no longer comes before the last token."""
        self._drain_owed = self.scheduler.link.has_unsettled

    async def _kvmanager_news(self) -> list[SequenceOutput]:
        """Before a step: re-registers after a stale epoch (the running requests end,
        retryably: their blocks were the old epoch's), and fails every request once kvmanager
        has been unreachable for longer than the bound."""
        link = self.scheduler.link
        if link.stale:
            with contextlib.suppress(AllocatorUnavailable):  # (an outage: the bound applies)
                self.epoch = await link.reregister()
                running = {s.request.request_id for s in self.scheduler.running}
                running.update(s.request.request_id for s in self.scheduler.spawned)
                return self._fail_requests(sorted(running), STALE_ERROR, release=False)
        if link.riding and link.outage_seconds() > self.config.kvmanager_outage_timeout:
            return self._fail_requests(list(self.requests), OUTAGE_ERROR)
        return []

    def _fail_requests(
        self, request_ids: list[str], error: str, release: bool = True
    ) -> list[SequenceOutput]:
        """Ends these requests with a retryable ERROR; `release`: their blocks go back to
        kvmanager (deferred like any release), else kvmanager holds none of them."""
        sc = self.scheduler
        releases: list[str] = []
        outputs: list[SequenceOutput] = []
        for rid in request_ids:
            req = self._drop(rid)
            if req is None:
                continue
            self.beams.active.discard(rid)
            ended = []
            for seq in req.seqs:
                if seq.is_finished:
                    continue
                if seq.status == SeqStatus.RUNNING and seq.block_table:
                    releases.append(seq.seq_id)
                sc.finish(seq, FinishReason.ERROR)
                ended.append(seq.index)
            # As for an abort: before the fork the one sequence stands for all n choices.
            indices = range(req.params.n) if not req.forked or req.beam is not None else ended
            outputs.extend(req.error_outputs(indices, error, retryable=True))
        if release:
            sc.link.defer([], releases)
        return outputs

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
            if flight.forward is not None:  # constrained rows: their masks, then the sampling
                self._sample_guided(flight)
            outputs.extend(await self._complete(flight, commits))
            self.num_steps += 1
        if not self.requests:
            self._owe_drain()  # nothing in flight once idle (commits and releases)
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
                # (A guided step's sampling was submitted when it was launched: it has one.)
                assert self._inflight.future is not None
                await self._inflight.future
            flight = self._launch_step(sched)
        prev, self._inflight = self._inflight, flight
        if prev is not None:
            outputs.extend(await self._complete(prev))
        if flight is not None and flight.forward is not None:
            # Constrained rows: t-1's tokens have landed and advanced their matchers, so t's
            # masks can be filled now, while the device runs t's forward; then t samples.
            self._sample_guided(flight)
        if flight is not None:
            sc = self.scheduler
            # t-1's tokens are known now: commit what step t fills (its KV is queued ahead of
            # any later reader on the stream).
            sc.link.defer(sc.commit_entries(sched.seqs), [])
            self.num_steps += 1
        if not self.requests and self._inflight is None:
            self._owe_drain()
        return outputs

    def _sample_guided(self, flight: InFlight) -> None:
        batch = flight.batch
        self.runner.sample(flight, self.guided.fill(batch.sample_seqs, batch.guided))

    async def _schedule(self) -> SchedulerOutput:
        """The scheduler's step, the start of the step's times (step_times)."""
        self.step_times.begin()
        sched = await self.scheduler.schedule()
        self.step_times.scheduled(self.scheduler.link.kv_wait)
        return sched

    def _launch_step(self, sched: SchedulerOutput) -> InFlight:
        """Submit the step's device work; then, overlapped with it, advance the sequences and
        reserve the coming steps' blocks."""
        flight = self.runner.launch(sched, bool(self._special), bool(self.beams.active))
        batch = flight.batch
        if self.beams.active and batch.beam is None:
            self.beams.prune(self.requests)
        self.scheduler.launched(sched, batch.sample_seqs, batch.lookahead_seqs)
        admitted = [seq.request.request_id for seq in sched.admitted]
        self.step_times.launched(sched.num_new_tokens, admitted)
        return flight

    async def _complete(
        self, flight: InFlight, commits: list[CommitEntry] | None = None
    ) -> list[SequenceOutput]:
        landing = time.perf_counter()
        result = await self.runner.result(flight)
        outputs = await self._postprocess(flight.batch, result, commits or [])
        times = self.step_times
        times.landed = time.perf_counter()
        times.land = times.landed - landing
        return outputs

    async def _postprocess(
        self, batch: Batch, result: StepResult, commits: list[CommitEntry]
    ) -> list[SequenceOutput]:
        sc = self.scheduler
        if result.prompt_logprobs:
            sc.add_prompt_logprobs(result.prompt_logprobs)
        failed: list[SequenceOutput] = []
        if batch.forks:
            try:
                await sc.fork(batch.forks, commits)
            except (AllocatorUnavailable, StaleEpoch):
                # kvmanager went away (or the epoch went stale) under this step: these n > 1
                # requests end, retryably, and the step's other sequences go on. The step's
                # commits are dropped (those blocks stay unshared: whether kvmanager took them
                # before it went is unknown).
                rids = sorted({f.parent.request.request_id for f in batch.forks})
                failed = self._fail_requests(rids, OUTAGE_ERROR)
            commits = []
        refused = None
        if batch.guided:
            refused = self.guided.accept(batch.sample_seqs, result.token_ids, batch.guided)
        update = sc.postprocess(
            batch.sample_seqs,
            batch.sample_pos_host,
            result.token_ids,
            result.logprobs,
            result.top_ids,
            result.top_logprobs,
            refused,
        )
        for rid in update.finished_requests:
            self._drop(rid)
        outputs = failed + update.outputs
        if batch.beam is not None and result.beam is not None:
            done, commits = await self.beams.postprocess(
                batch.beam, result.beam, commits, update.releases
            )
            outputs.extend(done)
        sc.link.defer(commits, update.releases)
        return outputs

    def _process_aborts(self) -> list[SequenceOutput]:
        outputs: list[SequenceOutput] = []
        if not self._aborts and not self._choice_aborts:
            return outputs
        sc = self.scheduler
        releases: list[str] = []
        for rid in self._aborts:
            req = self._drop(rid)
            if req is None:
                continue
            cut = [seq.index for seq in req.seqs if sc.abort(seq, releases)]
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
                if seq.index in wanted and sc.abort(seq, releases)
            )
            if all(q.is_finished for q in req.seqs):
                self._drop(rid)
        self._choice_aborts.clear()
        sc.link.defer([], releases)
        return outputs

    def _drop(self, request_id: str) -> Request | None:
        self._special.discard(request_id)
        self._compiling.pop(request_id, None)
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
