"""The router: which executor should take a request (the Fleet service's Route,
fleet_service.py). kvmanager allocated every block of every executor, so it knows exactly which
prefix of a prompt each one holds (Manager.cached_tokens: the blocks an allocation there would
hit, cache_salt respected), and it has each executor's load (load.py).

Candidates: the live executors (fleet.py) registered with the request's model, less those the
request excludes (a request sent again after its executor failed); of those, the ones whose
max_model_len leaves room for at least one token after the prompt, when any does (when none
does, all stay: the executor then refuses the request with its own error, as with one executor).
Policies, per request:
  kv (default)   the cached fraction of the prompt on each candidate, weighed against its load
                 relative to the fleet's mean; when the executor that wins is far more loaded
                 than the least loaded one (the guard), the least loaded. Reasons: "prefix" (it
                 holds the longest cached prefix), "load" (load sent the request elsewhere),
                 "fallback" (nothing cached anywhere: the least loaded).
  least_loaded   the least loaded, cache ignored.       Reason "least_loaded".
  round_robin    each candidate in turn (per model).    Reason "round_robin".
Prefix affinity alone hot-spots: a popular prefix pulls every request to the one executor that
holds it (llm-d measured 45-55% of requests failing that way), hence the load term and the
guard. Ties go to the lowest executor id, so a decision depends on the state only.

A routed request counts toward its executor's load at once (Load.add_routed: one more waiting
sequence and its uncached prompt tokens) until the executor's next report: load reports come
with Step calls, and a burst routed between two of them would otherwise all land on the
executor that looked least loaded first. Decisions are counted by executor, policy and reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from pagemesh.services.kvmanager import hashing
from pagemesh.services.kvmanager.fleet import Fleet
from pagemesh.services.kvmanager.manager import ExecutorState, Manager
from pagemesh.services.kvmanager.pending_prefixes import PendingPrefixes

POLICIES = ("kv", "least_loaded", "round_robin")
DEFAULT_POLICY = "kv"

# kv's score: cached fraction - LOAD_WEIGHT * load / max(mean load, LOAD_FLOOR). At 0.5, an
# executor holding the whole prompt keeps it against one holding none until it carries two mean
# loads more; a prompt with a short shared prefix (a system prompt) moves for much less. Where
# prefill is cheap next to the wait in a deep queue, a hit is worth less than the load it adds.
LOAD_WEIGHT = 0.5
# A nearly idle fleet (loads 1 and 0) is not "twice as loaded" in any way that matters:
# continuous batching runs a handful of sequences at no extra latency, so loads are measured
# against at least this many sequences.
LOAD_FLOOR = 4.0
# The guard: the executor the score picks loses to the least loaded one when its load exceeds
# GUARD_FACTOR times that one's plus GUARD_MARGIN. Past a 2x gap, its queue costs the request
# more than the prefill its cached prefix saves (a 1k-token prefill takes milliseconds; waiting
# behind twice the batch takes whole decode steps), and hot prefixes no longer concentrate load.
# The margin keeps small absolute gaps (3 vs 1 sequences) from tripping it.
GUARD_FACTOR = 2.0
GUARD_MARGIN = 8.0
# kv's score counts a prompt token cached in an executor's host-memory tier (block_pool.py) as
# this fraction of one cached on its GPU: restoring it is a PCIe copy before the step, far
# cheaper than recomputing it (vLLM measured 2-22x lower TTFT) but not free, so of two executors
# holding the same prefix the one holding it on the GPU wins.
HOST_HIT_WEIGHT = 0.9


class RouteError(Exception):
    """A request the router cannot route (fleet_service.py maps each kind to a status code).
    Messages name only what the caller sent: never an address or an internal id."""


class BadRouteRequest(RouteError):
    """Malformed: empty model or prompt, a prompt that is not whole u32 ids, unknown policy."""


class UnknownModel(RouteError):
    """No registered executor serves the model."""


class NoLiveExecutor(RouteError):
    """Executors serve the model, but none of them is live (or all are excluded)."""


@dataclass(slots=True)
class Decision:
    executor: ExecutorState
    cached_tokens: int  # prompt tokens cached on it (whole blocks)
    reason: str
    policy: str
    # kv: prompt tokens past those that an earlier request routed there is computing now
    # (pending_prefixes.py): the executor holds this one back until they are committed.
    pending_tokens: int = 0


class Router:
    def __init__(self, manager: Manager, fleet: Fleet) -> None:
        self.m = manager
        self.fleet = fleet
        # executor id -> (policy, reason) -> decisions; kept across its epochs.
        self.routed: dict[str, dict[tuple[str, str], int]] = {}
        # Requests not routed, by the error's kind (BadRouteRequest, UnknownModel, ...).
        self.failures: dict[str, int] = {}
        self._turn: dict[str, int] = {}  # round robin: the next turn, per model
        self.pending = PendingPrefixes()  # kv: blocks routed but not committed yet
        # kv: prompts' block hashes by their input, so that a context routed before is not
        # hashed again (the bulk of a kv decision's cost for a long prompt).
        self._chains = hashing.ChainMemo()

    def route(
        self,
        model: str,
        prompt: bytes,
        cache_salt: str = "",
        policy: str = "",
        exclude: Iterable[str] = (),
    ) -> Decision:
        """The executor for one request; `prompt` is packed u32 ids (token_data's form).
        Raises a RouteError, having changed nothing, when there is none."""
        try:
            d = self._decide(model, prompt, cache_salt, policy or DEFAULT_POLICY, exclude)
        except RouteError as e:
            kind = type(e).__name__
            self.failures[kind] = self.failures.get(kind, 0) + 1
            raise
        d.executor.load.add_routed(len(prompt) // 4 - d.cached_tokens - d.pending_tokens)
        counts = self.routed.setdefault(d.executor.executor_id, {})
        key = (d.policy, d.reason)
        counts[key] = counts.get(key, 0) + 1
        return d

    def _candidates(
        self, model: str, exclude: Iterable[str], num_tokens: int
    ) -> list[ExecutorState]:
        serving = [ex for _, ex in sorted(self.m.executors.items()) if ex.model == model]
        if not serving:
            raise UnknownModel(f"no executor serves model {model[:200]!r}")
        skip = set(exclude)
        live = self.fleet.is_live
        out = [ex for ex in serving if ex.executor_id not in skip and live(ex)]
        if not out:
            raise NoLiveExecutor(f"no executor serving model {model[:200]!r} is available")
        fits = [ex for ex in out if not ex.max_model_len or num_tokens < ex.max_model_len]
        return fits or out

    def _decide(
        self, model: str, prompt: bytes, salt: str, policy: str, exclude: Iterable[str]
    ) -> Decision:
        if policy not in POLICIES:
            raise BadRouteRequest(
                f"unknown policy {policy[:100]!r}: one of {', '.join(POLICIES)} (empty: kv)"
            )
        if not model:
            raise BadRouteRequest("model must not be empty")
        if not prompt:
            raise BadRouteRequest("prompt must not be empty")
        if len(prompt) % 4:
            raise BadRouteRequest("prompt must be whole u32 ids (a multiple of 4 bytes)")
        n = len(prompt) // 4
        cands = self._candidates(model, exclude, n)
        if policy == "round_robin":
            turn = self._turn.get(model, 0)
            self._turn[model] = turn + 1
            ex = cands[turn % len(cands)]
            return Decision(ex, self.m.cached_tokens([ex], prompt, salt)[0], policy, policy)
        loads = [ex.load.value for ex in cands]
        # Equal loads (an idle fleet, most often): the one with the largest free share of its
        # pool, so that new prefixes spread over the fleet's pools instead of all filling the
        # first executor's and evicting each other there (then the lowest id).
        free = [ex.pool.num_free / max(1, ex.pool.num_blocks) for ex in cands]
        least = min(range(len(cands)), key=lambda i: (loads[i], -free[i]))
        if policy == "least_loaded":
            ex = cands[least]
            return Decision(ex, self.m.cached_tokens([ex], prompt, salt)[0], policy, policy)
        cached, reach, chains, host = self._kv_view(cands, prompt, salt)
        longest = max(reach)
        if not longest:
            i = least
            d = Decision(cands[least], 0, "fallback", policy)
        else:
            scale = LOAD_WEIGHT / max(sum(loads) / len(loads), LOAD_FLOOR)
            off = 1.0 - HOST_HIT_WEIGHT
            scores = [
                (c - off * h) / n - scale * x for c, h, x in zip(reach, host, loads, strict=True)
            ]
            i = max(range(len(cands)), key=scores.__getitem__)  # the first: lowest id
            if loads[i] > GUARD_FACTOR * loads[least] + GUARD_MARGIN:
                i = least
            reason = "prefix" if reach[i] == longest else "load"
            d = Decision(cands[i], cached[i], reason, policy, reach[i] - cached[i])
        # The blocks it will compute there: later prompts through them follow it.
        self.pending.record(chains[i][cached[i] // cands[i].block_size :], d.executor.executor_id)
        return d

    def _kv_view(
        self, cands: list[ExecutorState], prompt: bytes, salt: str
    ) -> tuple[list[int], list[int], list[list[bytes]], list[int]]:
        """Per candidate: the prompt tokens cached there (Manager.cached_tokens' figure: whole
        blocks, never the last token, in either tier), those cached or being computed there
        (pending), the hashes of the prompt's full blocks in its chain, and how many of the
        cached tokens are in its host tier. Executors that share a block size and extra keys
        share one chain, computed once."""
        now = time.monotonic()
        cached = [0] * len(cands)
        reach = [0] * len(cands)
        chains: list[list[bytes]] = [[] for _ in cands]
        host_cached = [0] * len(cands)
        groups: dict[tuple[int, bytes], list[int]] = {}
        for i, ex in enumerate(cands):
            groups.setdefault((ex.block_size, ex.extra_for(salt)[0]), []).append(i)
        pending = self.pending.executor_of if len(self.pending) else None
        for (bs, extra), members in groups.items():
            num_full = (len(prompt) // 4 - 1) // bs
            if num_full <= 0:
                continue
            chain = self._chains.chain(extra, prompt, bs, num_full)
            for i in members:
                chains[i] = chain
                index = cands[i].pool.index
                host = cands[i].pool.host_index
                c = h = 0
                while c < num_full and (chain[c] in index or (host and chain[c] in host)):
                    h += chain[c] not in index
                    c += 1
                host_cached[i] = h * bs
                r = c
                if pending is not None:
                    me = cands[i].executor_id
                    while r < num_full and (chain[r] in index or pending(chain[r], now) == me):
                        r += 1
                cached[i], reach[i] = c * bs, r * bs
        return cached, reach, chains, host_cached
