"""Property test: random sequences of scheduler operations keep the scheduler's invariants.

A hypothesis state machine drives the Scheduler (and its AllocatorLink) the way the engine does,
over the real in-process allocator (kvmanager's core) and no model: requests are added (n > 1
among them), aborted whole or one choice at a time, sequences preempted, and steps run with
sampled token ids drawn by hypothesis (id 0 is EOS). The pool is small, so preemption, failed
admissions and copy-on-write forks all happen. After every operation:
- `Scheduler.check()`: queues, rows, reservations, tables cover what was computed, ...;
- kvmanager's own invariants (Manager.check) and no error logged by the link (a commit or
  release kvmanager refused would mean the scheduler sent something out of order);
and after a settle, the scheduler's tables equal kvmanager's, sequence for sequence, and
kvmanager holds no sequence the scheduler does not run (nothing leaked).
"""

from __future__ import annotations

import asyncio
import logging

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from pagemesh.proto import packed_ids
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.scheduler import Scheduler, SchedulerOutput
from pagemesh.services.executor.sequence import Request, Sequence, new_sequence
from pagemesh.services.kvmanager.local import LocalAllocator

BS = 4
NUM_BLOCKS = 9
MAX_MODEL_LEN = 40
EOS = 0
# A few shared prefixes (whole blocks and a partial one), so prefix hits and sharing happen.
# The 4-block one outlasts a step's budget: a prompt sharing it can arrive while it prefills.
PREFIXES = [[], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9], [5, 5, 5, 5], [7] * 16]


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.alloc = LocalAllocator("ex")
        self.requests: dict[str, Request] = {}
        self.n = 0
        self.errors = _Errors()
        logging.getLogger("pagemesh.services.executor.allocator_link").addHandler(self.errors)
        self.sc: Scheduler

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        logging.getLogger("pagemesh.services.executor.allocator_link").removeHandler(self.errors)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    @initialize(
        lookahead=st.sampled_from([0, 2, 6]),
        chunked=st.booleans(),
        prefix_caching=st.booleans(),
    )
    def start(self, lookahead: int, chunked: bool, prefix_caching: bool) -> None:
        self.run(self.alloc.register(NUM_BLOCKS, BS, "fp"))
        cfg = EngineConfig(
            model="none",
            device="cpu",
            block_size=BS,
            max_num_seqs=5,
            max_num_batched_tokens=12,
            num_lookahead_tokens=lookahead,
            enable_chunked_prefill=chunked,
            enable_prefix_caching=prefix_caching,
        )
        self.sc = Scheduler(cfg, self.alloc, MAX_MODEL_LEN, {EOS})
        if self.sc.inflight is not None:
            # The prefixes here are 1-2 blocks: let a single shared block in flight hold a
            # prompt back, so admissions past a waiting one happen (inflight_prefill.py).
            self.sc.inflight.min_shared_blocks = 1

    # -- what the engine does -------------------------------------------------------------------

    @rule(
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(1, 6), min_size=1, max_size=10),
        max_tokens=st.integers(1, 14),
        n=st.sampled_from([1, 1, 2, 3]),
        ignore_eos=st.booleans(),
    )
    def add(self, prefix: list[int], tail: list[int], max_tokens: int, n: int, ignore_eos: bool):
        prompt = prefix + tail
        if not self.sc.config.enable_chunked_prefill:
            prompt = prompt[: self.sc.config.max_num_batched_tokens]
        # What add_request refuses: past the context or the whole pool.
        max_tokens = min(max_tokens, MAX_MODEL_LEN - len(prompt), NUM_BLOCKS * BS - len(prompt))
        self.n += 1
        rid = f"r{self.n}"
        params = SamplingParams(n=n, max_tokens=max_tokens, ignore_eos=ignore_eos)
        req = Request(rid, params, "", len(prompt), prompt_data=packed_ids.pack(prompt))
        self.requests[rid] = req
        self.sc.add(new_sequence(req, 0, list(prompt)))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        """engine._process_aborts for one request."""
        rid = data.draw(st.sampled_from(sorted(self.requests)))
        req = self.requests.pop(rid)
        releases: list[str] = []
        for seq in req.seqs:
            self.sc.abort(seq, releases)
        self.sc.link.defer([], releases)

    @precondition(lambda self: any(r.forked for r in self.requests.values()))
    @rule(data=st.data())
    def abort_choice(self, data: st.DataObject) -> None:
        """engine._process_aborts for one choice of a forked n > 1 request."""
        rid = data.draw(st.sampled_from(sorted(r for r, q in self.requests.items() if q.forked)))
        req = self.requests[rid]
        index = data.draw(st.integers(0, req.params.n - 1))
        releases: list[str] = []
        for seq in req.seqs:
            if seq.index == index:
                self.sc.abort(seq, releases)
        if all(q.is_finished for q in req.seqs):
            del self.requests[rid]
        self.sc.link.defer([], releases)
        event("choice aborted")

    @precondition(lambda self: self.sc.running)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        """Any running sequence, not only the newest (the scheduler's own choice): a preemption
        follows a settle, as in the scheduler."""
        self.run(self.sc.drain())
        if not self.sc.running:
            return
        victim = data.draw(st.sampled_from(self.sc.running))
        self.run(self.sc.preempt(victim))
        event("preempted by the test")

    @rule(data=st.data(), steps=st.integers(1, 8))
    def step(self, data: st.DataObject, steps: int) -> None:
        for _ in range(steps):
            self.run(self._step(data))
            self.scheduler_invariants()

    async def _step(self, data: st.DataObject) -> None:
        """engine._step_sync, with the model runner's sampling rows and the sampled token ids
        drawn here."""
        sc = self.sc
        held_back = sc.inflight.num_deferred if sc.inflight is not None else 0
        out: SchedulerOutput = await sc.schedule()
        if sc.inflight is not None and sc.inflight.num_deferred > held_back:
            event("a prompt held back behind a prefill in flight")
        if out.num_preempted:
            event("preempted by the scheduler")
        for seq in out.failed:  # engine._fail (no beams here)
            event("failed admission")
            req = seq.request
            if all(q.is_finished for q in req.seqs):
                self.requests.pop(req.request_id, None)
        if out.seqs:
            for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
                assert n > 0
                assert len(seq.block_table) * BS >= seq.num_computed_tokens + n, (
                    f"{seq.seq_id}: the table must cover the step's writes"
                )
            # The model runner's sampling rows: sequences whose tokens all get computed, each
            # n > 1 parent followed by its new children; the look-ahead list is the sampling
            # sequences short of the target.
            children_of = {f.parent: f.children for f in out.forks}
            sample: list[Sequence] = []
            lookahead: list[Sequence] = []
            for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
                if seq.num_computed_tokens + n == seq.num_tokens:
                    sample.append(seq)
                    sample.extend(children_of.get(seq, []))
                    end = seq.num_computed_tokens + n
                    target = min(end + 1 + sc.config.num_lookahead_tokens, MAX_MODEL_LEN)
                    if len(seq.block_table) * BS < target:
                        lookahead.append(seq)
            positions = [q.num_tokens for q in sample]
            sc.launched(out, sample, lookahead)
            commits = sc.commit_entries(out.seqs)
            await asyncio.sleep(0)  # the device computes; a Step call goes out meanwhile
            tokens = data.draw(
                st.lists(st.integers(0, 20), min_size=len(sample), max_size=len(sample))
            )
            if out.forks:
                event("forked")
                await sc.fork(out.forks, commits)
                commits = []
            update = sc.postprocess(sample, positions, tokens, None, None, None)
            for rid in update.finished_requests:
                self.requests.pop(rid, None)
            sc.link.defer(commits, update.releases)
        if not self.requests:
            await sc.drain()

    @rule()
    def settle_and_compare(self) -> None:
        """Every call landed: the scheduler's view and kvmanager's agree."""
        sc = self.sc
        self.run(sc.drain())
        ex = self.alloc.manager.executors["ex"]
        running = {s.seq_id: s for s in sc.running}
        assert set(ex.seqs) == set(running), (
            f"kvmanager holds {sorted(ex.seqs)}, the scheduler runs {sorted(running)}"
        )
        for sid, seq in running.items():
            assert ex.seqs[sid].blocks == seq.block_table, sid

    @invariant()
    def scheduler_invariants(self) -> None:
        if not hasattr(self, "sc"):
            return
        self.sc.check()
        self.alloc.manager.check()
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]
        # Every live request is known to the scheduler (running, waiting, or made its children).
        for req in self.requests.values():
            assert not all(q.is_finished for q in req.seqs), req.request_id


SchedulerMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=60,
    deadline=None,
    derandomize=True,  # the same examples every run: CI sees no flakes
    suppress_health_check=[HealthCheck.too_slow],
)
TestScheduler = SchedulerMachine.TestCase
