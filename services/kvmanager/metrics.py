"""Prometheus exposition of kvmanager's stats (`/metrics` on --metrics-port).

A custom collector reads the core's counters at scrape time, so the allocation path pays nothing
for metrics. Hit rates are left to PromQL (rate(hit_tokens) / rate(query_tokens)): counters only,
no hit-rate gauge. The HTTP server (aiohttp) runs in the service's event loop, so a scrape never
races the core's mutations.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from pagemesh.services.kvmanager.fleet import Fleet
from pagemesh.services.kvmanager.manager import Manager
from pagemesh.services.kvmanager.persistence import Persistence
from pagemesh.services.kvmanager.router import Router
from pagemesh.services.kvmanager.stats import AGE_BUCKETS, HitWindows, Residency
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_HITS = (
    ("query_tokens", "Prompt tokens looked up in the prefix cache"),
    ("hit_tokens", "Prompt tokens served from the prefix cache"),
    ("query_requests", "Allocations (prompts) looked up"),
    ("hit_requests", "Allocations with a prefix-cache hit of at least one block"),
)


def _histogram(name: str, doc: str, label: str, rows: dict[str, Residency]) -> Metric:
    h = HistogramMetricFamily(name, doc, labels=[label])
    for key, r in rows.items():
        cum, buckets = 0, []
        for bound, n in zip((*map(str, AGE_BUCKETS), "+Inf"), r.buckets, strict=True):
            cum += n
            buckets.append((bound, cum))
        h.add_metric([key], buckets, r.total)
    return h


class KVCollector:
    def __init__(
        self,
        manager: Manager,
        persistence: Persistence | None,
        fleet: Fleet | None = None,
        router: Router | None = None,
    ) -> None:
        self.m = manager
        self.p = persistence
        self.fleet = fleet
        self.router = router

    def _hits(self, prefix: str, label: str, rows: dict[str, HitWindows]) -> Iterator[Metric]:
        for field, doc in _HITS:
            c = CounterMetricFamily(f"pagemesh_kv_{prefix}{field}", doc, labels=[label])
            for key, w in rows.items():
                c.add_metric([key], getattr(w.total, field))
            yield c

    def collect(self) -> Iterator[Metric]:
        m = self.m
        yield from self._hits("", "executor", m.stats.executors)
        tenants = {k or "none": w for k, w in m.stats.tenants.items()}
        yield from self._hits("tenant_", "tenant", tenants)
        blocks = GaugeMetricFamily(
            "pagemesh_kv_blocks", "KV blocks per state", labels=["executor", "state"]
        )
        ev = CounterMetricFamily(
            "pagemesh_kv_evictions", "Cached blocks evicted for fresh ones", labels=["executor"]
        )
        seqs = GaugeMetricFamily(
            "pagemesh_kv_live_sequences", "Sequences holding blocks", labels=["executor"]
        )
        epoch = GaugeMetricFamily(
            "pagemesh_kv_executor_epoch", "Current epoch per executor", labels=["executor"]
        )
        for eid, ex in m.executors.items():
            pool = ex.pool
            for state, n in (
                ("free", pool.num_free),
                ("in_use", pool.num_in_use),
                ("cached", pool.num_cached),
            ):
                blocks.add_metric([eid, state], n)
            ev.add_metric([eid], pool.evictions)
            seqs.add_metric([eid], len(ex.seqs))
            epoch.add_metric([eid], ex.epoch)
        yield from (blocks, ev, seqs, epoch)
        yield from self._tiers()
        yield _histogram(
            "pagemesh_kv_block_age_at_hit_seconds",
            "Age of a block (since its hash was published) when a prefix hit reuses it",
            "executor",
            {eid: ex.age_at_hit for eid, ex in m.executors.items()},
        )
        yield _histogram(
            "pagemesh_kv_block_age_at_eviction_seconds",
            "Age of a cached block (since its hash was published) when it is evicted",
            "executor",
            {eid: ex.age_at_eviction for eid, ex in m.executors.items()},
        )
        if self.fleet is not None and self.router is not None:
            yield from self._fleet(self.fleet, self.router)
        if self.p is not None:
            p = self.p
            yield GaugeMetricFamily(
                "pagemesh_kv_redis_connected",
                "1 when the last Redis write succeeded",
                value=int(p.connected),
            )
            yield GaugeMetricFamily(
                "pagemesh_kv_redis_pending_writes",
                "Changes not yet written to Redis",
                value=p.pending,
            )
            for name, doc, v in (
                ("flushes", "Write-behind batches written", p.counters.flushes),
                (
                    "full_resyncs",
                    "Full snapshots written (start, after an outage)",
                    p.counters.full_resyncs,
                ),
                ("errors", "Failed Redis batches", p.counters.errors),
                ("records_written", "Records written to Redis", p.counters.written),
            ):
                yield CounterMetricFamily(f"pagemesh_kv_redis_{name}", doc, value=v)

    def _tiers(self) -> Iterator[Metric]:
        """The host-memory tier per executor (label `executor`; those with one): hits by tier,
        spills, restores, drops, bytes moved, host blocks by state, ages in host memory."""
        tiered = {eid: ex for eid, ex in self.m.executors.items() if ex.num_host_blocks}
        hits = CounterMetricFamily(
            "pagemesh_kv_tier_hit_tokens",
            "Prompt tokens served from the prefix cache, by the tier the blocks were found in",
            labels=["executor", "tier"],
        )
        moves = CounterMetricFamily(
            "pagemesh_kv_tier_transfers",
            "Blocks copied between the tiers: spill (GPU to host, on eviction or ahead of it),"
            " restore (host to GPU, on a hit); drop: host blocks whose contents were dropped"
            " (host LRU); spill_ahead: the spills made ahead of eviction (of spill);"
            " evicted_ahead: evictions that found their copy made, moving no bytes",
            labels=["executor", "kind"],
        )
        moved = CounterMetricFamily(
            "pagemesh_kv_tier_bytes",
            "Bytes copied between the tiers, by direction",
            labels=["executor", "direction"],
        )
        host = GaugeMetricFamily(
            "pagemesh_kv_host_blocks",
            "Host-tier blocks per state (copy: a copy of a GPU block still cached there)",
            labels=["executor", "state"],
        )
        for eid, ex in tiered.items():
            p = ex.pool
            hits.add_metric([eid, "gpu"], ex.gpu_hit_tokens)
            hits.add_metric([eid, "host"], ex.host_hit_tokens)
            moves.add_metric([eid, "spill"], p.num_spills)
            moves.add_metric([eid, "restore"], p.num_restores)
            moves.add_metric([eid, "drop"], p.host_drops)
            moves.add_metric([eid, "spill_ahead"], p.num_spills_ahead)
            moves.add_metric([eid, "evicted_ahead"], p.num_evicted_ahead)
            moved.add_metric([eid, "to_host"], p.num_spills * ex.kv_block_bytes)
            moved.add_metric([eid, "to_gpu"], p.num_restores * ex.kv_block_bytes)
            host.add_metric([eid, "free"], p.num_host_free)
            host.add_metric([eid, "cached"], p.num_host_cached)
            host.add_metric([eid, "copy"], p.num_host_copies)
        yield from (hits, moves, moved, host)
        yield _histogram(
            "pagemesh_kv_host_block_age_at_restore_seconds",
            "Time a block spent in host memory (since its spill) when a hit restores it",
            "executor",
            {eid: ex.age_at_restore for eid, ex in tiered.items()},
        )
        yield _histogram(
            "pagemesh_kv_host_block_age_at_drop_seconds",
            "Time a block spent in host memory (since its spill) when the host LRU drops it",
            "executor",
            {eid: ex.age_at_host_drop for eid, ex in tiered.items()},
        )

    def _fleet(self, fleet: Fleet, router: Router) -> Iterator[Metric]:
        """Per executor (label `executor`): its registration, liveness and load, and the
        requests routed to it by policy and reason; requests not routed, by why."""
        info = GaugeMetricFamily(
            "pagemesh_kv_executor_info",
            "1 per registered executor, labelled with what it registered",
            labels=["executor", "address", "model"],
        )
        live = GaugeMetricFamily(
            "pagemesh_kv_executor_live",
            "1 while the executor calls within the timeout (routed to), 0 while down",
            labels=["executor"],
        )
        load = GaugeMetricFamily(
            "pagemesh_kv_executor_load",
            "The load routing compares: sequences running and waiting (routed since the last"
            " report included) plus queued prompt tokens per TOKENS_PER_SEQ",
            labels=["executor"],
        )
        seqs = GaugeMetricFamily(
            "pagemesh_kv_executor_sequences",
            "Sequences as last reported (waiting: plus those routed since)",
            labels=["executor", "state"],
        )
        queued = GaugeMetricFamily(
            "pagemesh_kv_executor_queued_prompt_tokens",
            "Prompt tokens waiting for prefill as last reported, plus the uncached tokens routed"
            " since",
            labels=["executor"],
        )
        for ex, is_live in fleet.members():
            eid, x = ex.executor_id, ex.load
            info.add_metric([eid, ex.address, ex.model], 1)
            live.add_metric([eid], int(is_live))
            load.add_metric([eid], x.value)
            seqs.add_metric([eid, "running"], x.running)
            seqs.add_metric([eid, "waiting"], x.waiting + x.routed_seqs)
            queued.add_metric([eid], x.queued_prompt_tokens + x.routed_tokens)
        routed = CounterMetricFamily(
            "pagemesh_kv_routed_requests",
            "Route decisions, by chosen executor, policy and reason",
            labels=["executor", "policy", "reason"],
        )
        for eid, counts in sorted(router.routed.items()):
            for (policy, reason), n in sorted(counts.items()):
                routed.add_metric([eid, policy, reason], n)
        failed = CounterMetricFamily(
            "pagemesh_kv_route_failures",
            "Route calls answered with an error, by kind (BadRouteRequest, UnknownModel,"
            " NoLiveExecutor)",
            labels=["kind"],
        )
        for kind, n in sorted(router.failures.items()):
            failed.add_metric([kind], n)
        yield from (info, live, load, seqs, queued, routed, failed)


def make_registry(
    manager: Manager,
    persistence: Persistence | None,
    fleet: Fleet | None = None,
    router: Router | None = None,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KVCollector(manager, persistence, fleet, router))
    return registry


async def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
