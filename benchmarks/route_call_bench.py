"""What one routing decision costs: Fleet.Route against a real kvmanager process on loopback.

Three executors register (one model); each holds a different 2,048-token context, committed
block by block as an executor does, so the kv policy scores a real prefix on every call. Then
the client sends --calls routing requests one after another (a 2,048-token context plus a
128-256-token question, the contexts in turn), as a gateway sends one per request, through the
gateway's own client (router.FleetRouter.ask): over its RouteStream ("stream", what the gateway
uses) and as unary Route calls ("unary"). Latency percentiles as the client sees them, and
kvmanager's CPU per call (its process's CPU time over the run, which other tenants of a shared
machine do not inflate the way they inflate latency). Prints one JSON line per policy and
transport.

    python benchmarks/route_call_bench.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import time
from array import array

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import grpc
from pagemesh.proto import fleet_pb2
from pagemesh.services.gateway.router import FleetRouter
from pagemesh.services.kvmanager.api import CommitEntry
from pagemesh.services.kvmanager.client import KVManagerClient

from benchmarks.kvmanager_bench import pct, proc_cpu, spawn, wait_ready
from pagemesh.redis_process import free_port

BS = 16
CONTEXT = 2048


async def setup(port: int, rng: random.Random) -> list[list[int]]:
    contexts = []
    for i in range(3):
        c = KVManagerClient(f"127.0.0.1:{port}", f"executor-{i}")
        await c.register(4096, BS, "bench-model", address=f"10.0.0.{i}:50052", model="bench")
        ctx = [rng.randrange(32000) for _ in range(CONTEXT)]
        await c.allocate("ctx", ctx)
        await c.commit(
            [CommitEntry("ctx", b, ctx[b * BS : (b + 1) * BS]) for b in range(CONTEXT // BS)]
        )
        contexts.append(ctx)
        await c.close()
    return contexts


async def run(
    port: int, pid: int, contexts: list[list[int]], policy: str, transport: str, calls: int
) -> dict:
    rng = random.Random(1)
    # A new question on every call (kvmanager remembers the hashes of prefixes it routed: a
    # repeated prompt would cost less than a real one).
    prompts = [
        array(
            "I", contexts[i % 3] + [rng.randrange(32000) for _ in range(rng.randint(128, 256))]
        ).tobytes()
        for i in range(calls + 16)
    ]
    # The gateway's own client (router.FleetRouter.ask): its RouteStream, or unary Route calls.
    router = FleetRouter(f"127.0.0.1:{port}", policy, timeout=10, stream=transport == "stream")
    try:
        for p in prompts[calls:]:  # warm-up
            await router.ask(fleet_pb2.RouteRequest(model="bench", prompt=p, policy=policy))
        lat = []
        reasons: dict[str, int] = {}
        cpu0 = proc_cpu(pid)
        for i in range(calls):
            req = fleet_pb2.RouteRequest(model="bench", prompt=prompts[i], policy=policy)
            t0 = time.perf_counter()
            reply = await router.ask(req)
            lat.append(time.perf_counter() - t0)
            reasons[reply.reason] = reasons.get(reply.reason, 0) + 1
        cpu = proc_cpu(pid) - cpu0
    finally:
        await router.close()
    return {
        "bench": "route_call",
        "policy": policy,
        "transport": transport,
        "calls": calls,
        "prompt_tokens": f"{CONTEXT}+128..256",
        "executors": 3,
        "route_p50_us": pct(lat, 0.5),
        "route_p90_us": pct(lat, 0.9),
        "route_p99_us": pct(lat, 0.99),
        "kvmanager_cpu_us_per_call": round(cpu / calls * 1e6, 1),
        "reasons": reasons,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
    }


async def main_async(args: argparse.Namespace) -> None:
    port = free_port()
    # The executors register and then fall silent: live for the whole run (six rows take
    # longer than the default 10 s bound).
    proc = spawn(port, None, ["--executor-timeout", "3600"])
    try:
        await wait_ready(port)
        contexts = await setup(port, random.Random(0))
        for policy in args.policies.split(","):
            for transport in args.transports.split(","):
                row = await run(port, proc.pid, contexts, policy, transport, args.calls)
                print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--policies", default="kv,least_loaded,round_robin")
    ap.add_argument(
        "--transports",
        default="stream,unary",
        help="stream: RouteStream messages, as the gateway sends them; unary: Route calls",
    )
    asyncio.run(main_async(ap.parse_args()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
