"""A waiting prompt that shares leading blocks with a prefill in flight waits until they are
committed, then hits them (inflight_prefill.py); others are admitted past it."""

from __future__ import annotations

from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.inflight_prefill import MIN_SHARED_BLOCKS
from pagemesh.services.executor.sequence import Request, SeqStatus, Sequence

from tests.executor.test_scheduler import BS, _scheduler, _seq, _step


def _salted(rid: str, tokens: list[int], salt: str) -> Sequence:
    req = Request(rid, SamplingParams(max_tokens=1000), salt, len(tokens))
    seq = Sequence(rid, req, 0, list(tokens), len(tokens), arrival=0)
    req.seqs.append(seq)
    return seq


# 14 blocks nobody has cached. With a budget of 128 tokens a step, a prompt of the context and 4
# more tokens prefills in two steps: 128 tokens (8 blocks, committed when the step lands), then
# 100 (blocks 8-13 in flight) with 28 tokens of budget left for others.
CONTEXT = list(range(2000, 2000 + 14 * BS))
BUDGET = 128


async def test_a_follower_waits_for_the_prefill_then_hits_it() -> None:
    sc, _ = await _scheduler(num_blocks=256, max_num_batched_tokens=BUDGET, max_num_seqs=16)
    first = _seq("first", [*CONTEXT, 1, 2, 3, 4])
    sc.add(first)
    await _step(sc)
    follower = _seq("follower", [*CONTEXT, 4, 5, 6])
    other = _seq("other", list(range(5000, 5040)))  # shares nothing: not held back
    sc.add(follower)
    sc.add(other)
    out = await _step(sc)
    assert other in out.admitted and follower not in out.admitted
    assert follower.status == SeqStatus.WAITING and sc.waiting[0] is follower
    for _ in range(20):
        if follower.status == SeqStatus.RUNNING:
            break
        await _step(sc)
    assert follower.status == SeqStatus.RUNNING
    # Every block of the shared context came from the cache, computed once.
    assert follower.num_cached_tokens == len(CONTEXT)
    assert sc.inflight is not None and sc.inflight.num_deferred >= 1


async def test_a_short_shared_prefix_or_another_salt_does_not_wait() -> None:
    sc, _ = await _scheduler(num_blocks=256, max_num_batched_tokens=BUDGET, max_num_seqs=16)
    sc.add(_seq("first", [*CONTEXT, 1, 2, 3, 4]))
    await _step(sc)
    # Blocks 0-7 are committed, 8-13 in flight: `short` shares 3 of those.
    short = _seq("short", [*CONTEXT[: (8 + MIN_SHARED_BLOCKS - 1) * BS], 7, 7, 7])
    salted = _salted("salted", [*CONTEXT, 8], "tenant-b")  # same tokens, another cache
    sc.add(short)
    sc.add(salted)
    out = await _step(sc)
    assert short in out.admitted  # the budget left takes one of them
    out = await _step(sc)
    assert salted in out.admitted
    assert salted.num_cached_tokens == 0
    assert sc.inflight is not None and sc.inflight.num_deferred == 0


async def test_without_prefix_caching_nothing_waits() -> None:
    sc, _ = await _scheduler(
        num_blocks=256, max_num_batched_tokens=BUDGET, max_num_seqs=16, enable_prefix_caching=False
    )
    sc.add(_seq("first", [*CONTEXT, 1, 2, 3, 4]))
    await _step(sc)
    follower = _seq("follower", [*CONTEXT, 2])
    sc.add(follower)
    out = await _step(sc)
    assert follower in out.admitted and sc.inflight is None


async def test_a_follower_is_admitted_when_the_prefill_is_preempted_or_ends() -> None:
    """The wait lasts only while a running sequence computes the blocks: once it is gone
    (aborted here), the follower goes in and computes them itself."""
    sc, _ = await _scheduler(num_blocks=256, max_num_batched_tokens=BUDGET, max_num_seqs=16)
    first = _seq("first", [*CONTEXT, 1, 2, 3, 4])
    sc.add(first)
    await _step(sc)
    follower = _seq("follower", [*CONTEXT, 2])
    sc.add(follower)
    out = await _step(sc)
    assert follower not in out.admitted
    releases: list[str] = []
    sc.abort(first, releases)
    sc.link.defer([], releases)
    out = await _step(sc)
    assert follower in out.admitted


async def test_prompts_arriving_together_compute_a_shared_context_once() -> None:
    """Two prompts of one new context in one admission round: the second waits for the first's
    prefill instead of computing the same blocks beside it."""
    sc, _ = await _scheduler(num_blocks=256, max_num_batched_tokens=512, max_num_seqs=16)
    a = _seq("a", [*CONTEXT, 1, 2])
    b = _seq("b", [*CONTEXT, 3, 4])
    sc.add(a)
    sc.add(b)
    out = await _step(sc)
    assert a in out.admitted and b not in out.admitted
    out = await _step(sc)
    assert b in out.admitted and b.num_cached_tokens == len(CONTEXT)


async def test_prompts_sharing_a_known_cached_prefix_go_in_together() -> None:
    """Once this executor has committed a context, prompts of one round that share only it go
    in together, in one admission call (no round trip to learn that they hit)."""
    sc, alloc = await _scheduler(num_blocks=256, max_num_batched_tokens=1024, max_num_seqs=16)
    sc.add(_seq("first", [*CONTEXT, 1, 2]))
    await _step(sc)
    await _step(sc)  # its blocks are committed
    burst = [_seq(f"q{i}", [*CONTEXT, *range(100 * i, 100 * i + 40)]) for i in range(1, 5)]
    for s in burst:
        sc.add(s)
    calls = alloc.admission_calls
    out = await _step(sc)
    assert all(s in out.admitted for s in burst)
    assert all(s.num_cached_tokens == len(CONTEXT) for s in burst)
    assert alloc.admission_calls - calls == 1
    assert sc.inflight is not None and sc.inflight.num_deferred == 0
