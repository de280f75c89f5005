"""The scheduler over the in-process allocator, without a model: token budget and chunked
prefill, look-ahead reservations (no step waits on the allocator, few calls a step), prefix hits,
preemption."""

from __future__ import annotations

import asyncio
import random

from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.scheduler import Scheduler
from pagemesh.services.executor.sequence import Request, SeqStatus, Sequence
from pagemesh.services.kvmanager.local import LocalAllocator

BS = 16


class CountingAllocator(LocalAllocator):
    """Counts synchronous Extends (a step waiting on the allocator) and Step calls."""

    def __init__(self) -> None:
        super().__init__()
        self.extends = 0  # synchronous: outside a Step call
        self.step_calls = 0
        self.lookahead_calls = 0  # Step calls with an extend part
        self.admission_calls = 0  # Step calls with admissions
        self._in_step = False

    async def extend(self, entries):
        self.extends += not self._in_step
        return await super().extend(entries)

    async def step(
        self, commits, releases, extends, admits=None, admit_token_budget=0, *, load=None
    ):
        self.step_calls += 1
        self.lookahead_calls += bool(extends)
        self.admission_calls += bool(admits)
        self._in_step = True
        try:
            return await super().step(
                commits, releases, extends, admits, admit_token_budget, load=load
            )
        finally:
            self._in_step = False


async def _scheduler(num_blocks: int = 64, **kw) -> tuple[Scheduler, CountingAllocator]:
    alloc = CountingAllocator()
    await alloc.register(num_blocks, BS, "test-model")
    cfg = EngineConfig(model="none", device="cpu", block_size=BS, **kw)
    return Scheduler(cfg, alloc, max_model_len=4096), alloc


def _seq(rid: str, tokens: list[int], max_tokens: int = 1000) -> Sequence:
    req = Request(rid, SamplingParams(max_tokens=max_tokens), "", len(tokens))
    seq = Sequence(rid, req, 0, list(tokens), len(tokens), arrival=0)
    req.seqs.append(seq)
    return seq


async def _step(sc: Scheduler, token: int = 7):
    """What the engine does around the forward: advance, look ahead, sample, commit."""
    out = await sc.schedule()
    sampling = []
    for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
        assert len(seq.block_table) * BS >= seq.num_computed_tokens + n, "table must cover writes"
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == len(seq.token_ids):
            sampling.append(seq)
    sc.link.issue_lookahead(sampling)
    await asyncio.sleep(0)  # the device computes; the Step call (if any) goes out meanwhile
    for seq in sampling:
        seq.token_ids.append(token)
    sc.link.defer(sc.commit_entries(out.seqs), [])
    return out


async def test_token_budget_chunks_prefill() -> None:
    sc, _ = await _scheduler(max_num_batched_tokens=64, max_num_seqs=4)
    a, b = _seq("a", list(range(100))), _seq("b", list(range(200, 260)))
    sc.add(a)
    sc.add(b)
    out = await _step(sc)
    assert [(s.seq_id, n) for s, n in zip(out.seqs, out.num_new_tokens, strict=True)] == [("a", 64)]
    out = await _step(sc)
    assert [(s.seq_id, n) for s, n in zip(out.seqs, out.num_new_tokens, strict=True)] == [
        ("a", 36),
        ("b", 28),
    ]
    out = await _step(sc)  # a decodes, b finishes its prompt
    assert [(s.seq_id, n) for s, n in zip(out.seqs, out.num_new_tokens, strict=True)] == [
        ("a", 1),
        ("b", 32),
    ]
    assert len(a.token_ids) == 102 and len(b.token_ids) == 61


async def test_lookahead_batched_and_no_sync_extend() -> None:
    sc, alloc = await _scheduler(num_lookahead_tokens=8)
    seqs = [_seq(f"s{i}", [i] * (20 + i)) for i in range(4)]
    for s in seqs:
        sc.add(s)
    await _step(sc)
    for _ in range(64):
        await _step(sc)  # asserts that every table covers its step's writes
    assert alloc.extends == 0, "no step waited on a synchronous Extend"
    # 4 sequences x 64 tokens = 16 blocks of growth: batched, and most steps make no call.
    assert 3 <= alloc.lookahead_calls <= 16, alloc.lookahead_calls


async def test_a_large_batch_makes_a_call_every_few_steps() -> None:
    """256 decoding sequences cross a block boundary at 16 different steps: still one call per
    (num_lookahead_tokens - URGENT_TOKENS) steps or so, carrying the commits along."""
    sc, alloc = await _scheduler(num_blocks=4096, max_num_seqs=256, num_lookahead_tokens=8)
    seqs = [_seq(f"s{i}", [i + 1] * (17 + i % 16)) for i in range(256)]
    for s in seqs:
        sc.add(s)
    await _step(sc)
    calls_before = alloc.step_calls
    steps = 96
    for _ in range(steps):
        await _step(sc)
    calls = alloc.step_calls - calls_before
    assert alloc.extends == 0
    # Old behaviour: an Extend and a Commit call on nearly every step (~2 x 96).
    assert calls <= steps // 5, calls
    await sc.drain()
    ex = alloc.manager.executors[alloc.executor_id]
    for seq in seqs:  # every full block's commit reached kvmanager
        assert len(ex.seqs[seq.seq_id].hashes) == seq.num_computed_tokens // BS
        assert ex.seqs[seq.seq_id].blocks == seq.block_table


async def test_prefix_hit_skips_cached_tokens() -> None:
    sc, _ = await _scheduler()
    prompt = list(range(1000, 1050))
    a = _seq("a", prompt)
    sc.add(a)
    await _step(sc)
    sc.finish(a, a.finish_reason)
    sc.link.defer([], ["a"])
    b = _seq("b", [*prompt[:40], 1, 2, 3])
    sc.add(b)
    out = await sc.schedule()
    assert b.num_cached_tokens == 32  # two full committed blocks of the shared 40 tokens
    assert out.num_new_tokens == [len(b.token_ids) - 32]


async def test_preemption_takes_the_newest_and_requeues_it_first() -> None:
    sc, alloc = await _scheduler(num_blocks=8, num_lookahead_tokens=0)
    seqs = [_seq(f"p{i}", [i + 1] * 30) for i in range(3)]  # 2 blocks each + growth
    for s in seqs:
        sc.add(s)
    await _step(sc)
    assert all(s.status == SeqStatus.RUNNING for s in seqs)
    preempted = 0
    for _ in range(40):
        out = await _step(sc)
        preempted += out.num_preempted
        if preempted:
            break
    assert preempted
    assert sc.waiting[0] is seqs[2], "the newest running sequence goes first, back to the front"
    assert seqs[2].num_computed_tokens == 0 and not seqs[2].block_table
    assert sc.num_preemptions == 1
    ex = alloc.manager.executors[alloc.executor_id]
    assert "p2" not in ex.seqs


async def test_a_burst_with_a_cached_prefix_is_admitted_in_few_calls() -> None:
    """64 arrivals sharing a cached 10-block prefix, 20 new tokens each: the step's budget
    (512) takes 25 of them at 20 uncached tokens, admitted in a couple of calls, not 25."""
    sc, alloc = await _scheduler(num_blocks=4096, max_num_seqs=256, max_num_batched_tokens=512)
    prefix = list(range(1, 161))
    first = _seq("first", [*prefix, 999])
    sc.add(first)
    await _step(sc)
    await sc.drain()  # its prefix blocks are committed
    burst = [_seq(f"b{i}", [*prefix, *range(1000 + 20 * i, 1020 + 20 * i)]) for i in range(64)]
    for s in burst:
        sc.add(s)
    calls = alloc.step_calls
    out = await sc.schedule()
    admitted = [s for s in out.admitted if s.seq_id.startswith("b")]
    assert all(s.num_cached_tokens == 160 for s in admitted)
    assert sum(out.num_new_tokens) >= 500 and len(admitted) >= 24
    assert alloc.step_calls - calls <= 3, alloc.step_calls - calls
    assert [s.seq_id for s in admitted] == [f"b{i}" for i in range(len(admitted))]  # FIFO


async def test_one_admission_call_fills_a_step_when_hits_scatter() -> None:
    """Once a round has seen the hit rate, each step's admission is one call even though the
    prompts' uncached parts scatter around the estimate: a round offers past the budget
    (kvmanager stops at it) rather than coming back for the few the estimate left out."""
    sc, alloc = await _scheduler(num_blocks=8192, max_num_seqs=256, max_num_batched_tokens=1024)
    prefix = list(range(1, 161))
    sc.add(_seq("first", [*prefix, 999]))
    await _step(sc)
    await sc.drain()  # its prefix blocks are committed
    rng = random.Random(0)
    for i in range(200):
        sc.add(
            _seq(
                f"b{i}", [*prefix, *range(10_000 + 100 * i, 10_000 + 100 * i + rng.randint(5, 60))]
            )
        )
    await _step(sc)  # the first round learns the hit rate
    for _ in range(4):
        calls = alloc.admission_calls
        out = await sc.schedule()
        assert alloc.admission_calls - calls == 1
        assert sum(out.num_new_tokens) == 1024  # the budget is full
        assert all(s.num_cached_tokens == 160 for s in out.admitted)
        for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
        sc.link.defer(sc.commit_entries(out.seqs), [])


async def test_arrivals_during_admission_wait_for_the_next_step() -> None:
    """A sequence that arrives while an admission round's call is out (the event loop is free
    then) is not offered in the same step: the step launches with what was waiting when its
    admission began, rather than staying in admission rounds while a burst trickles in."""
    sc, alloc = await _scheduler(num_blocks=4096, max_num_seqs=256, max_num_batched_tokens=4096)
    arrivals = iter(_seq(f"late{i}", list(range(100 * i, 100 * i + 40))) for i in range(10))
    step = alloc.step

    async def step_with_an_arrival(*args, **kwargs):
        if args[3] or kwargs.get("admits"):  # an admission round: someone arrives meanwhile
            late = next(arrivals, None)
            if late is not None:
                sc.add(late)
        return await step(*args, **kwargs)

    alloc.step = step_with_an_arrival  # type: ignore[method-assign]
    early = [_seq(f"early{i}", list(range(5000 + 50 * i, 5040 + 50 * i))) for i in range(3)]
    for s in early:
        sc.add(s)
    out = await sc.schedule()
    assert [s.seq_id for s in out.admitted] == ["early0", "early1", "early2"]
    assert [s.seq_id for s in sc.waiting] == ["late0"]
    out = await sc.schedule()
    assert [s.seq_id for s in out.admitted] == ["late0"]  # the next step takes it
