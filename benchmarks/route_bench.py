"""Routing across a fleet, through the whole mesh: every policy on the same workloads.

For each policy a fresh fleet is started (Redis, kvmanager, N executors, a gateway following
the fleet with `--routing-policy POLICY`: tests/support/fleet.py), so every policy starts with
empty caches, then the workloads run through the gateway's OpenAI API as streaming chats:
- multi_tenant: T tenants, each a C-token context, U users per tenant asking Q-token questions
  (Q uniform in [q_min, q_max]), shuffled, Poisson arrivals at each rate; the contexts together
  exceed one executor's pool and fit the fleet's;
- mixed: DESIGN.md's mixed workload (no sharing), at the highest rate.

Prints one JSON line per policy, workload and rate: hit rate measured (kvmanager's fleet-wide
count) and the theoretical best with perfect affinity (every earlier prompt's full blocks
cached, block granularity), TTFT p50/p90/p99, output tokens/s, requests within the TTFT SLO,
rejections (failed requests), and where the requests went (kvmanager's route decisions).

    python benchmarks/route_bench.py --model DIR [--device cuda] [--executors 3] ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
from pagemesh.services.gateway.chat import Tokenizer

from benchmarks import workloads
from benchmarks.load_client import ClientPool
from benchmarks.serve_bench import run_workload
from benchmarks.workloads import Conversation, Turn
from tests.support.fleet import Fleet, FleetConfig

MODEL = "bench"


def multi_tenant(
    tokenizer: Any, tenants: int, context: int, users: int, q_min: int, q_max: int,
    max_tokens: int, seed: int,
) -> list[Conversation]:  # fmt: skip
    rng = random.Random(seed)
    words = workloads.single_token_words(tokenizer.hf)
    contexts = [workloads.text_of(words, rng, context) for _ in range(tenants)]
    convs = [
        Conversation([Turn(workloads.text_of(words, rng, rng.randint(q_min, q_max)), max_tokens)],
                     system=ctx)
        for ctx in contexts
        for _ in range(users)
    ]  # fmt: skip
    rng.shuffle(convs)
    return convs


def spread(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for ex, reasons in after.items():
        d = {r: n - before.get(ex, {}).get(r, 0) for r, n in reasons.items()}
        d = {r: n for r, n in d.items() if n}
        if d:
            out[ex] = d
    return out


async def run_policy(args: argparse.Namespace, policy: str, tokenizer: Tokenizer) -> None:
    config = FleetConfig(
        model=args.model,
        executors=args.executors,
        model_names=[MODEL],
        num_blocks=args.num_blocks,
        block_size=16,
        max_num_seqs=args.max_num_seqs,
        routing_policy=policy,
        executor_timeout=10.0,
        start_timeout=args.start_timeout,
        device=args.device,
        executor_args=list(args.executor_arg),
    )
    with tempfile.TemporaryDirectory() as tmp, Fleet(Path(tmp), config) as fleet:
        clients = ClientPool(args.client_procs)
        with clients:
            runs: list[tuple[str, list[Conversation], float]] = []
            for rate in args.rates:
                convs = multi_tenant(
                    tokenizer, args.tenants, args.context, args.users, args.q_min, args.q_max,
                    args.max_tokens, args.seed,
                )  # fmt: skip
                runs.append(("multi_tenant", convs, rate))
            mixed = workloads.build("mixed", tokenizer.hf, args.mixed_requests, args.seed)
            for conv in mixed:
                for turn in conv.turns:
                    turn.max_tokens = min(turn.max_tokens, args.mixed_max_tokens)
            runs.append(("mixed", mixed, max(args.rates)))
            for name, convs, rate in runs:
                before = fleet.routed()
                report = await run_workload(
                    fleet.url, fleet.kv_address, MODEL, name, convs, rate, tokenizer,
                    block_size=16, seed=args.seed, warmup_first=False, clients=clients,
                    ttft_slo=args.ttft_slo,
                )  # fmt: skip
                report.update(
                    bench="route",
                    policy=policy,
                    executors=args.executors,
                    device=args.device,
                    routed=spread(before, fleet.routed()),
                    rejections=report["failed"],
                )
                print(json.dumps(report), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model directory every executor loads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--executors", type=int, default=3)
    ap.add_argument("--num-blocks", type=int, default=256, help="each executor's pool")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--policies", default="kv,least_loaded,round_robin")
    ap.add_argument("--rates", default="4", help="Poisson rates (requests/s), comma-separated")
    ap.add_argument("--tenants", type=int, default=48)
    ap.add_argument("--context", type=int, default=2048, help="tokens of each tenant's context")
    ap.add_argument("--users", type=int, default=4, help="requests per tenant")
    ap.add_argument("--q-min", type=int, default=128)
    ap.add_argument("--q-max", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mixed-requests", type=int, default=64)
    ap.add_argument("--mixed-max-tokens", type=int, default=64)
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ttft-slo", type=float, default=1.0, help="seconds")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument(
        "--executor-arg", action="append", default=[],
        help="extra argument for every executor (repeat), e.g. --executor-arg=--gpu-memory-utilization=0.25",
    )  # fmt: skip
    args = ap.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    tokenizer = Tokenizer.load(args.model)
    for policy in args.policies.split(","):
        asyncio.run(run_policy(args, policy, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
