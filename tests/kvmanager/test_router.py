"""The router's policies on the real core (no gRPC): prefix affinity, the load guard, pending
load spreading a burst, fallback, round robin, least loaded, cache_salt isolation, the model
filter, liveness and exclusion, and the errors."""

from __future__ import annotations

import random

import pytest
from pagemesh.proto.packed_ids import pack
from pagemesh.services.kvmanager.fleet import Fleet
from pagemesh.services.kvmanager.load import TOKENS_PER_SEQ
from pagemesh.services.kvmanager.manager import Manager
from pagemesh.services.kvmanager.router import (
    GUARD_FACTOR,
    GUARD_MARGIN,
    BadRouteRequest,
    NoLiveExecutor,
    Router,
    UnknownModel,
)

BS = 4
PROMPT = list(range(100, 133))  # 33 tokens: 8 full blocks can hit (never the last token)


def fleet(*executors: str, model: str = "m", num_blocks: int = 64) -> tuple[Manager, Router]:
    m = Manager()
    for eid in executors:
        m.register(eid, num_blocks, BS, "fp", address=f"{eid}.local:7000", model=model)
    return m, Router(m, Fleet(m, timeout=60))


def cache(m: Manager, eid: str, tokens: list[int], salt: str = "") -> None:
    """Leaves `tokens`' full blocks cached (committed, then released) on `eid`."""
    ex = m.executors[eid]
    sid = f"seed-{len(ex.pool.index)}"
    m.allocate(eid, ex.epoch, sid, tokens, salt)
    full = len(tokens) // BS
    m.commit(eid, ex.epoch, [(sid, i, tokens[i * BS : (i + 1) * BS]) for i in range(full)])
    m.release(eid, ex.epoch, [sid])


def report(m: Manager, eid: str, running: int = 0, waiting: int = 0, queued: int = 0) -> None:
    m.report_load(eid, m.executors[eid].epoch, running, waiting, queued)


def route(r: Router, tokens: list[int] = PROMPT, **kw) -> tuple[str, str, int]:
    d = r.route(kw.pop("model", "m"), pack(tokens), **kw)
    return d.executor.executor_id, d.reason, d.cached_tokens


def test_the_longest_cached_prefix_wins() -> None:
    m, r = fleet("a", "b", "c")
    cache(m, "a", PROMPT[:17])  # 4 blocks
    cache(m, "b", PROMPT)  # all 8 blocks that can hit
    assert route(r) == ("b", "prefix", 32)
    # Within the guard's bounds, a modest load difference does not move it.
    m2, r2 = fleet("a", "b")
    cache(m2, "b", PROMPT)
    report(m2, "b", running=6)
    report(m2, "a", running=1)
    assert route(r2) == ("b", "prefix", 32)
    # The answer matches what an allocation there gets.
    assert m.allocate("b", 1, "x", PROMPT).num_cached_tokens == 32


def test_the_load_guard_sends_a_hot_prefix_to_the_least_loaded() -> None:
    m, r = fleet("a", "b", "c")
    cache(m, "b", PROMPT)
    report(m, "a", running=3)
    report(m, "c", running=2)
    report(m, "b", running=int(GUARD_FACTOR * 2 + GUARD_MARGIN))  # at the bound: still prefix
    assert route(r)[:2] == ("b", "prefix")
    report(m, "b", running=40)  # far beyond the bound
    assert route(r) == ("c", "load", 0)
    # Without the load term (all equal), the prefix wins again.
    for eid in "abc":
        report(m, eid, running=40)
    assert route(r)[:2] == ("b", "prefix")


def test_load_outweighs_a_short_shared_prefix() -> None:
    """A hit on a small part of the prompt is worth less than a large load gap, even below the
    guard: the score weighs the cached fraction against relative load."""
    m, r = fleet("a", "b")
    long_prompt = list(range(1000, 1000 + 129))  # 32 blocks
    cache(m, "a", long_prompt[:9])  # 2 of 32 blocks
    report(m, "a", running=9)
    report(m, "b", running=2)
    assert route(r, long_prompt) == ("b", "load", 0)
    report(m, "a", running=2)
    # (another question after the same 2 blocks: long_prompt itself is now on its way into b,
    # pending_prefixes.py, and would follow it there)
    assert route(r, [*long_prompt[:9], *range(5000, 5120)]) == ("a", "prefix", 8)


def test_pending_load_spreads_a_burst() -> None:
    """Between two load reports every routed request counts at once: a burst is spread."""
    m, r = fleet("a", "b")
    picks = [route(r, [7 + i, *PROMPT])[0] for i in range(10)]  # cached nowhere, all distinct
    assert picks == ["a", "b"] * 5
    # A hot prefix takes most of a burst, but not all of it: the guard sees the pending load.
    m, r = fleet("a", "b")
    cache(m, "a", PROMPT)
    picks = [route(r)[0] for _ in range(40)]
    assert picks[0] == "a" and picks.count("b") >= 5
    # Once the guard sent one to b, b is computing the prefix too (pending_prefixes.py): from
    # then on both hold it, and load alone splits the rest.
    assert abs(picks.count("a") - picks.count("b")) <= 4
    ex_a = m.executors["a"]
    assert ex_a.load.routed_seqs == picks.count("a")
    assert ex_a.load.routed_tokens == picks.count("a") * (len(PROMPT) - 32)
    b_uncached = m.executors["b"].load.routed_tokens
    assert b_uncached >= len(PROMPT)  # b holds nothing of it: the whole prompt is queued
    # The executor's report supersedes the estimate.
    report(m, "a", running=3)
    assert ex_a.load.routed_seqs == 0 and ex_a.load.value == 3
    report(m, "b", queued=TOKENS_PER_SEQ)
    assert m.executors["b"].load.value == 1


def test_a_burst_sharing_an_uncached_context_follows_its_first_request() -> None:
    """Blocks routed but not committed yet (the first request's prefill still to come) draw the
    requests whose prompts run through them to the same executor (pending_prefixes.py), which
    holds them back until the blocks are committed; their load counts only what they add.
    The load term still spreads a burst large enough, and the entries expire."""
    m, r = fleet("a", "b")
    first = route(r, [7, *PROMPT])
    assert first == ("a", "fallback", 0)
    follower = r.route("m", pack([7, *PROMPT[:-1], 999]))  # same context, another question
    assert (follower.executor.executor_id, follower.reason) == ("a", "prefix")
    assert follower.cached_tokens == 0 and follower.pending_tokens == 32  # nothing committed
    ex_a = m.executors["a"]
    assert ex_a.load.routed_tokens == 34 + (34 - 32)  # the first in full, the follower's tail
    other = route(r, [8, *PROMPT])  # another context: spread by load
    assert other[0] == "b"
    # Once committed, the index answers for the same blocks, with real cached tokens.
    cache(m, "a", [7, *PROMPT])
    assert route(r, [7, *PROMPT[:-1], 998]) == ("a", "prefix", 32)
    # A burst of one new context stays with its executor while the load gap is small, then
    # spreads (the load term): a hot new context cannot take the whole fleet.
    picks = [route(r, [9, *PROMPT])[0] for _ in range(40)]
    assert picks[:3] == [picks[0]] * 3 and set(picks) == {"a", "b"}, picks
    # Expired entries no longer count.
    m, r = fleet("a", "b")
    r.pending.ttl = 0.0
    assert route(r, [7, *PROMPT])[0] == "a"
    assert route(r, [7, *PROMPT])[:2] == ("b", "fallback")  # by load: a has the first


def test_fallback_is_the_least_loaded_with_ties_to_the_lowest_id() -> None:
    # Three unrelated prompts: none runs through blocks routed before (pending_prefixes.py).
    m, r = fleet("c", "a", "b")
    assert route(r, [1, *PROMPT]) == ("a", "fallback", 0)
    report(m, "a", running=1)  # supersedes the request just routed to it, and adds one
    assert route(r, [2, *PROMPT]) == ("b", "fallback", 0)
    report(m, "a", waiting=5)
    report(m, "b", running=3)
    report(m, "c", queued=2 * TOKENS_PER_SEQ)
    assert route(r, [3, *PROMPT]) == ("c", "fallback", 0)


def test_round_robin_takes_turns_and_ignores_the_cache() -> None:
    m, r = fleet("a", "b", "c")
    cache(m, "b", PROMPT)
    picks = [route(r, policy="round_robin") for _ in range(6)]
    assert [p[0] for p in picks] == ["a", "b", "c", "a", "b", "c"]
    assert {p[1] for p in picks} == {"round_robin"}
    assert picks[1][2] == 32  # it still says what is cached where it went


def test_least_loaded_ignores_the_cache() -> None:
    m, r = fleet("a", "b")
    cache(m, "a", PROMPT)
    report(m, "a", running=2)
    report(m, "b", running=1)
    assert route(r, policy="least_loaded") == ("b", "least_loaded", 0)
    d = r.route("m", pack(PROMPT), policy="least_loaded")
    assert d.policy == "least_loaded"


def test_cache_salt_isolates_tenants() -> None:
    m, r = fleet("a", "b")
    cache(m, "b", PROMPT, salt="tenant-1")
    report(m, "b", running=1)
    assert route(r, cache_salt="tenant-1") == ("b", "prefix", 32)
    assert route(r, cache_salt="tenant-2") == ("a", "fallback", 0)
    assert route(r) == ("a", "fallback", 0)


def test_only_executors_of_the_model_live_and_not_excluded_are_candidates() -> None:
    m = Manager()
    m.register("a", 64, BS, "fp-1", address="a:1", model="small")
    m.register("b", 64, BS, "fp-2", address="b:1", model="large")
    m.register("c", 64, BS, "fp-2", address="c:1", model="large")
    m.register("old", 64, BS, "fp-2")  # no model: never routed to
    f = Fleet(m, timeout=10)
    r = Router(m, f)
    cache(m, "a", PROMPT)
    assert route(r, model="large") == ("b", "fallback", 0)
    assert route(r, model="small") == ("a", "prefix", 32)
    assert route(r, model="large", exclude=["b"])[0] == "c"
    with pytest.raises(NoLiveExecutor):
        r.route("large", pack(PROMPT), exclude=["b", "c"])
    with pytest.raises(UnknownModel):
        r.route("medium", pack(PROMPT))
    # Liveness: a down executor is routed around, and is back with its next call.
    f.check()  # notes the calls so far (cache() made some): the hot path only counts them
    m.executors["b"].last_seen -= 11
    assert not f.is_live(m.executors["b"])
    assert route(r, model="large")[0] == "c"
    m.executors["c"].last_seen -= 11
    with pytest.raises(NoLiveExecutor):
        r.route("large", pack(PROMPT))
    report(m, "b")  # any call naming it and its epoch
    assert route(r, model="large")[0] == "b"


def test_executors_whose_max_model_len_the_prompt_fits_are_preferred() -> None:
    m = Manager()
    m.register("a", 64, BS, "fp", model="m", max_model_len=len(PROMPT))  # no room to generate
    m.register("b", 64, BS, "fp", model="m", max_model_len=len(PROMPT) + 1)
    m.register("c", 64, BS, "fp", model="m")  # 0: not said
    r = Router(m, Fleet(m))
    cache(m, "a", PROMPT)
    assert [route(r, policy="round_robin")[0] for _ in range(3)] == ["b", "c", "b"]
    # a's prefix does not help: a cannot take it (c: b has two routed requests pending).
    assert route(r)[:2] == ("c", "fallback")
    m.executors["b"].max_model_len = m.executors["c"].max_model_len = 8
    assert route(r)[0] == "a"
    m.executors["a"].max_model_len = 8
    # None fits: routed anyway (the executor refuses it with its own error).
    assert route(r)[:2] == ("a", "prefix")


def test_malformed_requests_and_the_counts() -> None:
    m, r = fleet("a")
    for model, prompt, policy, what in [
        ("", pack(PROMPT), "", "model"),
        ("m", b"", "", "prompt must not be empty"),
        ("m", b"\x01\x00\x00", "", "multiple of 4"),
        ("m", pack(PROMPT), "fastest", "unknown policy"),
    ]:
        with pytest.raises(BadRouteRequest, match=what):
            r.route(model, prompt, policy=policy)
    assert r.failures == {"BadRouteRequest": 4}
    assert m.executors["a"].load.routed_seqs == 0  # a failed route adds no load
    route(r)
    route(r, policy="round_robin")
    route(r, policy="round_robin")
    assert r.routed == {"a": {("kv", "fallback"): 1, ("round_robin", "round_robin"): 2}}
    # A new epoch keeps the executor's counts (they are the executor's, not the epoch's).
    m.register("a", 64, BS, "fp", model="m")
    route(r, [5, *PROMPT])  # a prompt not routed before (pending_prefixes.py)
    assert r.routed["a"][("kv", "fallback")] == 2


def test_cached_tokens_matches_match_for_every_executor() -> None:
    """The shared-chain computation agrees with Match executor by executor: different block
    sizes, fingerprints, salts and partial hits."""
    m = Manager()
    m.register("a", 64, 4, "fp")
    m.register("b", 64, 4, "fp")
    m.register("c", 64, 8, "fp")
    m.register("d", 64, 4, "other")
    cache(m, "a", PROMPT[:13])
    cache(m, "b", PROMPT)
    cache(m, "d", PROMPT)
    ex = m.executors["c"]
    m.allocate("c", ex.epoch, "s", PROMPT)
    m.commit("c", ex.epoch, [("s", 0, PROMPT[:8]), ("s", 1, PROMPT[8:16])])
    exs = [m.executors[e] for e in "abcd"]
    for prompt in (PROMPT, PROMPT[:5], PROMPT[:1], [*PROMPT[:6], 0, *PROMPT[7:]]):
        for salt in ("", "s"):
            got = m.cached_tokens(exs, pack(prompt), salt)
            assert got == [m.match(prompt, salt, e)[e] for e in "abcd"], (prompt, salt)
    assert m.cached_tokens(exs, pack(PROMPT)) == [12, 32, 16, 32]


# Decisions on one fixed state, pinned: speed work on the router (hashing, lookups) must leave
# every choice as it was. Computed by the router as of fd4926d, before that work.
PINNED = [
    *[
        ("a", "prefix", 256, 0),
        ("c", "load", 0, 0),
        ("c", "prefix", 128, 0),
        ("b", "prefix", 384, 0),
        ("c", "fallback", 0, 0),
        ("a", "fallback", 0, 0),
        ("c", "fallback", 0, 0),
        ("c", "prefix", 0, 288),
    ],  # kv
    *[
        ("a", "least_loaded", 256, 0),
        ("a", "least_loaded", 0, 0),
        ("c", "least_loaded", 128, 0),
        ("c", "least_loaded", 0, 0),
        ("a", "least_loaded", 0, 0),
        ("c", "least_loaded", 0, 0),
        ("a", "least_loaded", 0, 0),
        ("c", "least_loaded", 0, 0),
    ],
    *[
        ("a", "round_robin", 256, 0),
        ("b", "round_robin", 512, 0),
        ("c", "round_robin", 128, 0),
        ("a", "round_robin", 0, 0),
        ("b", "round_robin", 0, 0),
        ("c", "round_robin", 0, 0),
        ("a", "round_robin", 0, 0),
        ("b", "round_robin", 0, 0),
    ],
    *[
        ("a", "prefix", 256, 0),
        ("c", "prefix", 0, 512),
        ("c", "prefix", 128, 0),
        ("b", "prefix", 384, 0),
        ("c", "prefix", 0, 384),
        ("a", "prefix", 0, 512),
        ("c", "prefix", 0, 288),
        ("c", "prefix", 0, 288),
    ],  # kv again ("" policy), with the pending blocks the calls above left
]


def test_pinned_decisions_on_a_fixed_state() -> None:
    """Three executors of 16-token blocks holding seeded contexts (one salted), uneven loads;
    per policy, prompts through each context plus a question, and a context nobody holds sent
    twice (the second follows the first's pending blocks): (executor, reason, cached tokens,
    pending tokens) of every decision, in order."""
    rng = random.Random(7)
    m = Manager()
    for eid in ("a", "b", "c"):
        m.register(eid, 256, 16, "fp", address=f"{eid}.local:7000", model="m")
    r = Router(m, Fleet(m, timeout=60))

    def toks(n: int) -> list[int]:
        return [rng.randrange(32000) for _ in range(n)]

    def cache16(eid: str, tokens: list[int], salt: str = "") -> None:
        ex = m.executors[eid]
        sid = f"seed-{len(ex.pool.index)}"
        m.allocate(eid, ex.epoch, sid, tokens, salt)
        full = len(tokens) // 16
        m.commit(eid, ex.epoch, [(sid, i, tokens[i * 16 : (i + 1) * 16]) for i in range(full)])
        m.release(eid, ex.epoch, [sid])

    ctx = [toks(256), toks(512), toks(128), toks(384)]
    cache16("a", ctx[0])
    cache16("b", ctx[1])
    cache16("c", ctx[2])
    cache16("a", ctx[2][:64])
    cache16("b", ctx[3], "t")
    report(m, "a", running=3)
    report(m, "b", running=10, waiting=2, queued=600)
    report(m, "c")
    got = []
    fresh = toks(300)
    for policy in ("kv", "least_loaded", "round_robin", ""):
        for i, (c, salt) in enumerate(((0, ""), (1, ""), (2, ""), (3, "t"), (3, ""), (1, "t"))):
            d = r.route("m", pack(ctx[c] + toks(40 + 7 * i)), salt, policy)
            got.append((d.executor.executor_id, d.reason, d.cached_tokens, d.pending_tokens))
        for _ in range(2):
            d = r.route("m", pack(fresh + toks(20)), "", policy)
            got.append((d.executor.executor_id, d.reason, d.cached_tokens, d.pending_tokens))
    assert got == PINNED


def test_host_tier_hits_count_weighted_below_gpu_hits() -> None:
    """kv counts a prefix in an executor's host tier (restored by a copy, not recomputed),
    weighted by HOST_HIT_WEIGHT: above an executor holding nothing, below one holding the
    same prefix on its GPU; the decision reports every cached token, both tiers."""
    m = Manager()
    for eid in ("a", "b", "c"):
        # 9 GPU blocks: one prompt's 9 (8 full + the last token's); c has no host tier.
        m.register(eid, 9, BS, "fp", address=f"{eid}.local:7000", model="m", num_host_blocks=16)
    r = Router(m, Fleet(m, timeout=60))
    cache(m, "a", PROMPT)
    cache(m, "b", PROMPT)
    other = list(range(500, 533))
    cache(m, "a", other)  # evicts PROMPT's blocks on a: they spill to its host tier
    pool = m.executors["a"].pool
    assert pool.num_spills == 8 and not set(pool.index) & set(pool.host_index)
    assert route(r) == ("b", "prefix", 32)  # the GPU copy wins over the host copy
    for eid in "abc":
        report(m, eid)  # (forgets what was routed)
    cache(m, "b", other)  # now both hold PROMPT in host memory only
    assert m.executors["b"].pool.num_host_cached == 8
    assert route(r) == ("a", "prefix", 32)  # equal: the lowest id; c (nothing cached) loses
    for eid in "abc":
        report(m, eid)
    # A host hit still beats a shorter GPU hit (28 tokens on c against 0.9 x 32 on a) ...
    cache(m, "c", PROMPT[:29])
    assert route(r) == ("a", "prefix", 32)
    # ... and the allocation there gets it all, restored.
    a = m.allocate("a", m.executors["a"].epoch, "x", PROMPT)
    assert a.num_cached_tokens == 32 and len(a.restores) == 8
