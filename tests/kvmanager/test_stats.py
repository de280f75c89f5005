"""Residency histograms: record_ages (one bucket at a time for a prefix hit's blocks) must count
exactly what recording each age alone does."""

from __future__ import annotations

import bisect
import random

from pagemesh.services.kvmanager.stats import AGE_BUCKETS, Residency


def _reference(batches: list[list[float]]) -> list[int]:
    buckets = [0] * (len(AGE_BUCKETS) + 1)
    for ages in batches:
        for age in ages:
            buckets[bisect.bisect_left(AGE_BUCKETS, age)] += 1
    return buckets


def test_record_ages_counts_every_age_in_its_bucket() -> None:
    rng = random.Random(1)
    batches: list[list[float]] = [[], [0.1], [0.1, 0.1000001], [86400.0, 1e9]]
    for _ in range(300):
        base = rng.choice([0.0, 0.05, 0.4, 2.0, 299.0, 3599.9, 1e6])
        spread = rng.choice([0.0, 1e-4, 0.2, 50.0])
        batches.append([base + rng.random() * spread for _ in range(rng.randint(1, 80))])
    r = Residency()
    for ages in batches:
        r.record_ages(ages)
    assert r.buckets == _reference(batches)
    assert r.count == sum(len(b) for b in batches)
    assert abs(r.total - sum(sum(b) for b in batches)) < 1e-6 * r.total
    assert list(r.samples) == [a for b in batches for a in b][-len(r.samples) :]
