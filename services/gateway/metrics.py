"""Prometheus metrics of the gateway, plus kvmanager's pool and hit-rate figures (read with one
GetStats call per scrape) so that one scrape target shows the prefix cache at work."""

from __future__ import annotations

from pagemesh.services.gateway.kvmanager_link import KVManagerLink
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    def __init__(self, kvmanager: KVManagerLink | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pagemesh_gateway_requests", "HTTP API requests", ["endpoint", "status"], registry=r
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
        self.kv_token_hit_rate = Gauge(
            "pagemesh_gateway_kv_token_hit_rate",
            "Prompt tokens served from the prefix cache / prompt tokens (kvmanager)",
            ["window"],
            registry=r,
        )
        self.kv_request_hit_rate = Gauge(
            "pagemesh_gateway_kv_request_hit_rate",
            "Requests with a prefix-cache hit / requests (kvmanager)",
            ["window"],
            registry=r,
        )
        self.kv_blocks = Gauge(
            "pagemesh_gateway_kv_blocks",
            "KV blocks per state (kvmanager)",
            ["executor", "state"],
            registry=r,
        )
        self.kv_evictions = Gauge(
            "pagemesh_gateway_kv_evictions",
            "Cached blocks evicted since start",
            ["executor"],
            registry=r,
        )
        self.kv_redis_connected = Gauge(
            "pagemesh_gateway_kv_redis_connected", "1 when kvmanager reaches Redis", registry=r
        )
        self.kv_up = Gauge(
            "pagemesh_gateway_kv_up", "1 when kvmanager answered this scrape", registry=r
        )
        self._kv = kvmanager

    async def _refresh_kv(self) -> None:
        if self._kv is None:
            return
        stats = await self._kv.stats()
        if stats is None:
            self.kv_up.set(0)
            return
        self.kv_up.set(1)
        self.kv_redis_connected.set(1 if stats.redis_connected else 0)
        for w in stats.windows:
            self.kv_token_hit_rate.labels(w.name).set(w.hits.token_hit_rate)
            self.kv_request_hit_rate.labels(w.name).set(w.hits.request_hit_rate)
        for ex in stats.executors:
            for state in ("free", "in_use", "cached"):
                self.kv_blocks.labels(ex.executor_id, state).set(getattr(ex.pool, state))
            self.kv_evictions.labels(ex.executor_id).set(ex.pool.evictions)

    async def render(self) -> bytes:
        await self._refresh_kv()
        return generate_latest(self.registry)
