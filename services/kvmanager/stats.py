"""Prefix-cache statistics for operators: hit counts in tokens and in requests over three
windows (since start, the last N requests, the last T seconds), and residency (block age at hit
and at eviction). Recording is O(1) per request: it sits on the allocation path.

A "query" is one Allocate: its prompt length in tokens; a "hit" is the cached prefix it got.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

RECENT_REQUESTS = 1000
RECENT_SECONDS = 60
# Histogram bucket upper bounds (seconds) for residency ages, as in Prometheus.
AGE_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)
AGE_SAMPLES = 4096


@dataclass(slots=True)
class HitCounts:
    query_tokens: int = 0
    hit_tokens: int = 0
    query_requests: int = 0
    hit_requests: int = 0

    def add(self, query_tokens: int, hit_tokens: int, sign: int = 1) -> None:
        self.query_tokens += sign * query_tokens
        self.hit_tokens += sign * hit_tokens
        self.query_requests += sign
        self.hit_requests += sign * (hit_tokens > 0)

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    @property
    def request_hit_rate(self) -> float:
        return self.hit_requests / self.query_requests if self.query_requests else 0.0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.query_tokens, self.hit_tokens, self.query_requests, self.hit_requests)


@dataclass(slots=True)
class HitWindows:
    """Since start; the last `recent_requests` requests; the last `recent_seconds` seconds
    (one-second buckets, so that window is exact to a second)."""

    recent_requests: int = RECENT_REQUESTS
    recent_seconds: int = RECENT_SECONDS
    total: HitCounts = field(default_factory=HitCounts)
    _last: deque[tuple[int, int]] = field(default_factory=deque)
    _last_sum: HitCounts = field(default_factory=HitCounts)
    _buckets: deque[tuple[int, HitCounts]] = field(default_factory=deque)

    def record(self, query_tokens: int, hit_tokens: int, now: float) -> None:
        self.total.add(query_tokens, hit_tokens)
        self._last.append((query_tokens, hit_tokens))
        self._last_sum.add(query_tokens, hit_tokens)
        if len(self._last) > self.recent_requests:
            q, h = self._last.popleft()
            self._last_sum.add(q, h, -1)
        sec = int(now)
        if not self._buckets or self._buckets[-1][0] != sec:
            self._buckets.append((sec, HitCounts()))
            self._expire(sec)
        self._buckets[-1][1].add(query_tokens, hit_tokens)

    def _expire(self, sec: int) -> None:
        while self._buckets and self._buckets[0][0] <= sec - self.recent_seconds:
            self._buckets.popleft()

    def windows(self, now: float | None = None) -> list[tuple[str, HitCounts]]:
        sec = int(time.time() if now is None else now)
        self._expire(sec)
        seconds = HitCounts()
        for _, c in self._buckets:
            seconds.query_tokens += c.query_tokens
            seconds.hit_tokens += c.hit_tokens
            seconds.query_requests += c.query_requests
            seconds.hit_requests += c.hit_requests
        last = HitCounts(*self._last_sum.as_tuple())
        return [
            ("since_start", HitCounts(*self.total.as_tuple())),
            (f"last_{self.recent_requests}_requests", last),
            (f"last_{self.recent_seconds}s", seconds),
        ]


@dataclass(slots=True)
class Residency:
    """Ages in seconds: exact count/sum and histogram buckets, plus the last samples for
    percentiles."""

    count: int = 0
    total: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(AGE_BUCKETS) + 1))
    samples: deque[float] = field(default_factory=lambda: deque(maxlen=AGE_SAMPLES))

    def record(self, age: float) -> None:
        self.record_ages((age,))

    def record_ages(self, ages: Sequence[float]) -> None:
        """record(age) for each age (a prefix hit's tens of blocks, on the allocation path)."""
        if not ages:
            return
        buckets = self.buckets
        lo = bisect.bisect_left(AGE_BUCKETS, min(ages))
        if lo == bisect.bisect_left(AGE_BUCKETS, max(ages)):
            buckets[lo] += len(ages)  # the usual case: one bucket (blocks born close together)
        else:
            for age in ages:
                buckets[bisect.bisect_left(AGE_BUCKETS, age)] += 1
        self.samples.extend(ages)
        self.count += len(ages)
        self.total += sum(ages)

    def summary(self) -> tuple[int, float, float, float]:
        """(count, mean, p50, p99); percentiles over the last AGE_SAMPLES samples."""
        if not self.count:
            return (0, 0.0, 0.0, 0.0)
        s = sorted(self.samples)
        return (
            self.count,
            self.total / self.count,
            s[min(len(s) - 1, int(0.5 * len(s)))],
            s[min(len(s) - 1, int(0.99 * len(s)))],
        )


@dataclass(slots=True)
class Stats:
    """Hit windows over all executors, per executor and per tenant (cache_salt digest)."""

    started: float = field(default_factory=time.time)
    overall: HitWindows = field(default_factory=HitWindows)
    executors: dict[str, HitWindows] = field(default_factory=dict)
    tenants: dict[str, HitWindows] = field(default_factory=dict)
    # Bumped on every record, so persistence knows when counters need writing.
    version: int = 0

    def record(self, executor_id: str, tenant: str, query_tokens: int, hit_tokens: int) -> None:
        now = time.time()
        self.overall.record(query_tokens, hit_tokens, now)
        ex = self.executors.get(executor_id)
        if ex is None:
            ex = self.executors[executor_id] = HitWindows()
        ex.record(query_tokens, hit_tokens, now)
        t = self.tenants.get(tenant)
        if t is None:
            t = self.tenants[tenant] = HitWindows()
        t.record(query_tokens, hit_tokens, now)
        self.version += 1

    def totals(self) -> dict[str, tuple[int, int, int, int]]:
        """Since-start counters keyed "*", "ex:<id>", "tenant:<digest>" (what persistence keeps)."""
        out = {"*": self.overall.total.as_tuple()}
        for k, w in self.executors.items():
            out[f"ex:{k}"] = w.total.as_tuple()
        for k, w in self.tenants.items():
            out[f"tenant:{k}"] = w.total.as_tuple()
        return out

    def restore_totals(self, totals: dict[str, tuple[int, int, int, int]]) -> None:
        for key, values in totals.items():
            if key == "*":
                w = self.overall
            elif key.startswith("ex:"):
                w = self.executors.setdefault(key[3:], HitWindows())
            elif key.startswith("tenant:"):
                w = self.tenants.setdefault(key[7:], HitWindows())
            else:
                continue
            w.total = HitCounts(*values)
