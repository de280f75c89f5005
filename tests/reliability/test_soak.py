"""Soak: thousands of short requests (max_tokens 1-4) at high concurrency on the CPU model.

Must show: no errors; no growth between the start and the end in blocks in use, resident memory
or open file descriptors of the gateway, the executor and kvmanager. The start is measured after
a warm-up (allocator arenas, caches and connection pools settle), the end after the pool drains.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import psutil
import pytest

from tests.reliability.client import (
    COMPLETED,
    StreamResult,
    chat_body,
    run_load,
    session,
    stream_request,
)
from tests.reliability.workload import SYSTEM, chat_url, completions_url
from tests.support.mesh import Mesh, assert_pool_consistent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REQUESTS = int(os.environ.get("PAGEMESH_SOAK_REQUESTS", "2000"))
CONCURRENCY = int(os.environ.get("PAGEMESH_SOAK_CONCURRENCY", "64"))
DURATION_S = float(os.environ.get("PAGEMESH_SOAK_MAX_S", "240"))
RSS_GROWTH_MB = 48.0  # per process; Python's allocator keeps some arenas, a leak grows linearly
FD_GROWTH = 4

# A fixed set of short prompts: their prefixes stay cached, so the soak measures the serving
# path (HTTP, gRPC, scheduler, allocator) rather than prefill compute.
PROMPTS = [f"Train {i} leaves at" for i in range(24)]


def _resources(mesh: Mesh) -> dict[str, tuple[float, int]]:
    """(RSS in MB, open fds) per service."""
    out = {}
    for name, pid in mesh.pids().items():
        proc = psutil.Process(pid)
        out[name] = (proc.memory_info().rss / 2**20, proc.num_fds())
    return out


def _maker(mesh: Mesh, http, seed: int):
    rng = random.Random(seed)

    async def make(i: int) -> StreamResult:
        max_tokens = rng.randint(1, 4)
        stream = rng.random() < 0.75
        if rng.random() < 0.5:
            body = {
                "model": "smollm2",
                "prompt": rng.choice(PROMPTS),
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": stream,
            }
            url = completions_url(mesh)
        else:
            body = chat_body(rng.choice(PROMPTS), max_tokens, system=SYSTEM, stream=stream)
            url = chat_url(mesh)
        return await stream_request(http, url, body, headers=mesh.headers, timeout=120)

    return make


async def test_soak_short_requests(mesh: Mesh, figures) -> None:
    async with session(limit=CONCURRENCY + 8) as http:
        warm = await run_load(
            _maker(mesh, http, 5), concurrency=CONCURRENCY, total=200, duration=60
        )
        assert warm.counts()[COMPLETED] == len(warm.results), warm.summary()
        pool_start = await asyncio.to_thread(mesh.wait_idle, 30.0)
        start = _resources(mesh)
        pids = mesh.pids()

        t0 = time.monotonic()
        report = await run_load(
            _maker(mesh, http, 6), concurrency=CONCURRENCY, total=REQUESTS, duration=DURATION_S
        )
        elapsed = time.monotonic() - t0

        pool_end = await asyncio.to_thread(mesh.wait_idle, 30.0)
        end = _resources(mesh)

    counts = report.counts()
    figures.record(
        "soak",
        requests=len(report.results),
        completed=counts[COMPLETED],
        errors=len(report.results) - counts[COMPLETED],
        seconds=round(elapsed, 1),
        requests_per_s=round(len(report.results) / elapsed, 1),
        in_use_start=pool_start.in_use,
        in_use_end=pool_end.in_use,
        rss_mb={k: (round(start[k][0], 1), round(end[k][0], 1)) for k in end},
        fds={k: (start[k][1], end[k][1]) for k in end},
    )
    assert mesh.pids() == pids, "a service restarted during the soak"
    assert counts[COMPLETED] == len(report.results), (
        f"{report.summary()}; {report.examples('clean_error')} {report.examples('lost')}"
    )
    assert len(report.results) >= min(REQUESTS, 1000), (
        f"only {len(report.results)} requests in {DURATION_S:.0f}s"
    )
    assert_pool_consistent(pool_end)
    assert pool_end.in_use <= pool_start.in_use
    for name, (rss, fds) in end.items():
        rss0, fds0 = start[name]
        assert rss - rss0 <= RSS_GROWTH_MB, f"{name}: RSS {rss0:.0f} -> {rss:.0f} MB"
        assert fds - fds0 <= FD_GROWTH, f"{name}: open fds {fds0} -> {fds}"
