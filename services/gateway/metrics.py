"""Prometheus metrics of the gateway, plus kvmanager's pool and prefix-cache counters (read with
one GetStats call per scrape) so that one scrape target shows the prefix cache at work.

Conventions (checked by tests/gateway/test_metrics.py as `promtool check metrics` would):
- every HTTP request is counted once, by route template and status code, 4xx and 5xx included
  (`pagemesh_gateway_requests_total{route,code}`, counted by a middleware around everything);
- counters end in `_total` and only counters do; no `_created` series;
- no precomputed ratios: kvmanager's hit counters are re-exported as counters and the hit rate
  is left to PromQL, `rate(pagemesh_gateway_kv_hit_tokens_total[5m]) /
  rate(pagemesh_gateway_kv_query_tokens_total[5m])`, which averages correctly over any window
  and across replicas where a ratio gauge cannot;
- mirrored kvmanager figures are absent (not stale) from a scrape kvmanager did not answer.
"""

from __future__ import annotations

from collections.abc import Iterator

from pagemesh.proto import kvmanager_pb2 as kv_pb
from pagemesh.services.gateway.kvmanager_link import KVManagerLink
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import disable_created_metrics

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# The status of a request whose client went away before it was answered (nginx's convention).
CLIENT_CLOSED = "499"
# kvmanager's since-start hit counters (HitStats fields) mirrored as counters.
KV_HITS = (
    ("query_tokens", "Prompt tokens looked up in the prefix cache (kvmanager, all executors)"),
    ("hit_tokens", "Prompt tokens served from the prefix cache (kvmanager, all executors)"),
    ("query_requests", "Prompts looked up in the prefix cache (kvmanager, all executors)"),
    ("hit_requests", "Prompts with a prefix-cache hit (kvmanager, all executors)"),
)

# `_created` samples are a gauge per counter in the text format: noise for every scraper.
disable_created_metrics()


class KVMirror:
    """A collector of the last GetStats reply (None: kvmanager did not answer this scrape)."""

    def __init__(self) -> None:
        self.stats: kv_pb.GetStatsResponse | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None:
            return
        since_start = next((w.hits for w in stats.windows if w.name == "since_start"), None)
        if since_start is not None:
            for field, doc in KV_HITS:
                c = CounterMetricFamily(f"pagemesh_gateway_kv_{field}", doc)
                c.add_metric([], getattr(since_start, field))
                yield c
        blocks = GaugeMetricFamily(
            "pagemesh_gateway_kv_blocks",
            "KV blocks per executor and state (kvmanager)",
            labels=["executor", "state"],
        )
        evictions = CounterMetricFamily(
            "pagemesh_gateway_kv_evictions",
            "Cached blocks evicted for fresh ones (kvmanager)",
            labels=["executor"],
        )
        for ex in stats.executors:
            for state in ("free", "in_use", "cached"):
                blocks.add_metric([ex.executor_id, state], getattr(ex.pool, state))
            evictions.add_metric([ex.executor_id], ex.pool.evictions)
        yield blocks
        yield evictions
        yield GaugeMetricFamily(
            "pagemesh_gateway_kv_redis_connected",
            "1 when kvmanager reaches Redis",
            value=1 if stats.redis_connected else 0,
        )


class GatewayMetrics:
    def __init__(self, kvmanager: KVManagerLink | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pagemesh_gateway_requests",
            "HTTP requests by route template and status code (499: the client went away)",
            ["route", "code"],
            registry=r,
        )
        self.in_flight = Gauge(
            "pagemesh_gateway_requests_in_flight", "Requests being generated", registry=r
        )
        self.prompt_tokens = Counter(
            "pagemesh_gateway_prompt_tokens", "Prompt tokens of finished requests", registry=r
        )
        self.cached_tokens = Counter(
            "pagemesh_gateway_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache",
            registry=r,
        )
        self.completion_tokens = Counter(
            "pagemesh_gateway_completion_tokens", "Generated tokens", registry=r
        )
        # Where requests went and why: kvmanager's reasons ("prefix", "load", "fallback", a
        # policy's name) or the gateway's own (router.py: "static", "kvmanager_unreachable", ...).
        self.routed = Counter(
            "pagemesh_gateway_routed_requests",
            "Requests sent to each executor, by the reason it was chosen",
            ["executor", "reason"],
            registry=r,
        )
        # Requests sent on to another executor (or the same one, back) after theirs failed
        # under them (migration.py: the reason), and those that could not be (limit reached, or
        # no executor took the continuation in time): those ended in an error.
        self.migrations = Counter(
            "pagemesh_gateway_migrations",
            "Requests migrated to another executor, by why",
            ["reason"],
            registry=r,
        )
        self.migrations_failed = Counter(
            "pagemesh_gateway_migrations_failed",
            "Requests whose executor failed and that could not be migrated, by why",
            ["reason"],
            registry=r,
        )
        self.aborts = Counter(
            "pagemesh_gateway_aborts", "Requests aborted before the end", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "pagemesh_gateway_time_to_first_token_seconds",
            "Time from request to first token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "pagemesh_gateway_request_duration_seconds",
            "Time from request to last byte",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._kv = kvmanager
        if kvmanager is not None:
            self.kv_up = Gauge(
                "pagemesh_gateway_kv_up", "1 when kvmanager answered this scrape", registry=r
            )
            self._mirror = KVMirror()
            r.register(self._mirror)

    async def _refresh_kv(self) -> None:
        if self._kv is None:
            return
        stats = await self._kv.stats()
        self._mirror.stats = stats
        self.kv_up.set(0 if stats is None else 1)

    async def render(self) -> bytes:
        await self._refresh_kv()
        return generate_latest(self.registry)
