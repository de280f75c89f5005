"""Chaos: for CHAOS_S seconds (3 minutes; PAGEMESH_CHAOS_S to change it) 16 clients stream
through a gateway of two workers while every 15-30 s a random part of the mesh is killed with
SIGKILL (kvmanager, the executor, Redis or a gateway worker) and brought back as a supervisor
would (`pagemesh up`, compose's restart policy; a gateway worker by the gateway itself).

Must show (issue 20): every request that did not go through a killed gateway worker completed
(ride-through, request migration); no block leaked once the load is over, the pool's accounting
exact; the executor aborted the dead worker's requests (its Serve stream's close aborts them)
and runs nothing once the load is over; the gateway worker that was never killed keeps its
memory and open file descriptors flat; the prefix index still hits. The figures (requests,
migrations, failures, time to recover per fault) go to the reliability table of RESULTS.md.

Which requests went through a killed worker: every response names its gateway process
(x-pagemesh-worker, a pid), so a failed request answered by a worker that was killed while the
request was in flight is that worker's, and one that got no response at all (its connection
reset before the headers: accepted by the dying worker) whose time span covers a worker kill is
counted with it. Any other failure fails the test, and so does a run in which the worker kills
cut no request (the fault would not have been tested).
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
import pytest

from tests.reliability.client import (
    COMPLETED,
    StreamResult,
    chat_body,
    run_load,
    session,
)
from tests.reliability.workload import (
    STREAM_TIMEOUT,
    SYSTEM,
    cached_tokens_of,
    streaming_chat_maker,
    wait_request_ok,
)
from tests.support.mesh import Mesh, assert_pool_consistent, wait_for

CHAOS_S = float(os.environ.get("PAGEMESH_CHAOS_S", "180"))
CLIENTS = 16
WORKERS = 2
GATEWAY_WORKER = "gateway worker"
VICTIMS = ("kvmanager", "executor", "redis", GATEWAY_WORKER)
# A request's span is taken on the test's clock, the kill's in a thread: a little slack.
KILL_SLACK_S = 1.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(CHAOS_S) + 480)]


@dataclass
class WorkerKill:
    pid: int
    at: float  # time.monotonic() of the SIGKILL
    aborted: int = 0  # requests the executor aborted when the worker's Serve stream broke


@pytest.fixture
def chaos_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """The shared mesh with its gateway run as two workers, restored afterwards."""
    before = tuple(mesh.config.gateway_args)
    mesh.reconfigure_gateway((*before, "--workers", str(WORKERS)))
    try:
        yield mesh
    finally:
        mesh.reconfigure_gateway(before)


def _kill_and_restore(mesh: Mesh, victim: str) -> None:
    """SIGKILL, a moment down, then back on the same port (Redis from its own files)."""
    if victim == "redis":
        mesh.stop_redis(kill=True)
        time.sleep(1.0)
        mesh.start_redis()
        return
    mesh.kill(victim)
    time.sleep(1.0)
    mesh.start_service(victim)


def _executor_log_size(mesh: Mesh) -> int:
    return mesh.services["executor"].log_path.stat().st_size


def _closed_streams(mesh: Mesh, offset: int) -> list[int]:
    """Per Serve stream closed since `offset` of the executor's log, the requests the executor
    aborted with it (those of the gateway worker at its other end)."""
    with mesh.services["executor"].log_path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    found = re.findall(r"Serve stream from \S+ closed \((\d+) requests aborted\)", text)
    return [int(n) for n in found]


def _kill_gateway_worker(mesh: Mesh, spared: int) -> WorkerKill:
    """SIGKILLs a gateway worker other than `spared`, waits for the executor to abort its
    requests and for the gateway to replace it (its Serve stream open)."""
    victim = next(pid for pid in mesh.gateway_worker_pids() if pid != spared)
    offset = _executor_log_size(mesh)
    kill = WorkerKill(victim, time.monotonic())
    os.kill(victim, signal.SIGKILL)
    closed = wait_for(
        lambda: _closed_streams(mesh, offset), 30, "the executor to close the dead worker's stream"
    )
    wait_for(
        lambda: len(p := mesh.gateway_worker_pids()) == WORKERS and victim not in p,
        60,
        "the gateway to replace its dead worker",
    )
    mesh.wait_for_serve_streams(60)
    kill.aborted = sum(closed)
    return kill


def _through_killed_worker(result: StreamResult, kills: list[WorkerKill]) -> bool:
    """The request was in flight on a worker when it was killed (see the module docstring)."""
    for kill in kills:
        in_flight = result.started <= kill.at + KILL_SLACK_S and result.ended >= kill.at
        if in_flight and result.worker in ("", str(kill.pid)):
            return True
    return False


async def test_chaos_random_sigkills_under_streaming_load(chaos_mesh: Mesh, figures) -> None:
    mesh = chaos_mesh
    rng = random.Random(20)
    async with session() as http:
        probe = chat_body("Which station comes first?", 4, system=SYSTEM)
        await cached_tokens_of(mesh, http, probe)
        mesh.wait_idle(30)
        baseline_in_use = mesh.executor_stats().pool.in_use

        stop = asyncio.Event()
        make = streaming_chat_maker(mesh, http, max_tokens=24, seed=3, ignore_eos=True)
        load = asyncio.create_task(
            run_load(make, concurrency=CLIENTS, duration=CHAOS_S + 120, stop=stop)
        )
        await asyncio.sleep(10)  # warm: the spared worker's steady memory and descriptors
        # One worker is never killed: the flat-memory check reads it. (Migrations are counted
        # from the workers' shared log: /metrics shows the counters of whichever one answers.)
        spared = psutil.Process(mesh.gateway_worker_pids()[0])
        rss_start, fds_start = spared.memory_info().rss, spared.num_fds()
        gateway_log_start = mesh.services["gateway"].log_path.stat().st_size

        faults: list[dict[str, object]] = []
        worker_kills: list[WorkerKill] = []
        # Each victim once in every four faults, in a random order: all of them get killed.
        order = [v for _ in range(int(CHAOS_S // 15) + 1) for v in rng.sample(VICTIMS, 4)]
        start = time.monotonic()
        while True:
            pause = rng.uniform(15, 30)
            if time.monotonic() - start + pause > CHAOS_S:
                break
            await asyncio.sleep(pause)
            victim = order[len(faults)]
            fault: dict[str, object] = {"victim": victim}
            if victim == GATEWAY_WORKER:
                kill = await asyncio.to_thread(_kill_gateway_worker, mesh, spared.pid)
                worker_kills.append(kill)
                killed_at, back_at = kill.at, time.monotonic()
                fault["aborted"] = kill.aborted
            else:
                killed_at = time.monotonic()
                await asyncio.to_thread(_kill_and_restore, mesh, victim)
                back_at = await asyncio.to_thread(wait_request_ok, mesh)
            fault["recover_s"] = round(back_at - killed_at, 2)
            faults.append(fault)
        await asyncio.sleep(5)  # load after the last fault too
        stop.set()
        report = await asyncio.wait_for(load, STREAM_TIMEOUT + 60)
        rss_end, fds_end = spared.memory_info().rss, spared.num_fds()

        # The executor runs nothing once the clients are done: none of the dead workers'
        # requests kept generating.
        info = await asyncio.to_thread(
            wait_for,
            lambda: (i := mesh.executor_info(timeout=2)).num_running == 0 and i.num_waiting == 0,
            30,
            "the executor to run nothing",
        )
        assert info

        with_worker = [
            r
            for r in report.results
            if r.outcome != COMPLETED and _through_killed_worker(r, worker_kills)
        ]
        others_failed = [
            r for r in report.results if r.outcome != COMPLETED and r not in with_worker
        ]
        gateway_log = (
            mesh.services["gateway"]
            .log_path.read_bytes()[gateway_log_start:]
            .decode(errors="replace")
        )
        migrations = len(re.findall(r"request \S+ continues on executor", gateway_log))
        counts = report.counts()
        figures.record(
            f"chaos: {CHAOS_S:.0f} s, a SIGKILL every 15-30 s, gateway of {WORKERS} workers",
            **report.figures(),
            failed_with_killed_worker=len(with_worker),
            failed_otherwise=len(others_failed),
            faults=len(faults),
            faults_by_service={v: sum(f["victim"] == v for f in faults) for v in VICTIMS},
            recover_s={v: [f["recover_s"] for f in faults if f["victim"] == v] for v in VICTIMS},
            aborted_by_worker_kill=[f["aborted"] for f in faults if "aborted" in f],
            migrations=migrations,
            spared_worker_rss_mb=[round(rss_start / 2**20, 1), round(rss_end / 2**20, 1)],
            spared_worker_fds=[fds_start, fds_end],
        )
        assert len(faults) >= len(VICTIMS), "the run was too short to kill every service"
        assert not others_failed, (
            f"{report.summary()}; {len(others_failed)} failed outside a worker kill: "
            + "; ".join(
                f"{r.outcome} worker={r.worker or '-'} detail={r.detail!r} error={r.error!r}"
                for r in others_failed[:5]
            )
        )
        assert with_worker, "no request was in flight on a killed gateway worker"
        assert sum(k.aborted for k in worker_kills) > 0, "the executor aborted nothing"
        assert counts[COMPLETED] >= CLIENTS * len(faults), report.summary()
        completed = [r for r in report.results if r.outcome == COMPLETED]
        assert all(r.finish_reason == "length" for r in completed), "a stream was cut short"

        # No block leaked, the accounting exact, and the index still hits.
        pool = mesh.wait_idle(timeout=60, baseline_in_use=baseline_in_use)
        assert_pool_consistent(pool)
        assert pool.in_use == baseline_in_use
        assert await cached_tokens_of(mesh, http, probe) > 0, "the prefix index no longer hits"

        # The gateway worker that lived through every fault is flat.
        assert rss_end <= rss_start * 1.3 + (64 << 20), (rss_start, rss_end)
        assert fds_end <= fds_start + 16, (fds_start, fds_end)
