"""Prometheus exposition of kvmanager's stats (`/metrics` on --metrics-port).

A custom collector reads the core's counters at scrape time, so the allocation path pays nothing
for metrics. Hit rates are left to PromQL (rate(hit_tokens) / rate(query_tokens)): counters only,
no hit-rate gauge. The HTTP server (aiohttp) runs in the service's event loop, so a scrape never
races the core's mutations.
"""

from __future__ import annotations

from collections.abc import Iterator

from aiohttp import web
from pagemesh.services.kvmanager.manager import Manager
from pagemesh.services.kvmanager.persistence import Persistence
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
    def __init__(self, manager: Manager, persistence: Persistence | None) -> None:
        self.m = manager
        self.p = persistence

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


def make_registry(manager: Manager, persistence: Persistence | None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KVCollector(manager, persistence))
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
